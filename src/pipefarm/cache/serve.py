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
import secrets
import socket
import time
from collections.abc import Callable, Iterable, Sequence
from itertools import repeat
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
        # task -> its key, for the tasks dispatched that own their key: their success goes
        # into the cache of ``single`` (the one policy seen), or of ``policy_of[task]`` once
        # several were seen (``mixed``)
        self.pending: dict[int, bytes] = {}
        self.single: CachePolicy | None = None
        self.mixed = False
        self.policy_of: dict[int, CachePolicy] = {}
        self.hits = 0  # tasks served from the cache by this coordinator

    def _own(self, tasks: list[int], keys: list[bytes], policy: CachePolicy) -> None:
        """``tasks`` will compute ``keys`` (dispatched; a twin leased meanwhile waits)."""
        if self.single is None:
            self.single = policy
        elif not self.mixed and policy != self.single:
            self.mixed = True
            self.policy_of = dict.fromkeys(self.pending, self.single)
        if self.mixed:
            self.policy_of.update(zip(tasks, repeat(policy)))
        self.owner.update(zip(keys, tasks, strict=True))
        self.pending.update(zip(tasks, keys, strict=True))

    def _release(self, task: int) -> tuple[CachePolicy, bytes] | None:
        """Forget that ``task`` computes its key: ``(policy, key)``, None if it did not."""
        key = self.pending.pop(task, None)
        if key is None:
            return None
        policy = self.policy_of.pop(task) if self.mixed else self.single
        assert policy is not None
        return policy, key

    def prepass(self, ready: list[tuple[int, int, int, bytes]]
                ) -> tuple[list[tuple], list[Finished], list[int]]:
        """Look up every ready task that has a stored key, ``(task, attempt, spec, key)``,
        at once, before any is leased: ``(hit rows, large hits, held tasks)``. The misses are
        left ready, known (leased later, they are dispatched without a second lookup)."""
        rows: list[tuple] = []
        large: list[Finished] = []
        held: list[int] = []
        by_policy: dict[CachePolicy, list[tuple[int, int, int, bytes]]] = {}
        policies = {sid: self.spec_of(sid).cache for sid in {r[2] for r in ready}}
        if len(policies) == 1:  # one spec (the common case): no loop
            (policy,) = policies.values()
            if policy is not None:
                by_policy[policy] = ready
        else:
            for r in ready:
                policy = policies[r[2]]
                if policy is not None:
                    by_policy.setdefault(policy, []).append(r)
        now, base = time.time(), secrets.randbits(62)
        for policy, group in by_policy.items():
            cache = self.cache(policy)
            keys = [r[3] for r in group]
            if (not any(map(cache.index.__contains__, keys)) and len(set(keys)) == len(keys)
                    and self.owner.keys().isdisjoint(keys)):
                # none known, none twice (a first run): each owns its key, in bulk
                self._own([r[0] for r in group], keys, policy)
                continue
            found = cache.get_many(keys)
            for (task, attempt, sid, key), (hit, result) in zip(group, found, strict=True):
                if hit:
                    if result is None or len(result) <= INLINE_RESULT_MAX:  # _serve, inlined:
                        rows.append((task, base ^ task, attempt + 1, now, now, result,  # no Lease
                                     CACHE_WORKER))
                    else:
                        self._serve(Lease(task, base ^ task, attempt + 1, sid, None), result,
                                    now, rows, large)
                elif key in self.owner:
                    self.held.setdefault(key, []).append(
                        Lease(task, base ^ task, attempt + 1, sid, None))
                    held.append(task)
                else:  # leased later, it is dispatched without a second lookup
                    self._own([task], [key], policy)
        self.hits += len(rows)
        return rows, large, held

    def sort(self, leases: list[Lease]) -> tuple[list[Lease], list[tuple], list[Finished]]:
        """Split leased tasks: ``(to dispatch, hit rows, large hits)``. Hit rows are
        :data:`~pipefarm.task.SuccessRow` tuples to commit with outcome ``cached``; large
        hits are :class:`Finished` (their result goes to a file). Held tasks are in none of
        them (they stay leased)."""
        if all(map(self.pending.__contains__, [lz.task for lz in leases])):
            return leases, [], []  # looked up in the prepass: they own their keys
        specs = {sid: self.spec_of(sid) for sid in {lz.spec for lz in leases}}
        if all(sp.cache is None for sp in specs.values()):
            return leases, [], []
        out = [lz for lz in leases if specs[lz.spec].cache is None]
        rows: list[tuple] = []
        large: list[Finished] = []
        now = time.time()
        stored = self.keys_of([lz.task for lz in leases if specs[lz.spec].kind == PY
                               and specs[lz.spec].cache is not None
                               and lz.task not in self.pending])
        by_policy: dict[CachePolicy, list[tuple[Lease, bytes]]] = {}
        for lz in leases:
            spec = specs[lz.spec]
            if spec.cache is None:
                continue
            if lz.task in self.pending:  # missed in the prepass, and owns its key
                out.append(lz)
                continue
            key = stored.get(lz.task) if spec.kind == PY else self.key(spec, lz)
            if key is None:
                out.append(lz)  # no key: it runs, uncached
            else:
                by_policy.setdefault(spec.cache, []).append((lz, key))
        for policy, group in by_policy.items():
            cache = self.cache(policy)
            found = cache.get_many([k for _, k in group])
            if not all(h for h, _ in found):  # another run may have written some since
                cache.refresh(force=False)
                found = cache.get_many([k for _, k in group])
            for (lz, key), (hit, result) in zip(group, found, strict=True):
                if hit:
                    self._serve(lz, result, now, rows, large)
                elif key in self.owner:
                    self.held.setdefault(key, []).append(lz)
                else:
                    self._own([lz.task], [key], policy)
                    out.append(lz)
        return out, rows, large

    def _serve(self, lz: Lease, result: bytes | None, now: float, rows: list[tuple],
               large: list[Finished]) -> None:
        self.hits += 1
        if result is not None and len(result) > INLINE_RESULT_MAX:  # a result file, as always
            large.append(Finished(lz.task, lz.token, int(Outcome.CACHED), now, now, result,
                                  attempt=lz.attempt))
        else:
            rows.append((lz.task, lz.token, lz.attempt, now, now, result, CACHE_WORKER))

    def committed(self, ok: Iterable[Sequence[Any]], others: Iterable[Finished]
                  ) -> tuple[list[tuple], list[Finished], list[int]]:
        """Outcomes just committed: write successes to the cache, serve the tasks held behind
        them; returns ``(hit rows, large hits, tasks to release)`` (held behind a failure).

        A key stays owned after its success: the next task with it finds it in the cache
        before it would look at its owner (one dict operation less per task, W1)."""
        pend = self.pending
        if not pend:
            return [], [], []
        ok = list(ok)
        keys = list(map(pend.pop, [r[0] for r in ok], repeat(None)))
        done: list[tuple[tuple[CachePolicy, bytes], bytes | None]] = []
        if self.mixed:  # successes by the cache they go to
            done = [((self.policy_of.pop(r[0]), k), r[5])
                    for r, k in zip(ok, keys, strict=True) if k is not None]
        elif self.single is not None and not others:  # the common case: one cache, no loop
            got = [(k, r[5]) for k, r in zip(keys, ok, strict=True) if k is not None]
            if got:
                self.cache(self.single).add(self.single.name, [k for k, _ in got],
                                            [r for _, r in got])
            if self.held:
                done = [((self.single, k), r) for k, r in got]
        else:
            done = [((self.single, k), r[5]) for k, r in zip(keys, ok, strict=True)
                    if k is not None]
        failed: list[tuple[CachePolicy, bytes]] = []
        for f in others:
            w = self._release(f.task)
            if w is not None:
                (done.append((w, f.result)) if f.outcome == Outcome.SUCCEEDED
                 else failed.append(w))
        if self.mixed or others:
            by_policy: dict[CachePolicy, tuple[list[bytes], list[bytes | None]]] = {}
            for (policy, key), result in done:
                ks, rs = by_policy.setdefault(policy, ([], []))
                ks.append(key)
                rs.append(result)
            for policy, (ks, rs) in by_policy.items():
                self.cache(policy).add(policy.name, ks, rs)
        rows: list[tuple] = []
        large: list[Finished] = []
        free: list[int] = []
        if self.held:
            now = time.time()
            for (_, key), result in done:
                for lz in self.held.pop(key, ()):
                    self._serve(lz, result, now, rows, large)
        for _, key in failed:
            self.owner.pop(key, None)
            free += [lz.task for lz in self.held.pop(key, ())]
        return rows, large, free

    def dropped(self, tasks: Iterable[int]) -> list[int]:
        """Leases handed back without an outcome (released, revoked): the tasks held behind
        any of them, to release too (one of them will compute the key)."""
        free: list[int] = []
        for task in tasks:
            where = self._release(task)
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
