"""Cache keys: sha256 over a canonical encoding of a task's identity and inputs.

A Python task's key covers its function's identity (:func:`function_identity`: module,
qualified name, version, and, unless a version pins it, the source and closure) and its
arguments, encoded by :func:`canonical`: every value is tagged with its type, so ``(1, 2)`` and
``[1, 2]``, ``1`` and ``1.0``, a path and its string are different keys. The encoding depends on
no library version and no line number. A command task's key (:func:`command_key`) covers its
rendered argv, working directory, literal and named environment variables, and the content of
its input files.
"""

from __future__ import annotations

import dataclasses
import datetime
import decimal
import enum
import functools
import hashlib
import inspect
import os
import uuid
from collections.abc import Callable, Iterable
from itertools import chain, repeat
from operator import methodcaller
from pathlib import PurePath
from typing import Any

import msgspec

from ..task import CachePolicy

#: what every key starts with: a new encoding gets a new prefix, so old entries never match
KEY_PREFIX = b"pipefarm-cache-1\0"

_encode = msgspec.msgpack.Encoder(order="deterministic").encode
_Ext = msgspec.msgpack.Ext

# extension codes of the tagged types (stored in keys: never renumber)
(_TUPLE, _SET, _BIGINT, _NDARRAY, _NPSCALAR, _PATH, _ENUM, _DATACLASS, _HOOK, _TEXT,
 _MAP) = range(1, 12)

#: types msgpack tells apart by itself, encoded as they are
_PLAIN = frozenset({type(None), bool, int, float, str, bytes})
#: types with one canonical text form, tagged with their name
_TEXTUAL = (datetime.datetime, datetime.date, datetime.time, datetime.timedelta,
            decimal.Decimal, uuid.UUID)

#: what a value of a subclass of these is hashed as
_BASES = (tuple, list, dict, str, bytes, float, int)

_HOOKS: dict[type, Callable[[Any], Any]] = {}


class CacheKeyError(TypeError):
    """A task's arguments (or function) cannot be turned into a cache key."""


def register(cls: type, hook: Callable[[Any], Any]) -> None:
    """Hash values of ``cls`` (and its subclasses) by ``hook(value)``, which returns something
    the key can encode (numbers, strings, bytes, containers of them...).

    Register it where ``cls`` is defined, so that every process that unpickles such a value
    (array workers recompute keys) has the hook too::

        pf.cache.register(Grid, lambda g: (g.shape, g.spacing))
    """
    if not isinstance(cls, type):
        raise TypeError(f"register() takes a type, not {cls!r}")
    _HOOKS[cls] = hook


def _hook_for(cls: type) -> Callable[[Any], Any] | None:
    for base in cls.__mro__:
        hook = _HOOKS.get(base)
        if hook is not None:
            return hook
    return None


def _type_name(cls: type) -> str:
    return f"{cls.__module__}.{cls.__qualname__}"


def canonical(value: Any, where: str = "value") -> Any:
    """``value`` as plain msgpack-encodable data with every non-plain type tagged.

    Raises :class:`CacheKeyError` naming ``where`` (e.g. ``argument 'x'``) and the type when a
    value has no canonical form and no registered hook.
    """
    cls = type(value)
    if cls in _PLAIN:
        if cls is int and not -(1 << 63) <= value < (1 << 64):
            return _Ext(_BIGINT, str(value).encode())
        return value
    if cls is list:
        return [canonical(v, where) for v in value]
    if cls is tuple:
        return _Ext(_TUPLE, _encode([canonical(v, where) for v in value]))
    if cls is dict:
        # keys canonical too, in the order of their encoding, whatever their types
        items = sorted(((_encode(canonical(k, where)), v) for k, v in value.items()),
                       key=lambda kv: kv[0])
        return _Ext(_MAP, _encode([x for k, v in items for x in (k, canonical(v, where))]))
    if cls in (set, frozenset):
        return _Ext(_SET, _encode(sorted(_encode(canonical(v, where)) for v in value)))
    hook = _hook_for(cls) if _HOOKS else None
    if hook is not None:
        return _Ext(_HOOK, _encode([_type_name(cls), canonical(hook(value), where)]))
    if isinstance(value, enum.Enum):
        return _Ext(_ENUM, _encode([_type_name(cls), canonical(value.value, where)]))
    if isinstance(value, PurePath):
        return _Ext(_PATH, os.fspath(value).encode("utf-8", "surrogateescape"))
    if isinstance(value, _TEXTUAL):
        return _Ext(_TEXT, _encode([cls.__name__, str(value)]))
    if cls.__module__ == "numpy" and cls.__name__ == "ndarray":
        return _ndarray(value, where)
    if cls.__module__ == "numpy" and hasattr(value, "dtype") and hasattr(value, "tobytes"):
        return _Ext(_NPSCALAR, _encode([value.dtype.str, value.tobytes()]))
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        fields = {f.name: getattr(value, f.name) for f in dataclasses.fields(value)}
        return _Ext(_DATACLASS, _encode([_type_name(cls), canonical(fields, where)]))
    for base in _BASES:  # a subclass (namedtuple, OrderedDict, ...): by its value
        if isinstance(value, base):
            return canonical(base(value), where)
    raise CacheKeyError(
        f"{where} is of type {_type_name(cls)}, which the result cache cannot hash: register"
        f" a hook (pf.cache.register({cls.__qualname__}, fn)) or leave it out of the key"
        " (cache_ignore=[...])")


def _ndarray(value: Any, where: str) -> Any:
    if value.dtype.hasobject:
        raise CacheKeyError(f"{where} is a numpy array of Python objects, which the result"
                            " cache cannot hash; convert it or register a hook")
    import numpy

    data = numpy.ascontiguousarray(value).tobytes()
    return _Ext(_NDARRAY, _encode([value.dtype.str, list(value.shape), data]))


# --- Python tasks --------------------------------------------------------------------------------

def task(version: str | None = None, *, ignore: Iterable[str] = ()) -> Callable[[Any], Any]:
    """Decorator: the cache identity of a task function (``pf.task``).

    ``version`` pins the function's identity: while it stays the same, cached results are
    reused even after the source changed (bump it when the results would differ); without it
    the key covers the source. ``ignore`` names arguments left out of the key (as
    ``cache_ignore=``)::

        @pf.task(version="2", ignore=["verbose"])
        def simulate(alpha, beta, verbose=False): ...
    """
    ignored = tuple(ignore)

    def mark(fn: Any) -> Any:
        fn.__pipefarm_task__ = (version, ignored)
        return fn

    return mark


def function_identity(fn: Callable[..., Any], version: str | None = None) -> tuple[str, bytes]:
    """``(name, digest)`` of a task function for its cache key.

    ``name`` is ``module.qualname``. The digest covers the name and ``version`` (argument, or
    ``pf.task(version=...)``); without a version also the function's source (or, where there
    is none, its bytecode without line numbers) and the values its closure and defaults hold.
    Raises :class:`CacheKeyError` for a callable whose identity cannot be known (a bound
    method or a callable object, unless a version is given).
    """
    marked = getattr(fn, "__pipefarm_task__", None)
    if version is None and marked is not None:
        version = marked[0]
    bound: list[Any] = []
    target = fn
    while isinstance(target, functools.partial):
        bound.append([canonical(list(target.args), "a partial's argument"),
                      canonical(target.keywords, "a partial's argument")])
        target = target.func
    target = inspect.unwrap(target)
    name = f"{getattr(target, '__module__', '?')}.{getattr(target, '__qualname__', '?')}"
    parts: list[Any] = ["py", name, version or "", bound]
    if version is None:
        if not inspect.isfunction(target):
            raise CacheKeyError(
                f"cache=True needs a plain function to know what {name} computes (got"
                f" {type(target).__name__}); give cache_version='1' (or @pf.task(version='1'))"
                " and bump it when its results change")
        parts.append(_source_digest(target))
        where = f"a value captured by {name}"
        cells = [c.cell_contents for c in (target.__closure__ or ()) if _filled(c)]
        parts.append(canonical([cells, list(target.__defaults__ or ()),
                                dict(target.__kwdefaults__ or {})], where))
    return name, hashlib.sha256(_encode(parts)).digest()


def _filled(cell: Any) -> bool:
    try:
        cell.cell_contents  # noqa: B018 - raises ValueError for an empty cell
        return True
    except ValueError:
        return False


def _source_digest(fn: Any) -> bytes:
    try:
        text = inspect.getsource(fn)
    except (OSError, TypeError):  # defined in a REPL or exec(): its bytecode stands in
        return b"code:" + _code_digest(fn.__code__)
    return hashlib.sha256(inspect.cleandoc(text).encode()).digest()


def _code_digest(code: Any) -> bytes:
    """The bytecode, names and constants of ``code`` (nested code too), no line numbers."""
    consts = [_code_digest(c) if inspect.iscode(c) else repr(c) for c in code.co_consts]
    return hashlib.sha256(_encode([code.co_code, list(code.co_names), list(code.co_varnames),
                                   consts])).digest()


def arguments_of(fn: Callable[..., Any] | None, args: tuple, kwargs: dict[str, Any],
                 ignore: tuple[str, ...]) -> tuple[tuple, dict[str, Any]]:
    """The arguments that go into the key: ``ignore`` names left out, positional ones by the
    function's signature."""
    if not ignore:
        return args, kwargs
    kept = {k: v for k, v in kwargs.items() if k not in ignore}
    if not args or fn is None:
        return args, kept
    try:
        params = list(inspect.signature(fn).parameters.values())
    except (TypeError, ValueError):
        return args, kept
    out = []
    for i, a in enumerate(args):
        p = params[i] if i < len(params) else None
        if p is not None and p.kind == p.VAR_POSITIONAL:
            out.extend(args[i:])
            break
        if p is None or p.name not in ignore:
            out.append(a)
    return tuple(out), kept


def python_key(policy: CachePolicy, args: tuple, kwargs: dict[str, Any],
               fn: Callable[..., Any] | None = None) -> bytes:
    """The 32-byte key of a Python task: its function's identity and its arguments."""
    return python_keys(policy, [(args, kwargs)], fn)[0]


def python_keys(policy: CachePolicy, calls: Iterable[tuple[tuple, dict[str, Any]]],
                fn: Callable[..., Any] | None = None) -> list[bytes]:
    """:func:`python_key` of each ``(args, kwargs)``: the same keys, with the common case
    (positional arguments of plain types, nothing ignored) in a tight loop: about 1 us a
    task, where a call per task doubled the cost of ``cache=True`` at submission (W1)."""
    prefix = KEY_PREFIX + policy.identity
    sha, enc, plain, ignore = hashlib.sha256, _encode, _PLAIN, policy.ignore
    keys: list[bytes] = []
    add = keys.append
    for args, kwargs in calls:
        if ignore:
            args, kwargs = arguments_of(fn, args, kwargs, ignore)
        if not kwargs and set(map(type, args)) <= plain:
            try:
                add(sha(prefix + enc(args)).digest())
                continue
            except OverflowError:  # an int beyond 64 bits: tagged by canonical()
                pass
        add(sha(prefix + _body(args, kwargs)).digest())
    return keys


def positional_keys(policy: CachePolicy, rows: list[tuple],
                    fn: Callable[..., Any] | None = None) -> list[bytes]:
    """:func:`python_keys` of calls with positional arguments only (``run.map``): when every
    argument of every call is of a plain type, the whole list is hashed by C-level ``map``
    calls (0.5 us a task instead of 1.4 us, W1's 100,000 tasks)."""
    if not policy.ignore and set(map(type, chain.from_iterable(rows))) <= _PLAIN:
        try:
            return list(map(_digest, map(hashlib.sha256, map(
                (KEY_PREFIX + policy.identity).__add__, map(_encode, rows)))))
        except OverflowError:  # an int beyond 64 bits somewhere: one by one
            pass
    return python_keys(policy, zip(rows, repeat({})), fn)


_digest = methodcaller("digest")


def _body(args: tuple, kwargs: dict[str, Any]) -> bytes:
    """The encoded arguments: the positional ones as one array (what the fast path of
    :func:`python_keys` encodes for plain values), then the keyword ones as a map, if any."""
    body = _encode([canonical(a, f"argument {i + 1}") for i, a in enumerate(args)])
    if kwargs:
        body += _encode({k: canonical(v, f"argument {k!r}") for k, v in kwargs.items()})
    return body


# --- command tasks -------------------------------------------------------------------------------

def command_key(policy: CachePolicy, argv: list[str], cwd: str | None, env: dict[str, str],
                inputs: list[str]) -> bytes | None:
    """The 32-byte key of a command task from its rendered ``argv`` and ``cwd`` (None: this
    process's), its literal ``env`` and the files ``inputs`` (rendered; relative to its cwd),
    whose content is hashed now; None when an input file cannot be read (it then runs
    uncached)."""
    where = os.path.abspath(cwd) if cwd else os.getcwd()
    named = {k: os.environ.get(k) for k in policy.env}
    digests = []
    for path in inputs:
        full = os.path.join(where, path)
        try:
            digests.append([path, file_digest(full)])
        except OSError:
            return None
    body = _encode(["cmd", argv, where, sorted(env.items()), named, digests])
    return hashlib.sha256(KEY_PREFIX + body).digest()


def file_digest(path: str) -> bytes:
    """sha256 of a file's content."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.digest()
