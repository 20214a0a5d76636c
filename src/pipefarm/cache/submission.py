"""What submission does for the result cache: a spec's :class:`~pipefarm.task.CachePolicy`,
and the key of every Python task, computed (and an argument the key cannot encode refused)
before anything is written."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable
from itertools import repeat
from typing import Any

from ..errors import SubmissionError
from ..task import CachePolicy, TaskOptions
from .entries import ResultCache, default_dir, prepare
from .key import CacheKeyError, function_identity, positional_keys, python_keys


def _checked_dir(opts: TaskOptions) -> str:
    """The cache directory of ``opts``, created, and refused when others can write it."""
    path = default_dir(opts.cache_dir)
    try:
        prepare(path)  # creates it private, or refuses it with the fix
    except OSError as exc:
        raise SubmissionError(f"cannot use {path} as the result cache: {exc}") from exc
    return path


def python_policy(fn: Callable[..., Any], opts: TaskOptions) -> CachePolicy | None:
    """The cache policy of a Python spec (None: ``cache`` is off)."""
    if not opts.cache:
        return None
    if opts.cache_env or opts.cache_inputs:
        raise SubmissionError("cache_env and cache_inputs are for command tasks; a Python"
                              " task's key is its function and arguments")
    marked = getattr(fn, "__pipefarm_task__", None)
    version = opts.cache_version if opts.cache_version is not None else (
        marked[0] if marked else None)
    ignore = tuple(opts.cache_ignore) + (tuple(marked[1]) if marked else ())
    try:
        name, identity = function_identity(fn, version)
    except CacheKeyError as exc:
        raise SubmissionError(f"{exc}; nothing was submitted") from None
    return CachePolicy(dir=_checked_dir(opts), name=name, identity=identity,
                       ignore=tuple(dict.fromkeys(ignore)))


def command_policy(command: Any, opts: TaskOptions) -> CachePolicy | None:
    """The cache policy of the spec of ``command`` (a
    :class:`~pipefarm.execute.template.Command`; None: the cache is off)."""
    if not opts.cache:
        return None
    if opts.cache_version is not None or opts.cache_ignore:
        raise SubmissionError("cache_version and cache_ignore are for Python tasks; a"
                              " command's key is its argv, cache_env and cache_inputs")
    for name in opts.cache_env:
        if not name or "=" in name:
            raise SubmissionError(f"--cache-env {name!r}: give a variable's name, not K=V")
    program = (command.argv or (command.shell or "").split() or [""])[0]
    return CachePolicy(dir=_checked_dir(opts), name=os.path.basename(program),
                       env=tuple(opts.cache_env), inputs=tuple(opts.cache_inputs))


def task_keys(policy: CachePolicy, fn: Callable[..., Any],
              calls: Iterable[tuple[tuple, dict[str, Any]]]) -> list[bytes]:
    """The key of each ``(args, kwargs)``; :class:`SubmissionError` names the first task whose
    arguments the key cannot encode."""
    calls = list(calls)
    try:
        return python_keys(policy, calls, fn)
    except CacheKeyError as exc:
        for i, (args, kwargs) in enumerate(calls):  # which task: the error names the argument
            try:
                python_keys(policy, [(args, kwargs)], fn)
            except CacheKeyError:
                raise SubmissionError(f"task {i + 1} of this submission: {exc}; nothing was"
                                      " submitted") from None
        raise SubmissionError(f"{exc}; nothing was submitted") from None


def keyed_columns(policy: CachePolicy | None, fn: Callable[..., Any],
                  iterables: tuple[Iterable[Any], ...]
                  ) -> tuple[tuple[Iterable[Any], ...], list[bytes] | None]:
    """``run.map``'s input and the key of each task (None: the cache is off); with the
    cache on, the input is read once into lists (it is walked twice: keys, then pickles)."""
    if policy is None:
        return iterables, None
    columns = tuple(list(x) for x in iterables)
    rows = list(zip(*columns, strict=False))
    try:
        return columns, positional_keys(policy, rows, fn)
    except CacheKeyError:
        return columns, task_keys(policy, fn, zip(rows, repeat({})))  # names the task


def hits_at_submission(policy: CachePolicy, keys: list[bytes]
                       ) -> list[tuple[bool, bytes | None]] | None:
    """What the cache holds for each key, ``(hit, pickled result)``, for tasks that may be
    written ended at submission (None: it holds none of them, the common first run). Tasks
    it does not hold yet are looked up again where they would run."""
    with ResultCache(policy.dir) as cache:
        if not any(map(cache.index.__contains__, keys)):
            return None
        return cache.get_many(keys)
