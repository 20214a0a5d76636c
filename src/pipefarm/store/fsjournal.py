"""The shared-filesystem store: many hosts, one run directory, no server, no cross-host locks.

Workers on other hosts never open ``catalog.db``. The process that holds the catalog (the
submitter, ``pipefarm array``'s element 0, ``pipefarm status``) *exports* ready tasks as immutable
blocks and *folds* what the workers journal back into the catalog (:mod:`.fold`). Workers only
create small files, append to their own journal and touch their own heartbeat file.

Layout (under ``RUN/fs``)
-------------------------
``config``                   msgpack :class:`Config` (``lease_s``), written once.
``specs/<spec>.spec``        msgpack :class:`~pipefarm.task.Spec`, written once, before any block
                             that uses it.
``blocks/<block>.blk``       msgpack :class:`BlockFile`: immutable, written tmp + rename. Entries
                             ``(task, spec, args, attempt_base, lost_base)`` in claim order.
``wave``                     msgpack :class:`Wave`, replaced by rename at every export: the highest
                             block id offered, whether the exporter expects to offer more
                             (``final``) and the resource class of blocks that need more than one
                             cpu or any gpu.
``claims/<block>.<epoch>``   created with ``O_CREAT|O_EXCL`` (atomic on NFSv3+, Lustre, GPFS);
                             content: the holder's worker id. Epoch 0 is the first claim; a
                             takeover creates the next epoch. Content ``!...`` is a *tombstone*
                             (the catalog holder fenced the block and took its tasks back).
``claims/<block>.<epoch>.done``      the holder of that epoch settled every task it adopted.
``claims/<block>.<epoch>.released``  the holder handed the block back (drain, walltime): anyone
                             may take the next epoch at once, without waiting for the lease.
``claims/<block>.<epoch>.ask<n>``    a steal request to the holder of that epoch (content: the
                             thief's id); ``n`` is the cut slot it asks to fill.
``claims/<block>.<epoch>.cut<n>``    cut slot ``n`` of that epoch, filled exactly once by an
                             exclusive hard link of a complete file: a :class:`Cut` (the holder
                             gave tasks away to a child block) or a marker ``!none``,
                             ``!withdrawn``, ``!sealed``, ``!void`` (see Splits).
``blocks/<child>.blk``       a child block made by a split (ids from :data:`CHILD_BASE`),
                             written by the giving holder; it names its parent claim and slot.
``journal/<worker>.log``     one append-only framed journal per worker (:mod:`.journal`).
``hb/<worker>``              the worker's heartbeat: its *mtime*, set with ``os.utime(path, None)``
                             so that the file server stamps it.
``fold/<n>``                 the fold lock (see :class:`~pipefarm.store.fold.FoldLock`).
Nothing is ever deleted by the protocol, so no name is ever reused and no delete can race with a
create. Nothing is ever locked with flock/fcntl, and nothing lists or stats every task.

Tokens
------
A lease's token is ``token_of(block, epoch, task) = (block << 20 | epoch) XOR mix(task)``
(``mix`` a fixed bijection of 62-bit integers): the claim file *is* the token, so the
compare-and-set is natural, and tokens still differ per lease. A task's current token in the catalog is the token of
the latest claim that *adopted* it (below); an ``Ended`` with any other token is stale: it is
recorded as a ``stale`` attempt and never becomes the task's result.

Claiming
--------
* Fresh blocks: a worker keeps a cursor over block ids ``1..wave.blocks`` and creates
  ``claims/<b>.0``; ``EEXIST`` means someone else has it. It lists ``claims/`` once per claim
  (one readdir, not one call per task) to skip claimed blocks and to see markers.
* Released blocks (``.released`` on the latest epoch) are taken at once: ``claims/<b>.<e+1>``.
* Stale blocks: at most every ``lease_s / 4`` a worker touches its own heartbeat file, stats it,
  and looks at every live holder's heartbeat mtime (one stat per holder, not per block). A
  holder is dead when its mtime has not changed for ``lease_s`` of the claimer's monotonic
  clock, or for ``lease_s / 2`` while it is also more than ``lease_s`` older than the claimer's
  own freshly touched mtime (:class:`Liveness`). Where the file server stamps ``utime(NULL)``
  (NFS) both mtimes are on the server's clock, so expiry is prompt and node clock skew does
  not matter; where a client stamps (or a node's clock is off: ``faketime`` rewrites
  ``utime(NULL)`` too), the no-change rule still expires dead holders and spares live ones,
  since a live holder's mtime changes every ``lease_s / 4``. A missing heartbeat file counts
  as an mtime that never changes; an empty claim file (its writer died between create and
  write) is judged by the claim file's own mtime.
* A takeover reads the journals of the holders of every earlier epoch of that block (their ids
  are in the claim files; a task of a block is only ever run under a claim of that block, so no
  other journal can hold its records), and *adopts* each task that is not settled: settled means
  an ``Ended`` (succeeded, failed, timed out) under the epoch that last adopted it. A task whose
  attempt was in flight (started, never ended) counts as ``lost``; it is adopted only while its
  ``lost_base`` plus the losses recorded in the block stay under the spec's ``max_lost``.
  The adopter journals a :class:`Claimed` record (adopted tasks, lost tasks) before it runs
  anything; the fold applies it *before* the other records of the same pass, so a zombie's late
  ``Ended`` of an adopted task is stale.

Running
-------
One journal append per task: the ``Ended`` of the previous task and the ``Started`` of the next
go out in one write (``Started`` must be on disk before the task runs, so that a task that kills
its worker every time spends its lost budget). The journal is fsynced at most every
``fsync_interval`` seconds and before every ``.done``/``.released`` marker. Large results go to
``RUN/results/<task>-<token>.pkl`` (fsynced, renamed) before the ``Ended`` that names them.

Zombies: before starting a task, a worker stats ``claims/<b>.<e+1>`` when its last heartbeat
touch is older than ``lease_s / 2`` (monotonic clock, which runs on through SIGSTOP), when the
heartbeat thread saw a gap, or at least every ``lease_s / 4``. If the next epoch exists it drops
the block; what it journals late is stale. (A takeover can only happen when the holder's
heartbeat is ``lease_s`` old, so a holder whose touches are recent needs no stat: metadata stays
far below one operation per task.) On NFS a negative lookup may be cached for up to
``acdirmax`` seconds, which delays a zombie's discovery, never the correctness of the results.

Drain: :func:`work_loop` stops claiming when its ``stop`` event is set (or one of its
``drain_signals`` arrives), finishes the running task, journals ``Released`` for the unstarted
tasks of its block and creates ``claims/<b>.<e>.released``: the block's remaining tasks stay in
the block, the next claimant adopts them at once, and no budget is spent.

Splits (work stealing)
----------------------
A worker with nothing to claim (no released, stale or fresh block) asks the holder of a busy
block (``<b>.<e>``, chosen at random, not done, not released) for the unstarted tail of it:

1. The thief creates ``claims/<b>.<e>.ask<n>`` exclusively, ``n`` the first cut slot its
   listing saw empty (none is asked while another request there is unanswered).
2. The holder looks for ``ask<n>`` (its next slot) every :data:`STEAL_CHECK_S` from its
   heartbeat thread, so a long task does not delay the answer: one ``open`` a second, and
   nothing per task. It gives about half of its unstarted tasks (the running one counted on its
   side), if that is worth :data:`MIN_SPLIT_S` of its measured task time; else it answers
   ``!none``.
3. To give, it writes the child block file (a new id ``CHILD_BASE + (root << 8) + k``, ``k``
   allocated by the exclusive link of the file, ``root`` the exported block of the family:
   workers allocate ids without the catalog), creates ``claims/<child>.0`` with the *thief's*
   id, and then links the :class:`Cut` into ``cut<n>``. **The link is the agreement**: if it
   wins, the given tasks leave the holder's list (under a lock shared with its run loop, which
   marks a task as started before it can be given) and are never run by the holder; if the
   slot was filled first (``!withdrawn`` by a thief that gave up, ``!sealed`` by a takeover)
   nothing was given, and ``claims/<child>.0.done`` buries the child.
4. The thief reads ``cut<n>``: a :class:`Cut` naming it means ``claims/<child>.0`` is its claim
   (journaled as ``Claimed(child, 0)``, then run like any block). It waits at most
   ``patience_s`` (at most ``lease_s / 2``), then withdraws by filling the slot with
   ``!withdrawn``: a race with the holder's answer is decided by that one link.

A child is an ordinary block from then on: heartbeats, takeovers, drains and further splits
work on it unchanged, and ``finished`` waits for children too. What keeps it exactly-once:

* **Sealing.** Whoever creates a newer epoch of a block (a worker's takeover, the catalog's
  fence) first fills the first empty cut slot of every earlier epoch with ``!sealed``, then
  reads every cut made before: a superseded holder that does not know it yet can give nothing
  away after the seal, and everything it did give is known. A takeover adopts no task that a
  cut gave away (the holder's death after agreeing keeps the split); the catalog hands those
  tasks to the child (:func:`~pipefarm.store.fold.register_child`) instead of taking them back.
* **Voiding.** Whoever takes a child over (epoch 1 and up: its thief died, or released it)
  first checks that the parent's cut slot names it, filling an empty slot with ``!void``: a
  child whose split was never agreed (the holder died between writing it and linking the cut)
  is buried, never run. The thief's death after agreeing keeps the split: the child's tasks are
  adopted by its taker, and the parent's never are.
* **Zombies** are as before: a holder stats ``<b>.<e+1>`` before its next task when its
  heartbeat may have lapsed, and a failed cut on a ``!sealed`` slot tells it at once. What a
  superseded holder still runs is stale; it never runs a task it gave away.

Metadata: a split costs ~12 operations (ask, a few answer polls, the child file, its claim,
the cut, the thief's claim record); only idle workers ask, and holders decline tails worth
less than :data:`MIN_SPLIT_S`, so no-op tasks are almost never split.

The catalog side (folding, exporting waves, fencing stale blocks, the fold lock) lives in
:mod:`pipefarm.store.fold`. :class:`FsJournalStore` puts both sides behind the
:class:`~pipefarm.store.base.Store` interface (see its docstring for where it differs).
"""

from __future__ import annotations

import contextlib
import os
import random
import secrets
import signal
import socket
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import msgspec

from ..states import Outcome, State
from ..task import Finished, Lease, Resources, Spec
from .base import DEFAULT_LEASE_S, AttemptRow, Store, TaskRow, check_private
from .journal import (
    Claimed,
    Ended,
    JournalWriter,
    Record,
    Released,
    Started,
    decode_record,
    encode_record,
    read_journal,
)
from .sqlite import INLINE_RESULT_MAX, SQLiteStore, StoreError

# --------------------------------------------------------------------------------------- tokens
EPOCH_BITS = 20
MAX_EPOCH = (1 << EPOCH_BITS) - 1
_MASK62 = (1 << 62) - 1
_MIX = 0x9E3779B97F4A7C15 & _MASK62  # odd: multiplying by it is a bijection mod 2**62


def _mix(task: int) -> int:
    return (task * _MIX) & _MASK62


def token_of(block: int, epoch: int, task: int) -> int:
    """The lease token of ``task`` adopted by claim ``<block>.<epoch>``: distinct per task and
    per claim, and ``(block, epoch)`` can be read back from it with the task id."""
    return ((block << EPOCH_BITS) | epoch) ^ _mix(task)


def split_token(token: int, task: int) -> tuple[int, int]:
    """``(block, epoch)`` of ``task``'s lease token (garbage for a token that is not one)."""
    v = token ^ _mix(task)
    return v >> EPOCH_BITS, v & MAX_EPOCH


#: outcomes that settle a task in its block (the next claimant skips it)
FINAL_OUTCOMES = frozenset(
    {int(Outcome.SUCCEEDED), int(Outcome.FAILED), int(Outcome.TIMED_OUT), int(Outcome.LOST)}
)


# -------------------------------------------------------------------------------------- records
# one record union and codec for every journal: journal.py's (Claimed included)
encode = encode_record
decode = decode_record


# ----------------------------------------------------------------------------------- splits
#: Ids of the blocks that splits make. Workers allocate them without the catalog, so they live
#: far above anything an exporter reaches: ``CHILD_BASE + (root << CHILD_BITS) + k`` for the
#: ``k``-th split (1 .. :data:`MAX_SPLITS`) of the family of exported block ``root`` (< 2**32).
#: Tokens stay below 2**62: ``(CHILD_BASE * 2) << EPOCH_BITS`` is 2**61.
CHILD_BASE = 1 << 40
CHILD_BITS = 8
MAX_SPLITS = (1 << CHILD_BITS) - 1

#: How often a worker that holds a block looks for a steal request: one ``open`` of a name that
#: usually does not exist. Once a second is what the metadata budget allows (W7, 8 workers on
#: 100,000 no-op tasks: each holds blocks ~3.5 s, so ~30 opens in all, 0.0003 per task) and
#: what a thief waits at most before its answer, next to tasks that it would run for seconds.
STEAL_CHECK_S = 1.0
#: A thief withdraws its request when no answer came for this long (the holder is stopped, or
#: too slow to answer) and asks elsewhere; 5 answering periods. With a short lease both shrink
#: (see :class:`FsWorker`): a thief waiting for an answer takes no dead holder's block over.
ASK_PATIENCE_S = 5 * STEAL_CHECK_S
#: The least work, in seconds, a holder gives away in one split (by its measured mean task
#: duration): a split and the thief's claim of the child cost ~12 metadata operations, ~10 ms
#: on an NFS server that answers in ~1 ms; 1 s of work keeps that at 1 %. Below it a thief is
#: told "none" (the holder finishes the tail itself sooner than a split would pay off).
MIN_SPLIT_S = 1.0
#: After "none", a thief leaves that holder alone for this long (its tail only shrinks).
DECLINED_BACKOFF_S = 5.0


def is_child(block: int) -> bool:
    """Whether ``block`` was made by a split (not by the exporter)."""
    return block >= CHILD_BASE


def root_of(block: int) -> int:
    """The exported block a (child) block's family started from."""
    return (block - CHILD_BASE) >> CHILD_BITS if block >= CHILD_BASE else block


def child_id(root: int, k: int) -> int:
    return CHILD_BASE + (root << CHILD_BITS) + k


class Cut(msgspec.Struct, array_like=True):
    """``claims/<b>.<e>.cut<n>``: the holder of ``<b>.<e>`` gave ``tasks`` (never started by
    it) to the new block ``child``, claimed at epoch 0 for ``thief``. The file's existence is
    the agreement; a slot whose content starts with ``!`` is no cut (see the module docstring)."""

    child: int
    tasks: list[int]
    thief: str


def encode_cut(cut: Cut) -> bytes:
    """The content of a cut slot that records ``cut`` (a msgpack array: never starts with ``!``)."""
    return msgspec.msgpack.encode(cut)


def read_cut(data: bytes | None) -> Cut | None:
    """The cut in a cut slot's content; None for a marker (``!...``), nothing, or garbage."""
    if not data or data[:1] == b"!":
        return None
    try:
        return msgspec.msgpack.decode(data, type=Cut)
    except msgspec.DecodeError:
        return None


# ------------------------------------------------------------------------------ files on disk
class BlockFile(msgspec.Struct, array_like=True):
    """An immutable block: tasks in claim order, all of one resource class.

    A block made by a split names where it came from: cut slot ``cut`` of claim
    ``<parent>.<parent_epoch>`` (``parent`` 0: an exported block).
    """

    block: int
    cpus: int
    gpus: int
    entries: list[tuple[int, int, bytes | None, int, int]]  # task, spec, args, attempt, lost
    parent: int = 0
    parent_epoch: int = 0
    cut: int = 0


class Wave(msgspec.Struct):
    """What the exporter offers: blocks ``1..blocks``."""

    blocks: int = 0
    final: bool = False  # the exporter has nothing more to offer right now
    seq: int = 0
    classes: list[tuple[int, int, int, int]] = []  # (first, last, cpus, gpus), non-default only


class Config(msgspec.Struct):
    lease_s: float = DEFAULT_LEASE_S
    version: int = 1


class Layout:
    """Paths of one run directory's shared-filesystem protocol."""

    def __init__(self, run_dir: str | os.PathLike[str]) -> None:
        self.run = os.fspath(run_dir)
        self.fs = os.path.join(self.run, "fs")
        self.specs = os.path.join(self.fs, "specs")
        self.blocks = os.path.join(self.fs, "blocks")
        self.claims = os.path.join(self.fs, "claims")
        self.journal = os.path.join(self.fs, "journal")
        self.hb = os.path.join(self.fs, "hb")
        self.foldlock = os.path.join(self.fs, "fold")
        self.results = os.path.join(self.run, "results")
        self.wave = os.path.join(self.fs, "wave")
        self.config = os.path.join(self.fs, "config")

    def make(self) -> None:
        for d in (self.fs, self.specs, self.blocks, self.claims, self.journal, self.hb,
                  self.foldlock):
            os.makedirs(d, mode=0o700, exist_ok=True)

    def claim(self, block: int, epoch: int) -> str:
        return f"{self.claims}/{block}.{epoch}"

    def block(self, block: int) -> str:
        return f"{self.blocks}/{block}.blk"

    def spec(self, spec: int) -> str:
        return f"{self.specs}/{spec}.spec"

    def journal_of(self, worker: str) -> str:
        return f"{self.journal}/{worker}.log"

    def hb_of(self, worker: str) -> str:
        return f"{self.hb}/{worker}"


def new_worker_id(prefix: str = "") -> str:
    """``[prefix-]host-pid-random``: unique per process, safe as a file name."""
    host = socket.gethostname().split(".")[0] or "host"
    host = "".join(c if c.isalnum() or c in "-_" else "_" for c in host)
    return f"{prefix}{host}-{os.getpid()}-{secrets.token_hex(3)}"


def check_worker_id(worker: str) -> None:
    if (
        not worker
        or worker[0] in ".!-"
        or any(not (c.isalnum() or c in "-_.@+") for c in worker)
        or len(worker) > 200
    ):
        raise ValueError(f"worker id {worker!r} is not usable as a file name")


def write_atomic(path: str, data: bytes, *, fsync: bool = True) -> None:
    """Write ``path`` as a whole: a temporary file in the same directory, then rename."""
    tmp = f"{path}.tmp.{os.getpid()}.{secrets.token_hex(3)}"
    try:
        _write_new(tmp, data, fsync)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    os.replace(tmp, path)


def _write_new(path: str, data: bytes, fsync: bool) -> None:
    """Create ``path`` (it must not exist) holding ``data``; fsync'd when asked."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view):]
        if fsync:
            os.fsync(fd)
    finally:
        os.close(fd)


def create_excl(path: str, content: bytes = b"") -> bool:
    """Create ``path`` exclusively with ``content``; False when it already exists."""
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
    except FileExistsError:
        return False
    try:
        if content:
            os.write(fd, content)
    finally:
        os.close(fd)
    return True


def write_link(path: str, data: bytes, *, fsync: bool = False) -> bool:
    """Create ``path`` with ``data`` as a whole, exclusively: False when it already exists.

    The content is written to a temporary name first and hard-linked into place (``link`` is
    atomic and exclusive on NFS, Lustre and GPFS, as O_EXCL is), so a reader never sees a
    half-written file, and a writer that dies leaves either nothing or everything. A link whose
    reply was lost (NFS retransmits it and gets EEXIST) is recognised by the link count.
    """
    d, name = os.path.split(path)
    tmp = os.path.join(d, f".tmp-{name}-{os.getpid()}-{secrets.token_hex(3)}")
    try:
        _write_new(tmp, data, fsync)
        try:
            os.link(tmp, path)
            return True
        except FileExistsError:
            return os.stat(tmp).st_nlink > 1
    finally:
        with contextlib.suppress(OSError):
            os.unlink(tmp)


def read_small(path: str, limit: int = 1 << 16) -> bytes | None:
    """The first ``limit`` bytes of ``path``; None when it does not exist."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError:
        return None
    try:
        return os.read(fd, limit)
    finally:
        os.close(fd)


def read_all(path: str) -> bytes:
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        parts = []
        while True:
            chunk = os.read(fd, 1 << 20)
            if not chunk:
                return b"".join(parts)
            parts.append(chunk)
    finally:
        os.close(fd)


def to_ns(t: float) -> int:
    return int(round(t * 1e9))


def touch(path: str, now: float | None = None) -> None:
    """Set ``path``'s mtime: the file server's clock, or ``now`` (simulated clocks in tests)."""
    for _ in range(2):
        try:
            if now is None:
                os.utime(path, None)
            else:
                os.utime(path, ns=(to_ns(now), to_ns(now)))
            return
        except FileNotFoundError:
            with contextlib.suppress(FileExistsError):
                os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600))
    raise FileNotFoundError(path)


def mtime_ns(path: str) -> int | None:
    try:
        return os.stat(path).st_mtime_ns
    except FileNotFoundError:
        return None


def stale(mtime: int | None, ref_ns: int, lease_s: float) -> bool:
    """Whether a heartbeat stamped ``mtime`` has expired by ``ref_ns`` (both ns, one clock)."""
    return mtime is None or mtime < ref_ns - to_ns(lease_s)


class Liveness:
    """Judges heartbeat files by their mtimes, trusting no clock but our own monotonic one.

    A heartbeat is dead when its mtime has not changed for ``lease_s`` seconds of *our*
    monotonic clock, or for ``lease_s / 2`` seconds while it is also more than ``lease_s``
    older than ``ref_ns`` (our own heartbeat, freshly touched: the file server's clock where
    it stamps mtimes). The first rule keeps no dead holder alive whatever its clock stamped
    (clients that stamp mtimes themselves, or a node whose clock runs ahead); the second makes
    expiry prompt where the server stamps, and still never takes a block from a live holder
    whose stamps lag (it touches its file every ``lease_s / 4``: the mtime keeps changing).
    A heartbeat seen for the first time is never dead.
    """

    def __init__(self, lease_s: float) -> None:
        self.lease_s = lease_s
        self._seen: dict[str, tuple[int | None, float]] = {}

    def dead(self, key: str, mtime: int | None, ref_ns: int | Callable[[], int]) -> bool:
        """``ref_ns`` may be a function: it is called only when needed."""
        mono = time.monotonic()
        prev = self._seen.get(key)
        if prev is None or prev[0] != mtime:
            self._seen[key] = (mtime, mono)
            return False
        unchanged = mono - prev[1]
        if unchanged >= self.lease_s:
            return True
        if unchanged < self.lease_s / 2:
            return False
        return stale(mtime, ref_ns() if callable(ref_ns) else ref_ns, self.lease_s)

    def forget(self, key: str) -> None:
        self._seen.pop(key, None)


def read_config(layout: Layout) -> Config | None:
    data = read_small(layout.config)
    return None if not data else msgspec.msgpack.decode(data, type=Config)


def write_config(layout: Layout, lease_s: float) -> None:
    if not os.path.exists(layout.config):
        write_atomic(layout.config, msgspec.msgpack.encode(Config(lease_s=float(lease_s))))


def read_wave(layout: Layout) -> Wave:
    data = read_small(layout.wave, 1 << 26)
    return Wave() if not data else msgspec.msgpack.decode(data, type=Wave)


@dataclass
class BlockState:
    """What ``claims/`` says about a block: its latest epoch and that epoch's markers, the
    steal requests of the latest epoch (``asks``) and the cut slots of every epoch."""

    epoch: int
    done: bool = False
    released: bool = False
    asks: set[int] = field(default_factory=set)
    cuts: dict[int, set[int]] = field(default_factory=dict)  # epoch -> filled cut slots

    def next_slot(self) -> int:
        """The first cut slot of the latest epoch that the listing saw empty."""
        got = self.cuts.get(self.epoch, set())
        return max(got) + 1 if got else 0


def list_claims(layout: Layout) -> dict[int, BlockState]:
    """One readdir of ``claims/``: every claimed block's latest epoch and markers."""
    latest: dict[int, BlockState] = {}
    marks: list[tuple[int, int, str]] = []
    for name in os.listdir(layout.claims):
        parts = name.split(".")
        try:
            b, e = int(parts[0]), int(parts[1])
        except (ValueError, IndexError):
            continue
        if len(parts) == 2:
            st = latest.get(b)
            if st is None:
                latest[b] = BlockState(e)
            elif e > st.epoch:
                st.epoch = e
        elif len(parts) == 3:
            marks.append((b, e, parts[2]))
    for b, e, kind in marks:
        st = latest.get(b)
        if st is None:
            continue
        if kind.startswith("cut") and kind[3:].isdigit():
            st.cuts.setdefault(e, set()).add(int(kind[3:]))
        elif st.epoch != e:
            continue
        elif kind == "done":
            st.done = True
        elif kind == "released":
            st.released = True
        elif kind.startswith("ask") and kind[3:].isdigit():
            st.asks.add(int(kind[3:]))
    return latest


def holder_of(layout: Layout, block: int, epoch: int) -> str | None:
    """The worker id in ``claims/<block>.<epoch>``: '' while being written, None if absent."""
    data = read_small(layout.claim(block, epoch), 4096)
    return None if data is None else data.decode(errors="replace").strip()


def result_file_for(layout: Layout, task: int, token: int, blob: bytes) -> str:
    """Write a large result under ``RUN/results``; return its path relative to the run."""
    os.makedirs(layout.results, mode=0o700, exist_ok=True)
    name = f"{task}-{token & ((1 << 64) - 1):x}.pkl"
    write_atomic(os.path.join(layout.results, name), blob)
    return f"results/{name}"


def ended_record(layout: Layout, f: Finished) -> Ended:
    """The journal record of an attempt's end (a large result goes to a file first)."""
    result, rfile = f.result, None
    if result is not None and len(result) > INLINE_RESULT_MAX:
        rfile = result_file_for(layout, f.task, f.token, result)
        result = None
    return Ended(
        task=f.task, token=f.token, attempt=f.attempt, outcome=int(f.outcome),
        started_at=f.started_at, ended_at=f.ended_at, result=result, result_file=rfile,
        error=f.error, exit_code=f.exit_code, note=f.note, output=f.output,
    )


# ------------------------------------------------------------------------------- worker side
@dataclass
class Entry:
    """One task of a held block, ready to run."""

    task: int
    spec: int
    args: bytes | None
    attempt: int
    lost: int = 0  # lost attempts so far: the block's base plus those in its history


@dataclass
class HeldBlock:
    """A block this worker holds under claim ``<block>.<epoch>``."""

    block: int
    epoch: int
    entries: list[Entry]
    cpus: int = 1
    gpus: int = 0
    asked: int = 0  # the steal request (cut slot) this holder answers next

    def token(self, task: int) -> int:
        return token_of(self.block, self.epoch, task)


@dataclass
class WorkStats:
    """What one worker did (returned by :func:`work_loop`)."""

    worker: str = ""
    blocks: int = 0  # claims taken (fresh, takeovers and children got by asking)
    takeovers: int = 0  # of which takeovers of stale or released blocks
    tasks: int = 0  # attempts run
    released: int = 0  # unstarted tasks handed back
    abandoned: int = 0  # blocks dropped because a newer epoch appeared (zombie)
    verifies: int = 0  # stats of claims/<b>.<e+1>
    scans: int = 0
    asks: int = 0  # steal requests made
    stolen: int = 0  # child blocks got by asking
    given: int = 0  # splits agreed to ...
    given_tasks: int = 0  # ... and the tasks they gave away
    steal_checks: int = 0  # looks for a steal request (one open each)
    exit: str = ""


def seal_cuts(layout: Layout, block: int, upto: int, me: str) -> list[Cut]:
    """Close the cut slots of epochs ``0..upto`` of ``block``; return every cut made in them.

    Called by whoever just created a newer epoch of ``block`` (a takeover, the catalog's fence),
    before it reads the block's history: each epoch's first empty slot gets ``!sealed``, so a
    holder that does not know yet that it was superseded can give nothing away any more, and
    every cut it did make is in the returned list.
    """
    cuts: list[Cut] = []
    mark = f"!sealed {me}".encode()
    for e in range(upto + 1):
        n = 0
        while True:
            slot = f"{layout.claim(block, e)}.cut{n}"
            if write_link(slot, mark):
                break
            data = read_small(slot)
            if data is None:
                continue  # cannot happen (nothing is deleted); try the link again
            if data.startswith(b"!sealed"):
                break
            cut = read_cut(data)
            if cut is not None:
                cuts.append(cut)
            n += 1
    return cuts


def child_committed(layout: Layout, bf: BlockFile, me: str) -> bool:
    """Whether block ``bf`` (a split's child) was really given away: the parent's cut slot
    names it. An empty slot is voided first (``!void``): a holder that died half-way through a
    split, or is still in it, can then no longer complete it."""
    slot = f"{layout.claim(bf.parent, bf.parent_epoch)}.cut{bf.cut}"
    if write_link(slot, f"!void {me}".encode()):
        return False
    cut = read_cut(read_small(slot))
    return cut is not None and cut.child == bf.block


class FsWorker:
    """The worker side of the protocol: claims blocks, journals, heartbeats, splits.

    Use :func:`work_loop` for the whole loop; this class is its parts, for callers (the CLI,
    backends) that need their own loop. Not thread-safe except :meth:`beat` and
    :meth:`answer_steal` (the heartbeat thread's), which share the held block's entries with
    :meth:`run_block` under a lock.
    """

    def __init__(
        self,
        run_dir: str | os.PathLike[str],
        worker_id: str | None = None,
        *,
        lease_s: float | None = None,
        resources: Resources | None = None,
        fsync: bool = True,
        fsync_interval: float = 0.5,
        steal: bool = True,
    ) -> None:
        self.layout = Layout(run_dir)
        self.steal = steal  # ask busy holders for the tails of their blocks when idle
        self.id = worker_id or new_worker_id()
        check_worker_id(self.id)
        cfg = read_config(self.layout)
        self.lease_s = float(lease_s if lease_s is not None else (cfg.lease_s if cfg else DEFAULT_LEASE_S))
        self.resources = resources
        self.fsync = fsync
        self.fsync_interval = fsync_interval
        self.specs: dict[int, Spec] = {}
        self.journal: JournalWriter | None = None
        self.stats = WorkStats(worker=self.id)
        self._hb = self.layout.hb_of(self.id)
        self._wave = Wave()
        self._wave_at = float("-inf")
        self._cursor = 1
        self._holders: dict[tuple[int, int], str] = {}
        self._taken: set[tuple[int, int]] = set()  # claims made by (or for) this process
        self._last_touch = float("-inf")  # monotonic time a successful touch began
        self._gap = False  # the heartbeat lapsed for a while: verify before the next task
        self._last_verify = time.monotonic()
        self._last_stale_scan = time.monotonic()  # the first stale scan after lease_s / 4
        self._listing: dict[int, BlockState] = {}
        self._live = Liveness(self.lease_s)
        # the held block, shared between run_block and answer_steal (the heartbeat thread)
        self._lock = threading.Lock()
        self._held: HeldBlock | None = None
        self._next = 0  # index in _held.entries of the next task to start
        self._running_since: float | None = None  # monotonic start of the running task
        self._mean_s: float | None = None  # measured task duration (moving average)
        # this worker as a thief: its pending steal request (block, epoch, slot, since)
        self._ask: tuple[int, int, int, float] | None = None
        self._declined: dict[tuple[int, int], float] = {}
        self._rng = random.Random(self.id)
        #: how often the held block's steal requests are looked at, and how long a thief
        #: waits for an answer: at most lease_s / 2, so that waiting never delays the
        #: takeover of a dead holder's block much (it expires after lease_s / 2 at the least)
        self.check_s = min(STEAL_CHECK_S, self.lease_s / 4)
        self.patience_s = min(ASK_PATIENCE_S, max(self.lease_s / 2, 4 * self.check_s))

    # --- lifecycle -------------------------------------------------------------------------------
    def register(self) -> None:
        """Create the heartbeat file and open (and repair) this worker's journal.

        Refuses (:class:`~pipefarm.errors.UnsafeRun`) a run directory that other users can
        write: workers unpickle the callables and arguments found there.
        """
        check_private(self.layout.run)
        for d in (self.layout.hb, self.layout.journal):
            os.makedirs(d, mode=0o700, exist_ok=True)
        self.beat()
        self.journal = JournalWriter(
            self.layout.journal_of(self.id), fsync=self.fsync, fsync_interval=self.fsync_interval
        )

    def close(self) -> None:
        if self.journal is not None:
            self.journal.close()

    def beat(self) -> None:
        """Touch the heartbeat file (the file server stamps it). Safe from another thread."""
        t0 = time.monotonic()
        touch(self._hb)
        if t0 - self._last_touch > self.lease_s / 2 and self._last_touch != float("-inf"):
            self._gap = True
        self._last_touch = t0

    def _ref_ns(self) -> int:
        """Touch our own heartbeat and read back its mtime: "now" on the file server's clock."""
        self.beat()
        m = mtime_ns(self._hb)
        return m if m is not None else time.time_ns()

    # --- claiming --------------------------------------------------------------------------------
    def _read_wave(self, max_age: float = 0.1) -> Wave:
        mono = time.monotonic()
        if mono - self._wave_at >= max_age:
            self._wave = read_wave(self.layout)
            self._wave_at = mono
        return self._wave

    def _fits(self, block: int, wave: Wave) -> bool:
        if self.resources is None:
            return True
        block = root_of(block)  # a child has its family's resource class
        for first, last, cpus, gpus in wave.classes:
            if first <= block <= last:
                return cpus <= self.resources.cpus and gpus <= self.resources.gpus
        return self.resources.cpus >= 1

    def _holder(self, block: int, epoch: int) -> str:
        key = (block, epoch)
        h = self._holders.get(key)
        if h is None:
            h = holder_of(self.layout, block, epoch) or ""
            if h:
                self._holders[key] = h  # a written claim never changes
        return h

    @property
    def asking(self) -> bool:
        """Whether a steal request of this worker awaits its answer."""
        return self._ask is not None

    def claim_block(self) -> HeldBlock | None:
        """Take one block: released ones first, then (at most every ``lease_s / 4``) stale
        ones, then fresh ones; with none of those, ask a busy holder for the tail of its block
        (the answer is picked up by a later call). While a request is pending, only its answer
        is looked at. None when nothing is claimable now."""
        self.stats.scans += 1
        listing = self._listing = list_claims(self.layout)
        if self._ask is not None:
            return self._poll_ask(listing)
        for b in sorted(listing):
            st = listing[b]
            if st.released and not st.done:
                blk = self._take_over(b, st.epoch)
                if blk is not None:
                    return blk
        mono = time.monotonic()
        if mono - self._last_stale_scan >= self.lease_s / 4:
            self._last_stale_scan = mono
            blk = self._stale_scan(listing)
            if blk is not None:
                return blk
        while self._cursor in listing:
            self._cursor += 1
        wave = self._wave
        if self._cursor > wave.blocks:
            wave = self._read_wave()
        for b in range(self._cursor, wave.blocks + 1):
            if b in listing or not self._fits(b, wave):
                continue
            if create_excl(self.layout.claim(b, 0), self.id.encode()):
                self._taken.add((b, 0))
                return self._start_fresh(b)
            listing[b] = BlockState(0)
        if self.steal:
            self._ask_for_work(listing)
        return None

    def _stale_scan(self, listing: dict[int, BlockState]) -> HeldBlock | None:
        ref = None
        beats: dict[str, bool] = {}
        for b in sorted(listing):
            st = listing[b]
            if st.done or st.released or (b, st.epoch) in self._taken:
                continue
            holder = self._holder(b, st.epoch)
            if holder.startswith("!"):
                continue  # fenced by the catalog holder
            if ref is None:
                ref = self._ref_ns()
            if holder == self.id:
                dead = True  # a claim of ours from an earlier life (same id, restarted)
            elif not holder:  # its claimer died between create and write: the file's own mtime
                path = self.layout.claim(b, st.epoch)
                dead = self._live.dead(path, mtime_ns(path), ref)
            else:
                if holder not in beats:
                    beats[holder] = self._live.dead(holder, mtime_ns(self.layout.hb_of(holder)), ref)
                dead = beats[holder]
            if dead:
                blk = self._take_over(b, st.epoch)
                if blk is not None:
                    return blk
        return None

    # --- splits: this worker as a thief ----------------------------------------------------------
    def _ask_for_work(self, listing: dict[int, BlockState]) -> None:
        """Ask the holder of a busy block (chosen at random) for the unstarted tail of it:
        create ``claims/<b>.<e>.ask<n>`` for the first cut slot ``n`` still empty."""
        mono = time.monotonic()
        wave = self._wave
        candidates = []
        for b, st in listing.items():
            key = (b, st.epoch)
            if st.done or st.released or key in self._taken:
                continue
            if mono - self._declined.get(key, float("-inf")) < DECLINED_BACKOFF_S:
                continue
            n = st.next_slot()
            if any(a >= n for a in st.asks):
                continue  # another thief's request is pending there
            if self._fits(b, wave):
                candidates.append((b, st.epoch, n))
        if not candidates:
            return
        b, e, n = self._rng.choice(candidates)
        holder = self._holder(b, e)
        if not holder or holder.startswith("!") or holder == self.id:
            self._declined[(b, e)] = mono
            return
        if create_excl(f"{self.layout.claim(b, e)}.ask{n}", self.id.encode()):
            self._ask = (b, e, n, mono)
            self.stats.asks += 1

    def _poll_ask(self, listing: dict[int, BlockState]) -> HeldBlock | None:
        """The answer to our steal request: the child block it gave us, or None (no answer
        yet, "none", or withdrawn: after ``patience_s``, or when the block ended)."""
        assert self._ask is not None
        b, e, n, since = self._ask
        slot = f"{self.layout.claim(b, e)}.cut{n}"
        data = read_small(slot)
        if data is None:
            st = listing.get(b)
            ended = st is None or st.epoch != e or st.done or st.released
            if not ended and time.monotonic() - since < self.patience_s:
                return None
            if write_link(slot, f"!withdrawn {self.id}".encode()):
                self._ask = None
                self._declined[(b, e)] = time.monotonic()
                return None
            data = read_small(slot)  # answered at the last moment
        self._ask = None
        cut = read_cut(data)
        if cut is None or cut.thief != self.id:
            self._declined[(b, e)] = time.monotonic()
            return None
        # the holder created claims/<child>.0 for us before it committed the cut
        self._taken.add((cut.child, 0))
        blk = self._start_fresh(cut.child)
        if blk is not None:
            self.stats.stolen += 1
        return blk

    def withdraw(self) -> None:
        """Withdraw the pending steal request (this worker is leaving); a child block granted
        at the last moment is released at once, for anyone to take."""
        if self._ask is None:
            return
        b, e, n, _ = self._ask
        self._ask = None
        slot = f"{self.layout.claim(b, e)}.cut{n}"
        if write_link(slot, f"!withdrawn {self.id}".encode()):
            return
        cut = read_cut(read_small(slot))
        if cut is not None and cut.thief == self.id:
            create_excl(self.layout.claim(cut.child, 0) + ".released")

    # --- splits: this worker as the holder -------------------------------------------------------
    def answer_steal(self, stop: threading.Event | None = None) -> int:
        """Answer the next steal request on the held block, if there is one (one ``open``
        when there is none): give about half of the unstarted tasks (the running one counted
        on our side) to a new child block claimed for the thief, or say "none". Returns the
        number of tasks given. Runs in the heartbeat thread, every ``check_s``."""
        with self._lock:
            blk = self._held
            if blk is None:
                return 0
            n = blk.asked
        base = self.layout.claim(blk.block, blk.epoch)
        self.stats.steal_checks += 1
        data = read_small(f"{base}.ask{n}", 4096)
        if not data:
            return 0  # no request (or its writer is still writing it: next time)
        thief = data.decode(errors="replace").strip()
        slot = f"{base}.cut{n}"
        with self._lock:
            if self._held is not blk or blk.asked != n:
                return 0
            blk.asked = n + 1
            give = self._giveable(blk, stop)
            try:
                check_worker_id(thief)
            except ValueError:
                give = 0
            taken = blk.entries[len(blk.entries) - give:] if give else []
            child = self._make_child(blk, n, taken, thief) if taken else None
            if child is None:
                write_link(slot, b"!none")  # whoever fills the slot, nothing was given
                return 0
            if write_link(slot, encode_cut(Cut(child, [x.task for x in taken], thief))):
                del blk.entries[len(blk.entries) - give:]  # agreed: never ours to run again
                self.stats.given += 1
                self.stats.given_tasks += give
                return give
            # the slot was filled first: withdrawn by the thief, or sealed by a takeover
            create_excl(self.layout.claim(child, 0) + ".done")  # the child never runs
            if (read_small(slot) or b"").startswith(b"!sealed"):
                self._gap = True  # we were superseded: the loop verifies before its next task
            return 0

    def _giveable(self, blk: HeldBlock, stop: threading.Event | None) -> int:
        """How many tasks of the tail of ``blk`` to give away now (call under the lock)."""
        if stop is not None and stop.is_set():
            return 0  # draining: the whole rest is released in a moment
        unstarted = len(blk.entries) - self._next
        since = self._running_since
        give = min(unstarted, (unstarted + (since is not None)) // 2)
        mean = self._mean_s
        if since is not None:  # the running task has taken this long already
            mean = max(mean or 0.0, time.monotonic() - since)
        if give <= 0 or mean is None or give * mean < MIN_SPLIT_S:
            return 0
        return give

    def _make_child(self, blk: HeldBlock, n: int, taken: list[Entry], thief: str) -> int | None:
        """Write the child block of ``taken`` and claim it (epoch 0) for ``thief``; its id, or
        None when the family has no split left."""
        root = root_of(blk.block)
        if root >= 1 << 32:
            return None
        used = [(b - CHILD_BASE) & MAX_SPLITS for b in self._listing
                if is_child(b) and root_of(b) == root]
        bf = BlockFile(0, blk.cpus, blk.gpus,
                       [(x.task, x.spec, x.args, x.attempt - 1, x.lost) for x in taken],
                       parent=blk.block, parent_epoch=blk.epoch, cut=n)
        for k in range(max(used, default=0) + 1, MAX_SPLITS + 1):
            bf.block = c = child_id(root, k)
            if write_link(self.layout.block(c), msgspec.msgpack.encode(bf), fsync=True):
                return c if create_excl(self.layout.claim(c, 0), thief.encode()) else None
        return None

    # --- reading blocks --------------------------------------------------------------------------
    def _spec(self, sid: int) -> Spec:
        spec = self.specs.get(sid)
        if spec is None:
            spec = self.specs[sid] = msgspec.msgpack.decode(read_all(self.layout.spec(sid)), type=Spec)
        return spec

    def _read_block(self, b: int) -> BlockFile:
        return msgspec.msgpack.decode(read_all(self.layout.block(b)), type=BlockFile)

    def _journal_claim(self, rec: Claimed) -> None:
        assert self.journal is not None, "register() first"
        self.journal.append([encode(rec)])
        self.journal.sync()

    def _start_fresh(self, b: int) -> HeldBlock | None:
        try:
            bf = self._read_block(b)
        except FileNotFoundError:
            # a claim on a block whose file was never written (an exporter crashed): drop it
            create_excl(self.layout.claim(b, 0) + ".done")
            return None
        self._journal_claim(Claimed(b, 0, self.id, time.time()))
        self.stats.blocks += 1
        return HeldBlock(b, 0, [Entry(t, s, a, att + 1, lo) for t, s, a, att, lo in bf.entries],
                         bf.cpus, bf.gpus)

    def _take_over(self, b: int, e: int) -> HeldBlock | None:
        """Create ``claims/<b>.<e+1>``, adopt what earlier epochs left unsettled (and did not
        give away in a split)."""
        if e + 1 > MAX_EPOCH or not create_excl(self.layout.claim(b, e + 1), self.id.encode()):
            return None
        self._taken.add((b, e + 1))
        try:
            bf = self._read_block(b)
        except FileNotFoundError:
            create_excl(self.layout.claim(b, e + 1) + ".done")
            return None
        if bf.parent and not child_committed(self.layout, bf, self.id):
            create_excl(self.layout.claim(b, e + 1) + ".done")  # a split that never happened
            return None
        given = {t for cut in seal_cuts(self.layout, b, e, self.id) for t in cut.tasks}
        adopted, lost = self._adopt(bf, e, given)
        self._journal_claim(
            Claimed(b, e + 1, self.id, time.time(), tasks=[x.task for x in adopted], lost=lost)
        )
        self.stats.blocks += 1
        self.stats.takeovers += 1
        if not adopted:
            create_excl(self.layout.claim(b, e + 1) + ".done")
            return None
        return HeldBlock(b, e + 1, adopted, bf.cpus, bf.gpus)

    def _history(self, b: int, e: int) -> Iterator[Record]:
        """Every journal record about block ``b`` written under epochs ``0..e``."""
        holders = {self._holder(b, k) for k in range(e + 1)}
        if self.journal is not None:
            self.journal.sync()
        for h in sorted(x for x in holders if x and not x.startswith("!")):
            for raw in read_journal(self.layout.journal_of(h)).records:
                try:
                    rec = decode(raw)
                except msgspec.DecodeError:
                    continue
                if isinstance(rec, Claimed):
                    if rec.block == b and rec.epoch <= e:
                        yield rec
                else:
                    rb, re_ = split_token(rec.token, rec.task)
                    if rb == b and re_ <= e:
                        yield rec

    def _adopt(self, bf: BlockFile, e: int, given: frozenset[int] | set[int] = frozenset()
               ) -> tuple[list[Entry], list[int]]:
        """Which tasks of block ``bf`` the claimant of epoch ``e + 1`` runs (see the module
        docstring), and which tasks' in-flight attempts are lost. Tasks in ``given`` were
        split off to child blocks: never adopted here."""
        b = bf.block
        owned: dict[int, set[int] | None] = {}  # epoch -> adopted tasks (None: all)
        lost_at: dict[int, set[int]] = {}
        started: set[tuple[int, int]] = set()
        ended: dict[tuple[int, int], int] = {}
        released: set[tuple[int, int]] = set()
        for rec in self._history(b, e):
            if isinstance(rec, Claimed):
                owned[rec.epoch] = None if rec.tasks is None else set(rec.tasks)
                lost_at[rec.epoch] = set(rec.lost)
            else:
                key = (rec.task, split_token(rec.token, rec.task)[1])
                if isinstance(rec, Started):
                    started.add(key)
                elif isinstance(rec, Ended):
                    ended.setdefault(key, rec.outcome)
                else:
                    released.add(key)
        epochs = sorted(owned)
        adopted: list[Entry] = []
        lost: list[int] = []
        for task, sid, args, attempt_base, lost_base in bf.entries:
            if task in given:
                continue  # a child block holds it
            mine = [k for k in epochs if owned[k] is None or task in owned[k]]  # type: ignore[operator]
            owner = mine[-1] if mine else None
            inflight = False
            if owner is not None:
                key = (task, owner)
                if ended.get(key) in FINAL_OUTCOMES:
                    continue  # settled
                inflight = (
                    key in started
                    and key not in ended
                    and key not in released
                    and not any(task in lost_at[k] for k in epochs if k > owner)
                )
            lost_before = sum(task in lost_at[k] for k in epochs)
            spec = self._spec(sid)
            if inflight:
                lost.append(task)
                if lost_base + lost_before + 1 >= spec.max_lost:
                    continue  # its lost budget is spent: the fold fails it
            elif lost_before and lost_base + lost_before >= spec.max_lost:
                continue
            runs = sum((task, k) in started for k in mine)
            adopted.append(Entry(task, sid, args, attempt_base + 1 + runs,
                                 lost_base + lost_before + inflight))
        return adopted, lost

    # --- running ---------------------------------------------------------------------------------
    def _need_verify(self) -> bool:
        mono = time.monotonic()
        return (
            self._gap
            or mono - self._last_verify >= self.lease_s / 4
            or mono - self._last_touch >= self.lease_s / 2
        )

    def superseded(self, blk: HeldBlock) -> bool:
        """Whether a newer epoch of ``blk`` exists (one stat); clears the heartbeat gap."""
        self.stats.verifies += 1
        gone = os.path.exists(self.layout.claim(blk.block, blk.epoch + 1))
        if not gone:
            self._last_verify = time.monotonic()
            self._gap = False
        return gone

    def run_block(
        self,
        blk: HeldBlock,
        runner: Callable[[Lease], Finished],
        stop: threading.Event | None = None,
    ) -> str:
        """Run ``blk``'s tasks in order. Returns ``"done"``, ``"released"`` (stopped: the
        unstarted tasks were handed back) or ``"abandoned"`` (a newer epoch took it over).
        Meanwhile :meth:`answer_steal` may give the unstarted tail away (a split)."""
        journal = self.journal
        assert journal is not None, "register() first"
        pending: list[bytes] = []
        remaining: list[Entry] = []
        outcome = "done"
        i = 0
        with self._lock:
            self._held, self._next, self._running_since = blk, 0, None
        try:
            while True:
                with self._lock:  # the tail may shrink under a split: read it under the lock
                    if i >= len(blk.entries):
                        break
                    if stop is not None and stop.is_set():
                        remaining = blk.entries[i:]
                        outcome = "released"
                        break
                    ent = blk.entries[i]
                    i = self._next = i + 1  # from here on no split gives it away
                if self._need_verify() and self.superseded(blk):
                    outcome = "abandoned"
                    break
                try:
                    self._spec(ent.spec)
                except (OSError, msgspec.DecodeError):
                    pass  # the runner reports the missing spec as the task's failure
                token = blk.token(ent.task)
                lease = Lease(ent.task, token, ent.attempt, ent.spec, ent.args)
                pending.append(encode(Started(ent.task, token, ent.attempt, self.id, time.time())))
                journal.append(pending)
                pending = []
                t0 = self._running_since = time.monotonic()
                try:
                    fin = runner(lease)
                except Exception as exc:  # noqa: BLE001 - the runner failed, not the worker
                    now = time.time()
                    fin = Finished(ent.task, token, int(Outcome.FAILED), now, now,
                                   error=f"worker error: {type(exc).__name__}: {exc}",
                                   attempt=ent.attempt)
                finally:
                    self._running_since = None
                took = time.monotonic() - t0
                # a moving average over the last ~5 tasks: what a split of the tail is worth
                self._mean_s = took if self._mean_s is None else 0.8 * self._mean_s + 0.2 * took
                pending.append(encode(ended_record(self.layout, fin)))
                self.stats.tasks += 1
        finally:
            with self._lock:
                self._held = None
        if outcome == "released":
            pending += [encode(Released(x.task, blk.token(x.task))) for x in remaining]
            self.stats.released += len(remaining)
        journal.append(pending)
        journal.sync()
        if outcome == "abandoned":
            self.stats.abandoned += 1
        else:
            create_excl(f"{self.layout.claim(blk.block, blk.epoch)}.{outcome}")
        return outcome

    def finished(self) -> bool:
        """Whether nothing is left: the exporter's last wave is final and every block offered
        is done, and so is every child block a split made (uses the listing of the last
        :meth:`claim_block`)."""
        wave = self._read_wave(0.0)
        if not wave.final:
            return False
        listing = self._listing
        for b in range(1, wave.blocks + 1):
            st = listing.get(b)
            if st is None or not st.done:
                if st is not None and self._holder(b, st.epoch).startswith("!"):
                    continue  # fenced: the catalog took its tasks back
                return False
        for b, st in listing.items():
            if b > wave.blocks and not st.done and not self._holder(b, st.epoch).startswith("!"):
                return False  # a child block (or a newer wave's) still runs
        return True


def work_loop(
    run_dir: str | os.PathLike[str],
    worker_id: str | None = None,
    runner: Callable[[Lease], Finished] | None = None,
    *,
    stop: threading.Event | None = None,
    drain_signals: Iterable[int] = (),
    lease_s: float | None = None,
    resources: Resources | None = None,
    idle_exit: float | None = None,
    poll: float = 0.2,
    max_poll: float = 2.0,
    fsync_interval: float = 0.5,
    on_block: Callable[[HeldBlock], None] | None = None,
    steal: bool = True,
) -> WorkStats:
    """Claim blocks of ``run_dir`` and run them until nothing is left; return what was done.

    ``runner`` executes one lease (default: :class:`pipefarm.worker.LeaseRunner` over the
    specs this worker loads from ``fs/specs``). ``stop`` (an event) or any of ``drain_signals``
    (handlers installed only when called from the main thread, restored on return) makes the
    worker stop claiming, finish the running task, hand the rest of its block back and return.
    The loop returns when the exporter's wave is final and every block offered is done, or
    after ``idle_exit`` seconds with nothing to claim. A worker waits (polling every ``poll``
    to ``max_poll`` seconds) while other live workers hold blocks, so that it can take them over
    if their holders die, and meanwhile asks them for the tails of their blocks. A heartbeat
    thread touches the heartbeat file every ``lease_s / 4`` and answers steal requests on the
    held block every :data:`STEAL_CHECK_S`. ``steal=False``: never ask (still answers).
    """
    stop = stop if stop is not None else threading.Event()
    w = FsWorker(run_dir, worker_id, lease_s=lease_s, resources=resources,
                 fsync_interval=fsync_interval, steal=steal)
    w.register()
    if runner is None:
        from ..worker import LeaseRunner

        # a command killed by the signal that is stopping this worker (scheduler cancel,
        # preemption, walltime) is recorded lost, not as the task's failure
        runner = LeaseRunner(os.fspath(run_dir), w.id, w.specs, stopping=stop)
    previous: dict[int, Any] = {}

    def drain(*_: Any) -> None:
        # Event.set takes a lock the interrupted main thread may hold: set it from a thread
        threading.Thread(target=stop.set, daemon=True).start()

    if threading.current_thread() is threading.main_thread():
        for sig in drain_signals:
            previous[sig] = signal.signal(sig, drain)
    hb_stop = threading.Event()

    def heartbeat() -> None:
        beat_every = max(0.02, w.lease_s / 4)
        period = max(0.02, w.check_s)
        next_beat = time.monotonic() + beat_every
        while not hb_stop.wait(period):
            if time.monotonic() >= next_beat:
                next_beat = time.monotonic() + beat_every
                with contextlib.suppress(OSError):
                    w.beat()
            try:
                w.answer_steal(stop)
            except Exception:  # noqa: BLE001 - an unanswered request is withdrawn by its
                pass  # thief; this thread must go on beating whatever happens here

    hb = threading.Thread(target=heartbeat, name=f"pipefarm-hb-{w.id}", daemon=True)
    hb.start()
    try:
        idle_since: float | None = None
        delay = poll
        while not stop.is_set():
            blk = w.claim_block()
            if blk is not None:
                idle_since, delay = None, poll
                if on_block is not None:
                    on_block(blk)
                w.run_block(blk, runner, stop)
                continue
            if w.asking:
                stop.wait(poll)  # an answer comes within STEAL_CHECK_S: look often
                continue
            if w.finished():
                w.stats.exit = "finished"
                break
            mono = time.monotonic()
            idle_since = mono if idle_since is None else idle_since
            if idle_exit is not None and mono - idle_since >= idle_exit:
                w.stats.exit = "idle"
                break
            stop.wait(delay)
            delay = min(max_poll, delay * 1.5)
        else:
            w.stats.exit = "stopped"
        if w.asking:  # leaving: nobody will run what an answer would give us
            w.withdraw()
    finally:
        hb_stop.set()
        hb.join()
        w.close()
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    return w.stats


# ------------------------------------------------------------------------------- the store
class FsJournalStore(Store):
    """The :class:`Store` interface over the shared-filesystem protocol, in the process that
    holds the catalog (``RUN/catalog.db``, an :class:`SQLiteStore`).

    Every worker named in the lease protocol is simulated faithfully: it has its own journal and
    heartbeat file; :meth:`claim` exports a block and creates its claim file; :meth:`start`,
    :meth:`finish` and :meth:`release` append journal records; and every call then folds the
    journals into the catalog, which answers the queries and makes every decision with the
    SQLite store's state machine. Real workers (:func:`work_loop`, on any host) use the same
    files, so both can run against one run directory.

    Where it differs from the letter of the protocol, to keep the contract exact:

    * :meth:`claim` ``(worker, n)`` hands out exactly the best ``n`` claimable tasks as one new
      block claimed at epoch 0; tasks already offered in exported blocks are left to workers
      (use :meth:`recall` to take unclaimed, released and stale blocks back).
    * :meth:`release` takes the leases out of their block (they are claimable here at once),
      where a worker's drain leaves them in the block for the next claimant.
    * :meth:`reap` fences stale blocks (creates the next epoch as a tombstone) and turns their
      leases into ``lost``/released attempts in the catalog at once.
    * ``now``: heartbeats are stamped with ``now`` (``os.utime``) and expiry compares with
      ``now``; without it the file server's clock is used (our own heartbeat, freshly touched).
    * Simulated workers' journals are not fsynced: their records are folded into the catalog
      (``synchronous=FULL``) before the call returns.

    The catalog side for array runs: :meth:`pump` (fold, reap, export a wave) from the
    coordinator's loop; ``workers`` sizes the blocks.
    """

    def __init__(
        self,
        run_dir: str | os.PathLike[str],
        lease_s: float = DEFAULT_LEASE_S,
        *,
        workers: int = 8,
        fold_interval: float = 1.0,
        synchronous: str = "FULL",
    ) -> None:
        from . import fold as _fold

        self._f = _fold
        self.run_dir = Path(run_dir)
        self.lease_s = float(lease_s)
        self.workers = max(1, int(workers))
        self.fold_interval = fold_interval
        self.layout = Layout(run_dir)
        self.layout.make()
        self.catalog = SQLiteStore(run_dir, lease_s=lease_s, synchronous=synchronous)
        _fold.ensure_schema(self.catalog)
        write_config(self.layout, self.lease_s)
        self.me = new_worker_id("catalog-")
        self._lock = _fold.FoldLock(self.layout, self.me, self.lease_s)
        self._writers: dict[str, JournalWriter] = {}
        self._dirty = True
        self._last_fold = float("-inf")
        self.last_fold: Any = None
        self._live = Liveness(self.lease_s)

    # --- plumbing --------------------------------------------------------------------------------
    def _append(self, worker: str, records: list[bytes]) -> None:
        if not records:
            return
        w = self._writers.get(worker)
        if w is None:
            check_worker_id(worker)
            w = self._writers[worker] = JournalWriter(self.layout.journal_of(worker), fsync=False)
        w.append(records)
        self._dirty = True

    def _fold(self, now: float | None = None, *, force: bool = False, need: bool = True) -> Any:
        if not (force or self._dirty or time.monotonic() - self._last_fold >= self.fold_interval):
            return None
        if self._lock.held and not self._lock.refresh():
            pass  # taken over while we were idle: take it back below, like a newcomer
        if not self._lock.held and not self._lock.acquire(wait=2 * self.lease_s if need else 0.0):
            if need:
                raise StoreError(
                    f"another process folds {self.run_dir} (see {self.layout.foldlock}); "
                    "only one process may hold the catalog of a shared-filesystem run"
                )
            return None
        stats = self._f.fold(self.layout.run, self.catalog, now=now, lock=self._lock)
        if stats.skipped and need:
            raise StoreError(f"lost the fold lock of {self.run_dir} to another process")
        self._dirty = False
        self._last_fold = time.monotonic()
        self.last_fold = stats
        return stats

    def _ref_ns(self, now: float | None) -> int:
        if now is not None:
            return to_ns(now)
        hb = self.layout.hb_of(self.me)
        touch(hb)
        m = mtime_ns(hb)
        return m if m is not None else time.time_ns()

    def _rows(self, ids: Iterable[int]) -> dict[int, tuple]:
        out: dict[int, tuple] = {}
        ids = sorted(set(ids))
        for i in range(0, len(ids), 500):
            chunk = ids[i : i + 500]
            for r in self.catalog.db.execute(
                "SELECT id, token, state, worker, attempt FROM tasks WHERE id IN"
                f" ({','.join('?' * len(chunk))})",
                chunk,
            ):
                out[r[0]] = r[1:]
        return out

    # --- submission ------------------------------------------------------------------------------
    def add_spec(self, spec: Spec) -> int:
        return self.catalog.add_spec(spec)

    def spec(self, spec_id: int) -> Spec:
        return self.catalog.spec(spec_id)

    def add_tasks(self, spec_id, args, *, keys=None, priority=0, cost=0.0, after=()) -> range:
        return self.catalog.add_tasks(
            spec_id, args, keys=keys, priority=priority, cost=cost, after=after
        )

    # --- the lease protocol ----------------------------------------------------------------------
    def register_worker(self, worker: str, host: str, pid: int, now: float | None = None) -> None:
        check_worker_id(worker)
        self.catalog.register_worker(worker, host, pid, now=now)
        touch(self.layout.hb_of(worker), now)

    def heartbeat(self, worker: str, now: float | None = None) -> None:
        check_worker_id(worker)
        touch(self.layout.hb_of(worker), now)

    def claim(
        self, worker: str, n: int, resources: Resources | None = None, now: float | None = None
    ) -> list[Lease]:
        if n <= 0:
            return []
        self.heartbeat(worker, now)
        self._fold(now)
        t = time.time() if now is None else now
        with self.catalog.transaction():
            ids = self._f.pick_ready(self.catalog, n, resources, t)
            if not ids:
                return []
            b = self._f.export_block(self.layout, self.catalog, ids, t)
        if not create_excl(self.layout.claim(b, 0), worker.encode()):
            raise StoreError(f"block {b} of {self.run_dir} was claimed by someone else")
        self._append(worker, [encode(Claimed(b, 0, worker, t))])
        self._fold(now, force=True)
        chunk = ",".join("?" * len(ids))
        rows = [
            r for r in self.catalog.db.execute(
                "SELECT priority, cost, id, token, attempt, spec, args FROM tasks"
                f" WHERE id IN ({chunk}) AND state={int(State.CLAIMED)}",
                ids,
            ) if r[3] == token_of(b, 0, r[2])
        ]
        rows.sort(key=lambda r: (-r[0], -r[1], r[2]))
        return [Lease(r[2], r[3], r[4], r[5], r[6]) for r in rows]

    def start(self, leases: Iterable[tuple[int, int]], now: float | None = None) -> int:
        pairs = list(leases)
        if not pairs:
            return 0
        self._fold(now)
        rows = self._rows(t for t, _ in pairs)
        t = time.time() if now is None else now
        by_worker: dict[str, list[bytes]] = {}
        seen = set()
        for task, token in pairs:
            r = rows.get(task)
            if r is None or r[0] != token or r[1] != 2 or task in seen or not r[2]:
                continue
            seen.add(task)
            by_worker.setdefault(r[2], []).append(encode(Started(task, token, r[3], r[2], t)))
        if not by_worker:
            return 0
        for w, recs in by_worker.items():
            self._append(w, recs)
        return self._fold(now, force=True).started

    def finish(self, worker: str, outcomes: Iterable[Finished], now: float | None = None) -> int:
        outs = list(outcomes)
        if not outs:
            return 0
        self._fold(now)
        self._append(worker, [encode(ended_record(self.layout, f)) for f in outs])
        return self._fold(now, force=True).ended

    def release(self, worker: str, leases: Iterable[tuple[int, int]], now: float | None = None) -> int:
        pairs = list(leases)
        if not pairs:
            return 0
        self._fold(now)
        rows = self._rows(t for t, _ in pairs)
        live = [t for t, tok in pairs if (r := rows.get(t)) is not None and r[0] == tok
                and r[1] in (2, 3)]
        self._append(worker, [encode(Released(t, tok)) for t, tok in pairs])
        n = self._fold(now, force=True).released
        if live:
            # handed back to the catalog, not to the block: claimable here at once
            with self.catalog.transaction():
                db = self.catalog.db
                db.executemany(
                    "DELETE FROM fs_export WHERE task=? AND (SELECT state FROM tasks WHERE id=?)=1",
                    [(t, t) for t in live],
                )
        return n

    def reap(self, now: float | None = None, *, workers: Iterable[str] | None = None) -> int:
        self._fold(now)
        ref = self._ref_ns(now)
        with self.catalog.transaction():
            n = self._f.reap_blocks(
                self.layout, self.catalog, lease_s=self.lease_s, ref_ns=ref, now=now,
                workers=workers, me=self.me, liveness=None if now is not None else self._live,
            )
        return n

    # --- the catalog side (array runs) -----------------------------------------------------------
    def fold(self, now: float | None = None) -> Any:
        """Fold new journal records into the catalog now; returns a :class:`FoldStats`."""
        return self._fold(now, force=True)

    def export(self, now: float | None = None, *, workers: int | None = None, **kw: Any) -> Any:
        """Offer every claimable ready task as blocks (one wave); returns an ExportStats."""
        return self._f.export(self.layout, self.catalog, workers=workers or self.workers,
                              now=now, **kw)

    def pump(self, now: float | None = None, **kw: Any) -> Any:
        """The coordinator's periodic step: fold, reap stale blocks, export a wave."""
        self._fold(now, force=True)
        self.reap(now)
        return self.export(now, **kw)

    def recall(self, now: float | None = None) -> int:
        """Take back every block that nobody holds alive (never claimed, released, stale):
        their tasks return to the catalog, claimable through :meth:`claim`."""
        self._fold(now)
        ref = self._ref_ns(now)
        with self.catalog.transaction():
            return self._f.recall_blocks(
                self.layout, self.catalog, lease_s=self.lease_s, ref_ns=ref, now=now,
                me=self.me, liveness=None if now is not None else self._live,
            )

    # --- user actions ----------------------------------------------------------------------------
    def cancel(self, ids: Iterable[int] | None = None) -> int:
        self._fold()
        with self.catalog.transaction():
            n = self.catalog.cancel(ids)
            self._f.drop_terminal_exports(self.catalog)
        return n

    def retry(self, ids: Iterable[int] | None = None, *, failed_only: bool = True) -> int:
        self._fold()
        with self.catalog.transaction():
            self._f.drop_terminal_exports(self.catalog)
            return self.catalog.retry(ids, failed_only=failed_only)

    # --- the query side --------------------------------------------------------------------------
    def counts(self) -> dict[str, int]:
        self._fold(need=False)
        return self.catalog.counts()

    def tasks(self, state: str | None = None, ids: Iterable[int] | None = None,
              limit: int | None = None) -> list[TaskRow]:
        self._fold(need=False)
        return self.catalog.tasks(state, ids, limit)

    def attempts(self, task: int) -> list[AttemptRow]:
        self._fold(need=False)
        return self.catalog.attempts(task)

    def result(self, task: int) -> tuple[str, bytes | None, str | None]:
        self._fold(need=False)
        return self.catalog.result(task)

    def results(self) -> Iterable[tuple[Any, ...]]:
        self._fold(need=False)
        return self.catalog.results()

    def output_ref(self, task: int, attempt: int | None = None) -> str | None:
        self._fold(need=False)
        return self.catalog.output_ref(task, attempt)

    def size(self) -> int:
        return self.catalog.size()

    def close(self) -> None:
        for w in self._writers.values():
            with contextlib.suppress(OSError):
                w.close()
        self._writers.clear()
        with contextlib.suppress(OSError):
            self._lock.release()
        self.catalog.close()
