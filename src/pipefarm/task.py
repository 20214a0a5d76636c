"""Task records: what a task is (its spec and arguments), its leases and its attempt endings.

These are the plain records every layer passes around; they know nothing of stores or backends.
"""

from __future__ import annotations

import pickle
import signal as _signal
import sys as _sys
import types as _types
from typing import Any

import msgspec

PY = "py"
CMD = "cmd"

#: Results larger than this are kept as files under ``RUN/results`` rather than in the catalog.
INLINE_RESULT_MAX = 64 * 1024

#: A success with a small result and nothing else to record, in the order stores bind it:
#: ``(task, token, attempt, started_at, ended_at, result, worker, peak_memory)``; stores also
#: take rows without the last value (peak not measured).
SuccessRow = tuple[int, int, int, float, float, "bytes | None", str, "int | None"]


class Resources(msgspec.Struct, frozen=True):
    """What one task needs while it runs."""

    cpus: int = 1
    gpus: int = 0
    memory: int | None = None  # bytes


class TaskOptions(msgspec.Struct, frozen=True):
    """The options one submission gives all its tasks, built once by each entry point
    (``Run.map``, ``Run.submit_task``, ``Run.submit_cmd``, ``pipefarm submit``) and passed
    down whole.

    ``retries`` extra attempts after a failure or timeout; ``timeout`` seconds per attempt
    (None: none); ``priority`` (higher first) and ``cost`` (higher first among equal
    priority); ``after`` ids that must succeed first; ``cpus``, ``gpus``, ``memory`` (bytes)
    each task needs; ``backoff`` seconds before the first retry (doubling after); ``max_lost``
    attempts a task may lose to vanished workers; ``tags`` labels. Checked where a spec is
    made from them, not here.
    """

    retries: int = 0
    timeout: float | None = None
    priority: int = 0
    cost: float | None = None
    after: tuple[int, ...] = ()
    cpus: int = 1
    gpus: int = 0
    memory: int | None = None
    backoff: float = 1.0
    max_lost: int = 3
    tags: tuple[str, ...] = ()
    # ``time_request`` seconds each task needs (an array worker with less walltime left, its
    # warning margin taken off, leaves it for one with more); ``keep_checkpoints`` keeps
    # ``RUN/checkpoints/<task>`` after a success (see pipefarm.execute.checkpoint);
    # ``checkpoint_dir`` gives command tasks that directory as $PIPEFARM_CHECKPOINT_DIR
    time_request: float | None = None
    keep_checkpoints: bool = False
    checkpoint_dir: bool = False
    # the result cache (pipefarm.cache): ``cache`` on or off; ``cache_dir`` where (None:
    # $PIPEFARM_CACHE or the user's cache directory); Python tasks: ``cache_version`` (pins
    # the function's identity: its source is then left out) and ``cache_ignore`` (arguments
    # left out of the key); commands: ``cache_env`` (variables whose values are in the key)
    # and ``cache_inputs`` (files, or {placeholders} naming files, whose content is)
    cache: bool = False
    cache_dir: str | None = None
    cache_version: str | None = None
    cache_ignore: tuple[str, ...] = ()
    cache_env: tuple[str, ...] = ()
    cache_inputs: tuple[str, ...] = ()

    @property
    def resources(self) -> Resources:
        """What each task needs while it runs."""
        return Resources(cpus=self.cpus, gpus=self.gpus, memory=self.memory)

    @property
    def policy(self) -> tuple:
        """The options a spec holds (tasks of one spec share them): a cache key."""
        return (self.retries, self.timeout, self.backoff, self.max_lost, self.resources,
                self.tags, self.cache, self.cache_dir, self.cache_version, self.cache_ignore,
                self.time_request, self.keep_checkpoints, self.checkpoint_dir)


class CachePolicy(msgspec.Struct, frozen=True):
    """How the tasks of one spec use the result cache (see :mod:`pipefarm.cache`).

    ``dir`` is the cache directory (absolute); ``name`` the name its entries are listed under
    (the function's ``module.qualname``, or the command's program). Python tasks:
    ``identity`` is the digest of the function's name, version and (unless a version pins
    it) source; ``ignore`` names arguments left out of the key. Commands: ``env`` names
    environment variables whose values are in the key, ``inputs`` files (or ``{placeholder}``
    templates naming files) whose content is, hashed when the task is about to run.
    """

    dir: str
    name: str = ""
    identity: bytes = b""
    ignore: tuple[str, ...] = ()
    env: tuple[str, ...] = ()
    inputs: tuple[str, ...] = ()


class Spec(msgspec.Struct):
    """What a group of tasks shares: the callable or command template, and the policies.

    ``payload`` is a cloudpickled callable for kind ``py``; for kind ``cmd`` it is the
    msgpack-encoded :class:`~pipefarm.execute.template.Command` template.
    """

    kind: str
    payload: bytes
    max_attempts: int = 1
    timeout: float | None = None
    backoff: float = 1.0
    max_lost: int = 3
    resources: Resources = Resources()
    tags: tuple[str, ...] = ()
    name: str = ""
    # Fields below are newer than the catalog's spec columns: stores keep them together
    # (SQLite: the ``specs.options`` column, see :func:`spec_options_blob`). Add new ones
    # here, with a default that means "as before".
    cache: CachePolicy | None = None  # None: results are not cached
    time_request: float | None = None  # seconds a task needs: array placement (None: any worker)
    keep_checkpoints: bool = False  # keep RUN/checkpoints/<task> after a success
    checkpoint_dir: bool = False  # commands: made before each attempt, $PIPEFARM_CHECKPOINT_DIR


#: the Spec fields that have a column of their own in the catalog's ``specs`` table
_SPEC_COLUMN_FIELDS = frozenset(
    {"kind", "payload", "max_attempts", "timeout", "backoff", "max_lost", "resources", "tags",
     "name"})


def spec_options_blob(spec: Spec) -> bytes | None:
    """The spec's newer fields that differ from their defaults, msgpack-encoded (None: none)."""
    extra = {}
    for field in msgspec.structs.fields(spec):
        if field.name in _SPEC_COLUMN_FIELDS:
            continue
        value = getattr(spec, field.name)
        if value != field.default:
            extra[field.name] = value
    return msgspec.msgpack.encode(extra) if extra else None


def spec_options_of(blob: bytes | None) -> dict[str, Any]:
    """Inverse of :func:`spec_options_blob`: keyword arguments for :class:`Spec` (fields this
    pipefarm does not know, written by a newer one, are left out)."""
    if not blob:
        return {}
    types = {f.name: f.type for f in msgspec.structs.fields(Spec)}
    decoded = msgspec.msgpack.decode(blob)
    return {k: msgspec.convert(v, types[k]) for k, v in decoded.items() if k in types}


class Lease(msgspec.Struct, array_like=True):
    """One task handed to a worker: run it and report back with the same token."""

    task: int
    token: int
    attempt: int
    spec: int
    args: bytes | None


class Finished(msgspec.Struct, array_like=True):
    """How one attempt ended, as a worker reports it. ``outcome`` is a states.Outcome value."""

    task: int
    token: int
    outcome: int
    started_at: float
    ended_at: float
    result: bytes | None = None
    error: str | None = None
    exit_code: int | None = None
    note: str | None = None
    output: str | None = None  # where the attempt's stdout/stderr landed (command tasks)
    attempt: int = 0
    peak_memory: int | None = None  # resident bytes at the attempt's peak (None: not measured)


def dumps_args(args: tuple, kwargs: dict) -> bytes:
    """Serialise one task's arguments: plain pickle when it can, cloudpickle when it must.

    Raises :class:`TypeError` with the reason when the arguments cannot be serialised at all.
    """
    # a bare tuple when there are no keywords (the common case, smallest); a list otherwise
    value: Any = [args, kwargs] if kwargs else args
    try:
        return pickle.dumps(value, protocol=5)
    except Exception:  # lambdas, closures, local classes: cloudpickle handles them
        import cloudpickle

        try:
            return cloudpickle.dumps(value, protocol=5)
        except Exception as exc:
            raise TypeError(f"task arguments cannot be pickled: {exc}") from exc


def loads_args(blob: bytes | None) -> tuple[tuple, dict]:
    """Inverse of :func:`dumps_args`."""
    if blob is None:
        return (), {}
    value = pickle.loads(blob)
    if isinstance(value, list):
        return tuple(value[0]), value[1]
    return value, {}


def signal_label(sig: int) -> str:
    """``SIGTERM``, or ``signal 42`` for numbers without a name."""
    try:
        return _signal.Signals(sig).name
    except ValueError:
        return f"signal {sig}"


class _CalledAsDecorator(_types.ModuleType):
    """``pf.task`` is this module, and called it is the result cache's decorator
    (:func:`pipefarm.cache.key.task`): ``@pf.task(version="2")``."""

    def __call__(self, version: str | None = None, *, ignore: Any = ()) -> Any:
        from .cache.key import task

        return task(version, ignore=ignore)


_sys.modules[__name__].__class__ = _CalledAsDecorator
