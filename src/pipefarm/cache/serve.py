"""Serving tasks from the result cache where they would run, and writing successes back.

Two users, one lookup (:class:`Lookup`):

- the coordinator (local, mpi, dask, ray) hands every batch it leases to
  :meth:`LeaseCache.sort` before dispatch: hits come back as rows to commit with outcome
  ``cached`` (in bulk, with the coordinator's next commit), misses go to the workers, and a
  miss whose key another task of the run is computing right now is held until that one ends
  (:meth:`LeaseCache.committed`: its success serves the held tasks, its failure lets them run);
- the sequential backend and the array workers wrap their runner in :class:`CachingRunner`,
  which looks a lease up just before running it and writes its success back.

A Python task's key comes from the catalog (computed at submission) on the coordinator and is
computed again from the lease's arguments elsewhere (same function); a command's key is computed
here, when the task is about to run, so that an input file a dependency wrote is hashed as it is
then.
"""

from __future__ import annotations

import pickle
import socket
import time
from collections.abc import Callable, Iterable, Sequence
from typing import Any

from ..states import Outcome
from ..task import CMD, INLINE_RESULT_MAX, PY, CachePolicy, Finished, Lease, Spec, loads_args
from .entries import ResultCache
from .key import CacheKeyError, command_key, python_key

#: the worker an attempt served by the coordinator's cache lookup is recorded under
CACHE_WORKER = f"{socket.gethostname().split('.')[0]}-cache"


class Lookup:
    """Opened cache directories and the keys of leases, shared by both users."""

    def __init__(self) -> None:
        self._caches: dict[str, ResultCache] = {}
        self._fns: dict[int, Any] = {}
        self._cmds: dict[int, Any] = {}

    def cache(self, policy: CachePolicy) -> ResultCache:
        c = self._caches.get(policy.dir)
        if c is None:
            c = self._caches[policy.dir] = ResultCache(policy.dir)
        return c

    def key(self, spec: Spec, lease: Lease) -> bytes | None:
        """The lease's cache key, computed from its arguments (None: it runs uncached, e.g. an
        input file is missing or an argument type has no hook in this process)."""
        policy = spec.cache
        assert policy is not None
        try:
            if spec.kind == PY:
                fn = None
                if policy.ignore:  # arguments are named by the function's signature
                    fn = self._fns.get(lease.spec)
                    if fn is None:
                        fn = self._fns[lease.spec] = pickle.loads(spec.payload)
                args, kwargs = loads_args(lease.args)
                return python_key(policy, args, kwargs, fn)
            if spec.kind == CMD:
                from ..execute.template import (
                    Command,
                    decode_command,
                    decode_values,
                    render,
                    render_cwd,
                )

                cmd = self._cmds.get(lease.spec)
                if cmd is None:
                    cmd = self._cmds[lease.spec] = decode_command(spec.payload)
                values = decode_values(lease.args) if lease.args else {}
                inputs = [render(Command(argv=[t]), values)[0] for t in policy.inputs]
                return command_key(policy, render(cmd, values), render_cwd(cmd, values),
                                   dict(cmd.env), inputs)
        except (CacheKeyError, KeyError, ValueError, pickle.UnpicklingError, AttributeError,
                ImportError):
            return None
        return None

    def get(self, policy: CachePolicy, key: bytes) -> tuple[bool, bytes | None]:
        cache = self.cache(policy)
        hit = cache.get(key)
        if not hit[0]:
            cache.refresh(force=False)  # another run may have written it since
            hit = cache.get(key)
        return hit

    def close(self) -> None:
        for c in self._caches.values():
            c.close()
        self._caches.clear()


class LeaseCache(Lookup):
    """The coordinator's cache lookups (see the module docstring). ``spec_of`` gives a
    spec by id; ``keys_of`` the stored keys of Python tasks by id."""

    def __init__(self, spec_of: Callable[[int], Spec],
                 keys_of: Callable[[Sequence[int]], dict[int, bytes]]) -> None:
        super().__init__()
        self.spec_of = spec_of
        self.keys_of = keys_of
        self.owner: dict[bytes, int] = {}  # key -> the task computing it now
        self.held: dict[bytes, list[Lease]] = {}  # key -> tasks waiting for that one
        self.pending: dict[int, tuple[CachePolicy, bytes]] = {}  # task -> where its result goes
        self.hits = 0  # tasks served from the cache by this coordinator

    def sort(self, leases: list[Lease]) -> tuple[list[Lease], list[tuple], list[Finished]]:
        """Split leased tasks: ``(to dispatch, hit rows, large hits)``. Hit rows are
        :data:`~pipefarm.task.SuccessRow` tuples to commit with outcome ``cached``; large
        hits are :class:`Finished` (their result goes to a file). Held tasks are in none of
        them (they stay leased)."""
        cached = [lz for lz in leases if self.spec_of(lz.spec).cache is not None]
        if not cached:
            return leases, [], []
        stored = self.keys_of([lz.task for lz in cached if self.spec_of(lz.spec).kind == PY])
        out: list[Lease] = [lz for lz in leases if self.spec_of(lz.spec).cache is None]
        rows: list[tuple] = []
        large: list[Finished] = []
        now = time.time()
        for lz in cached:
            spec = self.spec_of(lz.spec)
            policy = spec.cache
            assert policy is not None
            key = stored.get(lz.task) if spec.kind == PY else self.key(spec, lz)
            if key is None:
                out.append(lz)
                continue
            hit, result = self.get(policy, key)
            if hit:
                self._serve(lz, result, now, rows, large)
            elif key in self.owner:
                self.held.setdefault(key, []).append(lz)
            else:
                self.owner[key] = lz.task
                self.pending[lz.task] = (policy, key)
                out.append(lz)
        return out, rows, large

    def _serve(self, lz: Lease, result: bytes | None, now: float, rows: list[tuple],
               large: list[Finished]) -> None:
        self.hits += 1
        if result is not None and len(result) > INLINE_RESULT_MAX:
            large.append(Finished(lz.task, lz.token, int(Outcome.CACHED), now, now, result,
                                  attempt=lz.attempt))
        else:
            rows.append((lz.task, lz.token, lz.attempt, now, now, result, CACHE_WORKER))

    def committed(self, ok: Iterable[Sequence[Any]], others: Iterable[Finished]
                  ) -> tuple[list[tuple], list[Finished], list[int]]:
        """Outcomes just committed: write successes to the cache, serve the tasks held behind
        them; returns ``(hit rows, large hits, tasks to release)`` (held behind a failure)."""
        if not self.pending:
            return [], [], []
        puts: dict[str, list[tuple[bytes, str, bytes | None]]] = {}
        rows: list[tuple] = []
        large: list[Finished] = []
        free: list[int] = []
        now = time.time()
        done = [(r[0], True, r[5]) for r in ok] + [
            (f.task, f.outcome == Outcome.SUCCEEDED, f.result) for f in others]
        for task, success, result in done:
            where = self.pending.pop(task, None)
            if where is None:
                continue
            policy, key = where
            self.owner.pop(key, None)
            waiting = self.held.pop(key, [])
            if success:
                puts.setdefault(policy.dir, []).append((key, policy.name, result))
                for lz in waiting:
                    self._serve(lz, result, now, rows, large)
            else:
                free += [lz.task for lz in waiting]
        for path, items in puts.items():
            self._caches[path].put(items)
        return rows, large, free

    def dropped(self, tasks: Iterable[int]) -> list[int]:
        """Leases handed back without an outcome (released, revoked): the tasks held behind
        any of them, to release too (one of them will compute the key)."""
        free: list[int] = []
        for task in tasks:
            where = self.pending.pop(task, None)
            if where is not None:
                self.owner.pop(where[1], None)
                free += [lz.task for lz in self.held.pop(where[1], [])]
        return free


class CachingRunner(Lookup):
    """A runner (``lease -> Finished``) that serves leases from the cache and writes
    successes back: what the sequential backend and the array workers run. ``specs`` is the
    runner's table of specs by id, filled before each call."""

    def __init__(self, runner: Callable[..., Finished], specs: dict[int, Spec]) -> None:
        super().__init__()
        self.runner = runner
        self.specs = specs
        self.hits = 0

    def __call__(self, lease: Lease, *args: Any, **kwargs: Any) -> Finished:
        spec = self.specs.get(lease.spec)
        policy = spec.cache if spec is not None else None
        if spec is None or policy is None:
            return self.runner(lease, *args, **kwargs)
        key = self.key(spec, lease)
        if key is not None:
            hit, result = self.get(policy, key)
            if hit:
                self.hits += 1
                now = time.time()
                return Finished(lease.task, lease.token, int(Outcome.CACHED), now, now, result,
                                attempt=lease.attempt)
        fin = self.runner(lease, *args, **kwargs)
        if key is not None and fin.outcome == Outcome.SUCCEEDED:
            self.cache(policy).put([(key, policy.name, fin.result)])
        return fin

    def __getattr__(self, name: str) -> Any:  # the wrapped runner's other methods (sync, ...)
        if name == "runner":
            raise AttributeError(name)
        return getattr(self.runner, name)
