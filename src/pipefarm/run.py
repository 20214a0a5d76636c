"""A run: a directory that holds tasks and their state, and the API to fill and execute it.

:class:`Run` is the whole Python API of a run as a user meets it (submit, execute, look, act),
so it stays one class in one module (~670 lines, half of them docstrings): its methods are
thin and hand the work to the store, the backends and observe/.
"""

from __future__ import annotations

import fcntl
import math
import os
import pickle
import socket
import time
from collections.abc import Callable, Iterable, Sequence
from itertools import repeat, tee
from operator import itemgetter
from pathlib import Path
from typing import Any

import msgspec

from .backends.base import Backend, Hooks, Summary, make_backend
from .backends.local import HaltPolicy, LocalBackend  # imported with Run, not inside execute()
from .cache.serve import CACHE_WORKER
from .cache.submission import (
    command_policy,
    hits_at_submission,
    keyed_columns,
    python_policy,
    task_keys,
)
from .errors import (
    PipefarmError,
    RetryRefused,
    RunLocked,
    SubmissionError,
    TaskFailed,
    TaskNotFinished,
)
from .execute.memory import parse_memory
from .progress import ProgressDisplay
from .states import State
from .store.base import check_private
from .store.sqlite import SQLiteStore
from .task import CMD, PY, CachePolicy, Spec, TaskOptions, dumps_args

#: How many task ids an :class:`Unrunnable` error names (then "...").
UNRUNNABLE_IDS_SHOWN = 10


class Unrunnable(PipefarmError):
    """Tasks ask for resources no worker of this backend has; nothing was run."""


#: columns of :meth:`Run.results`
RESULT_COLUMNS = (
    "task_id", "key", "state", "attempts", "exit_code", "result", "error", "started_at",
    "ended_at", "duration_s", "worker", "peak_memory", "outcome",
)


class _RunLock:
    """The one-coordinator-per-run lock: ``RUN/coordinator.lock`` with flock (one host)."""

    def __init__(self, run_dir: Path) -> None:
        self.path = run_dir / "coordinator.lock"
        self.fd: int | None = None

    def acquire(self) -> None:
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 200, 0).decode(errors="replace").strip() or "another process"
            os.close(fd)
            raise RunLocked(f"this run is being executed by {holder}; wait for it or stop it") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"pid {os.getpid()} on {socket.gethostname()}\n".encode(), 0)
        self.fd = fd

    def release(self) -> None:
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None


class Run:
    """A durable run. Create with :meth:`create`, reopen with :meth:`open`."""

    def __init__(self, path: str | os.PathLike[str], store: SQLiteStore) -> None:
        self.path = Path(path)
        self.store = store
        self._spec_cache: dict[tuple, tuple[int, Callable[..., Any]]] = {}
        #: opened despite a directory others can write (``Run.open(readonly=True)``)
        self.unsafe = False
        #: the topmost directory :meth:`create` made for this run (None: it was there): what
        #: a refused first submission removes so that it leaves nothing behind
        self.created: Path | None = None

    # --- opening ---------------------------------------------------------------------------------
    @classmethod
    def create(cls, path: str | os.PathLike[str], exist_ok: bool = False) -> Run:
        """Make a new run directory (private, 0700). Error if it exists, unless ``exist_ok``."""
        p = Path(path)
        if (p / "catalog.db").exists():
            if not exist_ok:
                raise FileExistsError(f"run {p} exists; open it with Run.open or pass exist_ok=True")
            return cls.open(p)
        top = p  # the topmost directory this call makes: what undoing it removes
        while not top.parent.exists() and top.parent != top:
            top = top.parent
        try:
            p.mkdir(mode=0o700, parents=True)
        except FileExistsError:
            # an existing directory keeps its mode: one others can write is refused (with
            # the fix), never silently made private
            if not p.is_dir():
                raise NotADirectoryError(f"{p} exists and is not a run directory") from None
            check_private(p)
            return cls(p, SQLiteStore(p))
        os.chmod(p, 0o700)  # mkdir's mode is filtered by the umask; make it exactly 0700
        run = cls(p, SQLiteStore(p))
        run.created = top
        return run

    @classmethod
    def open(cls, path: str | os.PathLike[str], *, readonly: bool = False) -> Run:
        """Open an existing run to inspect it or resume it.

        A directory other users can write raises :class:`UnsafeRun` (it may hold planted
        pickles). With ``readonly=True`` it is opened anyway with an
        :class:`~pipefarm.errors.UnsafeRunWarning` and ``run.unsafe`` set: for callers that
        unpickle nothing from it (the CLI's status, failures, logs).
        """
        p = Path(path)
        if not (p / "catalog.db").exists():
            raise FileNotFoundError(f"no run at {p} (no catalog.db there)")
        unsafe = check_private(p, warn=readonly)
        run = cls(p, SQLiteStore(p))
        run.unsafe = unsafe
        return run

    def close(self) -> None:
        self.store.close()

    def __enter__(self) -> Run:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"Run({str(self.path)!r})"

    # --- submission ------------------------------------------------------------------------------
    def _py_spec(self, fn: Callable[..., Any], opts: TaskOptions) -> int:
        if not callable(fn):
            raise SubmissionError(f"{fn!r} is not callable")
        # checked before the cache: a bad value never matches, and inf and None are one spec
        opts = msgspec.structs.replace(opts, timeout=checked_timeout(opts.timeout))
        key = (id(fn), opts.policy)
        hit = self._spec_cache.get(key)
        if hit is not None and hit[1] is fn:
            return hit[0]
        import cloudpickle

        try:
            payload = cloudpickle.dumps(fn, protocol=5)
            pickle.loads(payload)  # a function pickled by reference must resolve here
        except Exception as exc:
            raise SubmissionError(
                f"cannot use {getattr(fn, '__qualname__', fn)!r} as a task: {type(exc).__name__}: {exc}"
            ) from exc
        spec = _spec(PY, payload, getattr(fn, "__qualname__", type(fn).__name__), opts,
                     python_policy(fn, opts))
        sid = self.store.add_spec(spec)
        self._spec_cache[key] = (sid, fn)
        return sid

    def _add(self, sid: int, blobs: Iterable[bytes], keys: Iterable[Any] | None,
             opts: TaskOptions, cache_keys: list[bytes] | None = None) -> Sequence[int]:
        """Add one task per blob of spec ``sid`` with the per-task options of ``opts`` (and
        its result cache key, one per blob: the ones the cache holds are written ended, as
        ``cached`` attempts, when they wait for nothing)."""
        hits = None
        if cache_keys is not None and keys is None and not opts.after:
            policy = self.store.spec(sid).cache
            if policy is not None:
                hits = hits_at_submission(policy, cache_keys)
        return self.store.add_tasks(sid, blobs, keys=keys, priority=opts.priority,
                                    cost=opts.cost or 0.0, after=opts.after, cache_keys=cache_keys,
                                    cache_hits=hits, served_by=CACHE_WORKER)

    def map(
        self,
        fn: Callable[..., Any],
        *iterables: Iterable[Any],
        retries: int = 0,
        timeout: float | None = None,
        priority: int = 0,
        cost: float | None = None,
        after: Sequence[int] | None = None,
        keys: Iterable[str] | None = None,
        cpus: int = 1,
        gpus: int = 0,
        memory: int | str | None = None,
        backoff: float = 1.0,
        max_lost: int = 3,
        tags: Sequence[str] = (),
        time_request: float | None = None,
        keep_checkpoints: bool = False,
        cache: bool = False, cache_dir: str | None = None, cache_version: str | None = None,
        cache_ignore: Sequence[str] = (),
    ) -> Sequence[int]:
        """Add one task per element (or per zipped tuple of elements) of ``iterables``.

        Returns the task ids in input order (a ``range`` when every task is new). Options
        apply to every task: ``retries`` extra attempts after a failure or timeout, ``timeout``
        seconds per attempt (> 0; ``None`` or ``inf`` for none), ``priority`` (higher first),
        ``cost`` (higher first among equal priority), ``after`` ids that must succeed first,
        ``keys`` user names (one per task), ``time_request`` seconds each task needs (an
        array worker with less walltime left does not start it), ``keep_checkpoints`` keeps
        a task's checkpoints (``pf.checkpoint.save``) after it succeeds. ``cache=True``
        serves tasks from the result cache (:mod:`pipefarm.cache`; ``cache_dir``,
        ``cache_version``, ``cache_ignore``: see there).

        ``memory`` is each task's limit, bytes or a size such as ``"4G"``: a task past it is
        stopped and its attempt ends ``oom``, a failure retried like one (see
        :mod:`pipefarm.execute.memory`); every attempt records its peak memory.

        Keys are unique in a run, which makes keyed submission idempotent: a key that is
        already there adds nothing and gives back that task's id (the ids are then a
        :class:`~pipefarm.store.base.TaskIds` list whose ``added`` range holds the new ones),
        so a driver script that crashed can simply be run again. A key given twice in one
        call raises :class:`SubmissionError` naming it. If any element cannot be pickled
        nothing is written and :class:`SubmissionError` says which.
        """
        opts = TaskOptions(retries=retries, timeout=timeout, priority=priority, cost=cost,
                           after=tuple(after or ()), cpus=cpus, gpus=gpus, memory=checked_memory(memory),
                           backoff=backoff, max_lost=max_lost, tags=tuple(tags),
                           time_request=time_request, keep_checkpoints=keep_checkpoints,
                           cache=cache, cache_dir=cache_dir, cache_version=cache_version,
                           cache_ignore=tuple(cache_ignore))
        if not iterables:
            raise SubmissionError("map needs at least one iterable")
        sid = self._py_spec(fn, opts)
        iterables, ck = keyed_columns(self.store.spec(sid).cache, fn, iterables)
        try:
            if all(isinstance(x, (list, tuple, range)) for x in iterables) and (
                keys is None or isinstance(keys, (list, tuple, range))
            ):
                # re-iterable input: pickle in C at full speed; on a failure nothing was written,
                # so go again item by item with the cloudpickle fallback
                try:
                    return self._add(sid, map(pickle.dumps, zip(*iterables, strict=False),
                                              repeat(5)), keys, opts, ck)
                except (pickle.PicklingError, TypeError, AttributeError):
                    pass
            return self._add(sid, _pickled(zip(*iterables, strict=False)), keys, opts, ck)
        except (TypeError, ValueError) as exc:
            raise SubmissionError(f"{exc}; nothing was submitted") from exc

    def submit_task(
        self,
        fn: Callable[..., Any],
        args: tuple = (),
        kwargs: dict[str, Any] | None = None,
        *,
        key: str | None = None,
        retries: int = 0,
        timeout: float | None = None,
        priority: int = 0,
        cost: float | None = None,
        after: Sequence[int] | None = None,
        cpus: int = 1,
        gpus: int = 0,
        memory: int | str | None = None,
        backoff: float = 1.0,
        max_lost: int = 3,
        tags: Sequence[str] = (),
        time_request: float | None = None,
        keep_checkpoints: bool = False,
        cache: bool = False, cache_dir: str | None = None, cache_version: str | None = None,
        cache_ignore: Sequence[str] = (),
    ) -> int:
        """Add one task with options (as :meth:`map`'s); return its id.

        With ``key``: if a task of this run already has that key, nothing is added and its id
        is returned (see :meth:`map`).
        """
        opts = TaskOptions(retries=retries, timeout=timeout, priority=priority, cost=cost,
                           after=tuple(after or ()), cpus=cpus, gpus=gpus, memory=checked_memory(memory),
                           backoff=backoff, max_lost=max_lost, tags=tuple(tags),
                           time_request=time_request, keep_checkpoints=keep_checkpoints,
                           cache=cache, cache_dir=cache_dir, cache_version=cache_version,
                           cache_ignore=tuple(cache_ignore))
        sid = self._py_spec(fn, opts)
        policy = self.store.spec(sid).cache
        ck = None if policy is None else task_keys(policy, fn, [(tuple(args), kwargs or {})])
        try:
            ids = self._add(sid, [dumps_args(tuple(args), kwargs or {})], [key], opts, ck)
        except (TypeError, ValueError) as exc:
            raise SubmissionError(f"{exc}; nothing was submitted") from exc
        return ids[0]

    def submit(self, fn: Callable[..., Any], /, *args: Any, **kwargs: Any) -> int:
        """Add one task ``fn(*args, **kwargs)`` with default options; return its id."""
        return self.submit_task(fn, args, kwargs)

    def submit_cmd(
        self,
        command: Any,
        rows: Iterable[dict[str, str]] | None = None,
        *,
        keys: Iterable[str | None] | None = None,
        retries: int = 0,
        timeout: float | None = None,
        priority: int = 0,
        cost: float | None = None,
        after: Sequence[int] | None = None,
        cpus: int = 1,
        gpus: int = 0,
        memory: int | str | None = None,
        backoff: float = 1.0,
        max_lost: int = 3,
        tags: Sequence[str] = (),
        time_request: float | None = None,
        keep_checkpoints: bool = False,
        checkpoint_dir: bool = False,
        cache: bool = False, cache_dir: str | None = None, cache_env: Sequence[str] = (),
        cache_inputs: Sequence[str] = (),
    ) -> Sequence[int]:
        """Add command tasks: one per row of placeholder values (one task when ``rows`` is None).

        ``command`` is a :class:`~pipefarm.execute.template.Command`, an argv list, or a shell line
        (a ``str``). The template is checked against the first row before anything is written.
        ``keys`` work as in :meth:`map`: an existing key gives back its task's id.
        ``checkpoint_dir=True`` gives each attempt its task's checkpoint directory, kept
        across attempts, as ``$PIPEFARM_CHECKPOINT_DIR`` (created before it starts: two file
        system operations per attempt, so only for the tasks that ask).
        With ``cache=True`` a task's key is its argv, cwd, the values of the variables named
        in ``cache_env`` and the content of the files in ``cache_inputs`` (``{placeholders}``).
        """
        opts = TaskOptions(retries=retries, timeout=timeout, priority=priority, cost=cost,
                           after=tuple(after or ()), cpus=cpus, gpus=gpus, memory=checked_memory(memory),
                           backoff=backoff, max_lost=max_lost, tags=tuple(tags),
                           time_request=time_request, keep_checkpoints=keep_checkpoints,
                           checkpoint_dir=checkpoint_dir,
                           cache=cache, cache_dir=cache_dir, cache_env=tuple(cache_env),
                           cache_inputs=tuple(cache_inputs))
        return self.add_commands(command, rows, opts, keys=keys)

    def add_commands(
        self,
        command: Any,
        rows: Iterable[dict[str, str]] | None,
        options: TaskOptions,
        *,
        keys: Iterable[str | None] | None = None,
        key_template: Any = None,
    ) -> Sequence[int]:
        """:meth:`submit_cmd` with its options as one :class:`~pipefarm.task.TaskOptions`.

        ``key_template`` (a :class:`~pipefarm.execute.template.Command` whose first argument is
        the template, e.g. ``a{alpha}``) names each task from its own row instead of ``keys``:
        the key is rendered in the same pass that writes the row, so the rows stream from
        their source and are never all held in memory (``pipefarm submit --key``).
        """
        from .execute.template import (
            Command,
            TemplateError,
            encode_command,
            encode_values,
            placeholders,
            render,
        )

        if isinstance(command, str):
            command = Command(shell=command)
        elif isinstance(command, (list, tuple)):
            command = Command(argv=[str(a) for a in command])
        from .sources import checked

        # rows are checked as they stream into the one transaction below: a bad row (the first
        # one included) rolls everything back
        # --cache-input {name}: a value each row must have too
        wanted = placeholders(command) | (placeholders(Command(argv=list(options.cache_inputs)))
                                          if options.cache_inputs else set())
        values = checked(rows if rows is not None else [{}], wanted, command)
        blobs: Iterable[bytes] = map(encode_values, values)
        if key_template is not None:
            # one pass over the rows gives each its blob and its key; tee holds only the
            # pairs one side has read ahead of the other (no rows: they are dropped at once)
            pairs = ((encode_values(r), render(key_template, r)[0]) for r in values)
            left, right = tee(pairs)
            blobs, keys = map(itemgetter(0), left), map(itemgetter(1), right)
        spec = _spec(CMD, encode_command(command),
                     (command.shell or " ".join(command.argv or []))[:200], options,
                     command_policy(command, options))
        try:
            with self.store.transaction():
                sid = self.store.add_spec(spec)
                ids = self._add(sid, blobs, keys, options)
                if not len(ids):
                    raise ValueError("no tasks: the value source is empty")
                return ids
        except (TypeError, ValueError, TemplateError) as exc:
            raise SubmissionError(f"{exc}; nothing was submitted") from exc

    def undo_create(self) -> None:
        """Close the run and, after a refused first submission, remove the directory
        :meth:`create` made for it (and only that), so that a typo leaves nothing behind.
        A run that holds tasks is never removed."""
        created = self.created
        try:
            empty = created is not None and not any(self.store.counts().values())
        except Exception:  # cannot tell: keep it
            empty = False
        self.close()
        if empty:
            import shutil

            shutil.rmtree(created, ignore_errors=True)  # type: ignore[arg-type]

    # --- execution -------------------------------------------------------------------------------
    def execute(
        self,
        workers: int | None = None,
        backend: str | Backend = "local",
        progress: bool = True,
        on_progress: Callable[[dict[str, int]], None] | None = None,
        halt: str | None = None,
        dashboard: bool = False,
        **backend_options: Any,
    ) -> Summary:
        """Run every task that is not finished; return a :class:`~pipefarm.backends.base.Summary`.

        Resumes where an earlier execute stopped: leases of a dead coordinator are reaped at
        once. Ctrl-C stops cleanly (running tasks are released, not charged) and raises
        :class:`KeyboardInterrupt`; the run can be resumed.

        ``halt`` stops early when tasks fail, as GNU parallel's ``--halt`` does:
        ``"soon,fail=3"`` hands out no new task once 3 tasks failed for good in this call (the
        running ones finish), ``"now,fail=3"`` also stops the running ones (released, no retry
        spent), ``"soon,fail=10%"`` judges the share of the tasks ended in this call (from
        :data:`~pipefarm.backends.local.HALT_PERCENT_MIN_ENDED` ended tasks on). Then
        ``Summary.halted`` says why; execute again to go on.

        With the local backend, tasks that ask for more GPUs than it has raise
        :class:`Unrunnable` before anything runs.

        ``dashboard=True`` serves the web dashboard beside the run (port 8787, or any free
        port when it is taken), prints its URL, and stops it when execute returns. It is served
        by a child process at a lower priority, so that looking never slows the run.
        """
        if dashboard:
            from .observe.dashboard import start_process

            with start_process(self.path) as dash:
                print(f"pipefarm dashboard: {dash.url}", flush=True)
                return self.execute(workers, backend, progress, on_progress, halt,
                                    **backend_options)
        if halt is not None:
            policy = HaltPolicy.parse(halt)
            if backend == "sequential" or not (isinstance(backend, str)
                                               or hasattr(backend, "halt")):
                raise ValueError("halt= needs a backend with a coordinator (local, mpi, dask,"
                                 " ray), not sequential")
            if isinstance(backend, str):
                backend_options["halt"] = policy
            else:
                backend.halt = policy  # a backend object given: it applies to this call too
        be = make_backend(backend, workers=workers, **backend_options)
        display = None
        lock = _RunLock(self.path)
        try:
            if isinstance(be, LocalBackend):
                self._check_gpus(be.gpus_available)
            lock.acquire()
            self.store.drop_views_index()  # no commit of this run pays for a view's index
            # by the name asked for (a plugin's class may inherit a built-in's name)
            self.store.note_backend(backend if isinstance(backend, str)
                                    else getattr(be, "name", type(be).__name__))
            self.reap_orphans()
            self._take_back_blocks()
            callbacks: list[Callable[[dict[str, int]], None]] = []
            if progress:
                display = ProgressDisplay()
                callbacks.append(display)
            if on_progress is not None:
                callbacks.append(on_progress)

            def report(counts: dict[str, int]) -> None:
                for cb in callbacks:
                    cb(counts)

            hooks = Hooks(run_dir=str(self.path), on_progress=report if callbacks else None)
            summary = be.execute(self.store, hooks)
            if display is not None:
                display.close(summary.counts)
            return summary
        finally:
            if display is not None:
                display.close()
            lock.release()
            # a backend may hold engine resources from its making on, e.g. the mpi one's
            # worker ranks waiting for rank 0: refused before it ran, it lets them go
            close = getattr(be, "close", None)
            if close is not None:
                close()

    def _check_gpus(self, available: list[str] | None) -> None:
        """Refuse (:class:`Unrunnable`) when unfinished tasks need more GPUs than ``available``
        (None: the ones detected here): no worker could ever run them."""
        pending = [(sid, g) for sid, _, g in self.store.pending_spec_resources() if g > 0]
        if not pending:
            return
        if available is None:
            from .execute.gpus import detect_gpus

            available = detect_gpus()
        have = len(available)
        bad = {sid: g for sid, g in pending if g > have}
        if not bad:
            return
        ids = self.store.left_of_specs(list(bad), UNRUNNABLE_IDS_SHOWN + 1)
        shown = ", ".join(map(str, ids[:UNRUNNABLE_IDS_SHOWN])) + (
            ", ..." if len(ids) > UNRUNNABLE_IDS_SHOWN else "")
        need = max(bad.values())
        where = (f"{have} GPU(s) available ({', '.join(available)})" if have
                 else "no GPU available")
        raise Unrunnable(
            f"no worker can run task(s) {shown}: they need up to {need} GPU(s) each and this"
            f" host has {where}; give more with --gpus-available, or cancel them"
            f" (pipefarm cancel {self.path} --ids ...); nothing was run")

    def _take_back_blocks(self) -> None:
        """A run that array workers worked on: fold their journals and take back the blocks
        no live worker holds, so that this host runs them; refuse while workers are live."""
        if not (self.path / "fs").is_dir():
            return
        from .backends.array import recall
        from .store.shared_fs.tables import open_blocks

        recall(self)
        held = open_blocks(self.store)
        if held:
            raise RunLocked(
                f"{held} block(s) of this run are held by live array workers; wait for them"
                f" (pipefarm status {self.path}) or stop them first"
            )

    def reap_orphans(self) -> int:
        """Reap the leases of coordinators that are gone (the caller holds the run lock)."""
        live = self.store.workers_not_gone()
        return self.store.reap(workers=live) if live else 0

    def serve(self, port: int = 0, bind: str = "127.0.0.1", token: str | None = None) -> Any:
        """Serve this run's web dashboard and ``/metrics``; return a
        :class:`~pipefarm.observe.dashboard.Dashboard` (``.url``, ``.stop()``, a context
        manager; a notebook shows it as a link). ``port=0`` takes a free port; a ``bind``
        beyond loopback needs ``token``, which actions (retry, cancel) always need.

        It is served by a ``pipefarm serve`` child process that ends with this one: served
        from a thread of this process, its reads took the GIL from a run executed here (W1
        0.93x watched; from the child 1.00x, bench W11)."""
        from .observe.dashboard import start_process
        from .observe.dashboard.server import check_bind

        check_bind(bind, token)
        return start_process(self.path, port=port, bind=bind, token=token, fallback=False)

    def watch(self, interval: float = 1.0) -> Any:
        """This run's live view: a :class:`~pipefarm.observe.watch.RunWatch` (``.overview()``,
        ``.snapshot()``, a table of counts with a bar in a notebook, ``.run()`` for the
        terminal view of ``pipefarm watch``)."""
        from .observe.watch import RunWatch

        return RunWatch(self.path, interval)

    # --- the query side --------------------------------------------------------------------------
    def status(self) -> dict[str, int]:
        """Number of tasks in each state."""
        return self.store.counts()

    def __len__(self) -> int:
        return self.store.size()

    def tasks(self, state: str | None = None, ids: Iterable[int] | None = None,
              limit: int | None = None) -> list[Any]:
        """Task rows (see :class:`~pipefarm.store.base.TaskRow`)."""
        return self.store.tasks(state=state, ids=ids, limit=limit)

    def attempts(self, task: int) -> list[Any]:
        """Every attempt of a task, oldest first."""
        return self.store.attempts(task)

    def output(self, task: int, attempt: int | None = None, stream: str = "stdout") -> bytes:
        """What ``attempt`` (None: the latest) of ``task`` printed on ``stream`` (``"stdout"``
        or ``"stderr"``), byte-exact. Raises
        :class:`~pipefarm.execute.output.OutputUnavailable` when its log is missing or shorter
        than recorded."""
        from .execute.output import read_output

        return read_output(self.path, self.store.output_ref(task, attempt), stream)

    def follow_output(self, task: int, stream: str, write: Callable[[bytes], None]) -> None:
        """Pass what ``task`` prints on ``stream`` to ``write`` as it prints it, until its
        attempt ends (``pipefarm logs --follow``); a task not started yet is waited for, an
        ended one is written whole (see :func:`~pipefarm.execute.output.follow_output`)."""
        from .execute.output import follow_output

        def poll() -> tuple[str, str | None, int]:
            row = self.store.tasks(ids=[task])[0]
            return row.state, row.worker, row.attempts

        follow_output(self.path, task, stream, poll,
                      lambda attempt: self.store.output_ref(task, attempt), write)

    def result(self, task: int) -> Any:
        """The task's value; :class:`TaskFailed` if it ended without one."""
        state, blob, error = self.store.result(task)
        if state == "succeeded":
            return pickle.loads(blob) if blob is not None else None
        if state in ("failed", "skipped", "cancelled"):
            cause = None
            if blob is not None:
                try:
                    cause = pickle.loads(blob)
                except Exception:
                    cause = None
            if error is None and state == "skipped":
                error = "a task it depends on did not succeed"  # TaskFailed says "skipped: "
            raise TaskFailed(task, state, error, cause if isinstance(cause, BaseException) else None)
        raise TaskNotFinished(f"task {task} is {state}: no result yet")

    def results(self, *, as_objects: bool = False) -> Any:
        """One row per task as a ``pyarrow.Table`` (columns :data:`RESULT_COLUMNS`).

        The ``result`` column holds the data, never its ``repr``: a typed column (ints,
        floats, strings, structs for dicts, lists, ...) when Arrow gives every value back
        unchanged, type included; otherwise a ``binary`` column of each value's pickle, marked
        by the field's metadata ``{b"pipefarm.encoding": b"pickle"}`` (decode a value with
        ``pickle.loads``). Tasks without a result (not succeeded, or that returned None) hold
        null.

        With ``as_objects=True``: a list of row dicts instead of a table, whose ``result`` is
        the value itself, whatever its type.
        """
        from .observe.results import result_rows, results_table

        if as_objects:
            cols, _ = result_rows(self)
            return [dict(zip(RESULT_COLUMNS, row, strict=True))
                    for row in zip(*(cols[c] for c in RESULT_COLUMNS), strict=True)]
        return results_table(self)

    # --- user actions ----------------------------------------------------------------------------
    def retry(self, ids: Iterable[int] | None = None, *, failed_only: bool = True,
              force: bool = False) -> int:
        """Give failed tasks (or exactly ``ids``) a new attempt budget; return how many.

        With ``ids``, tasks that succeeded are run again only with ``force=True`` (their
        result is replaced; the earlier attempt stays in :meth:`attempts`); without it,
        :class:`~pipefarm.errors.RetryRefused` says how many of them were asked for and
        nothing changes.
        """
        if ids is None:
            return self.store.retry(None, failed_only=failed_only)
        wanted = sorted(set(ids))
        with self.store.transaction():  # checked and revived in one transaction
            done = 0 if force else sum(
                1 for t in self.store.tasks(ids=wanted) if t.state == State.SUCCEEDED.label
            )
            if done:
                raise RetryRefused(done, len(wanted))
            return self.store.retry(wanted, failed_only=failed_only)

    def cancel(self, ids: Iterable[int] | None = None) -> int:
        """Cancel unfinished tasks (all, or ``ids``); their dependents are skipped."""
        return self.store.cancel(ids)

    def use_lease(self, seconds: float) -> None:
        """Seconds without a heartbeat before an array worker's blocks are taken over, for
        the workers of this run's next export (fixed at its first; ``pipefarm array --lease``)."""
        self.store.lease_s = seconds

    def wait_idle(self, timeout: float = 10.0) -> None:
        """Wait until no coordinator holds the run (for tests and scripts)."""
        deadline = time.monotonic() + timeout
        lock = _RunLock(self.path)
        while True:
            try:
                lock.acquire()
                lock.release()
                return
            except RunLocked:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.05)


def _spec(kind: str, payload: bytes, name: str, opts: TaskOptions,
          cache: CachePolicy | None = None) -> Spec:
    """A task spec from the options every submission takes, checked."""
    if opts.retries < 0:
        raise SubmissionError("retries must be >= 0")
    timeout = checked_timeout(opts.timeout)
    if opts.max_lost < 1:
        raise SubmissionError("max_lost must be >= 1")
    return Spec(kind=kind, payload=payload, max_attempts=opts.retries + 1, timeout=timeout,
                backoff=opts.backoff, max_lost=opts.max_lost, resources=opts.resources,
                tags=opts.tags, name=name, time_request=checked_time_request(opts.time_request),
                keep_checkpoints=bool(opts.keep_checkpoints),
                checkpoint_dir=bool(opts.checkpoint_dir), cache=cache)


def checked_time_request(seconds: float | None) -> float | None:
    """A task's ``time_request`` as stored: seconds > 0 (finite), or None for none.

    Raises :class:`SubmissionError` for zero, negative, infinite or non-numeric values.
    """
    if seconds is None:
        return None
    try:
        value = float(seconds)
    except (TypeError, ValueError):
        raise SubmissionError(
            f"time_request must be a number of seconds, not {seconds!r}") from None
    if not 0 < value < math.inf:  # nan compares false too
        raise SubmissionError(f"time_request must be > 0 seconds and finite, not {seconds!r}"
                              " (None: the task fits any worker)")
    return value


def checked_memory(memory: int | str | None) -> int | None:
    """A task's memory limit as stored: bytes (an int), or a size such as ``"4G"`` (see
    :func:`~pipefarm.execute.memory.parse_memory`); None for none.

    Raises :class:`SubmissionError` with the reason for anything else.
    """
    if memory is None:
        return None
    try:
        return parse_memory(memory)
    except ValueError as exc:
        raise SubmissionError(f"memory: {exc}") from None


def checked_timeout(timeout: float | None) -> float | None:
    """A task timeout as stored: seconds > 0, or None for none (``inf`` means none too).

    Raises :class:`SubmissionError` for ``nan``, zero, negative values and non-numbers.
    """
    if timeout is None:
        return None
    try:
        value = float(timeout)
    except (TypeError, ValueError):
        raise SubmissionError(f"timeout must be a number of seconds, not {timeout!r}") from None
    if not value > 0:  # written so that nan, which compares false to everything, fails too
        raise SubmissionError(
            f"timeout must be > 0 seconds, not {timeout!r} (None or inf: no timeout)"
        )
    return None if math.isinf(value) else value


def _pickled(rows: Iterable[tuple]) -> Iterable[bytes]:
    """Pickle each argument tuple: plain pickle fast path, cloudpickle fallback per item."""
    dumps = pickle.dumps
    for args in rows:
        try:
            yield dumps(args, 5)
        except Exception:
            yield dumps_args(args, {})
