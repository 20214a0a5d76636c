"""The worker side of the protocol: :class:`FsWorker` claims blocks (fresh, released, stale,
or a split's child got by asking), adopts what earlier holders left, runs a block's tasks
through a runner it is given, journals every start and end, touches its heartbeat, and answers
other workers' steal requests.

It runs no task itself and knows nothing of how tasks run: the loop that drives it (signals,
the heartbeat thread, the default runner) is :mod:`pipefarm.backends.array.worker_loop`.

Still one piece past ~500 lines: claiming, adopting, running and splitting all act on the held
block, which :meth:`FsWorker.run_block` and the heartbeat thread's
:meth:`FsWorker.answer_steal` share under one lock; split apart, that lock and the block's
state would have to be passed between modules.
"""

from __future__ import annotations

import os
import random
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import msgspec

from ...states import Outcome
from ...task import Finished, Lease, Resources, Spec
from ..base import DEFAULT_LEASE_S, check_private
from ..journal import Claimed, Ended, JournalWriter, Record, Released, Started, read_journal
from .claims import BlockState, child_committed, holder_of, list_claims, seal_cuts
from .layout import (
    CHILD_BASE,
    MAX_SPLITS,
    BlockFile,
    Cut,
    Layout,
    Wave,
    check_worker_id,
    child_id,
    encode_cut,
    ended_record,
    is_child,
    new_worker_id,
    read_config,
    read_cut,
    read_wave,
    root_of,
)
from .placement import TimeLeft, has_resources, has_time, need_of, only_too_long_left
from .primitives import (
    MAX_EPOCH,
    Liveness,
    create_excl,
    decode,
    encode,
    mtime_ns,
    read_all,
    read_small,
    server_now_ns,
    split_token,
    token_of,
    touch,
    write_link,
)

#: outcomes that settle a task in its block (the next claimant skips it)
FINAL_OUTCOMES = frozenset(
    {int(Outcome.SUCCEEDED), int(Outcome.FAILED), int(Outcome.TIMED_OUT), int(Outcome.LOST),
     int(Outcome.CACHED), int(Outcome.OOM)}
)

#: the word before the time in a heartbeat file's content (see :meth:`FsWorker.register`)
HB_UNTIL = "until"

# ------------------------------------------------------------------------------------ tunables
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
    """What one worker did (returned by the worker loop)."""

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
    no_time: int = 0  # blocks handed back (or passed over) for want of walltime
    exit: str = ""


class FsWorker:
    """The worker side of the protocol: claims blocks, journals, heartbeats, splits.

    :func:`pipefarm.backends.array.worker_loop.work_loop` is the whole loop; this class is
    its parts, for callers (the CLI, backends) that need their own loop. Not thread-safe except :meth:`beat` and
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
        time_left: TimeLeft | None = None,
    ) -> None:
        self.layout = Layout(run_dir)
        #: seconds this worker has left before its walltime warning (None: no limit known);
        #: it claims no block whose tasks asked for more (``time_request``)
        self.time_left = time_left
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
        left = self.time_left() if self.time_left is not None else None
        if left is not None:
            # until when (epoch seconds) this worker starts tasks: `pipefarm status` compares
            # the time tasks asked for with it (beats change the file's mtime, not this)
            with open(self._hb, "w") as fh:
                fh.write(f"{HB_UNTIL} {time.time() + left:.3f}\n")
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
        self._touched(t0)

    def _touched(self, t0: float) -> None:
        """Our heartbeat was touched at monotonic ``t0``: note a lapse since the last touch."""
        if t0 - self._last_touch > self.lease_s / 2 and self._last_touch != float("-inf"):
            self._gap = True
        self._last_touch = t0

    def _ref_ns(self) -> int:
        """Beat, reading back "now" on the file server's clock from our heartbeat's mtime."""
        t0 = time.monotonic()
        ref = server_now_ns(self._hb)
        self._touched(t0)
        return ref

    # --- claiming --------------------------------------------------------------------------------
    def _read_wave(self, max_age: float = 0.1) -> Wave:
        mono = time.monotonic()
        if mono - self._wave_at >= max_age:
            self._wave = read_wave(self.layout)
            self._wave_at = mono
        return self._wave

    def _fits(self, block: int, wave: Wave) -> bool:
        """Whether this worker has the resources and the time for ``block``'s tasks."""
        if root_of(block) > wave.blocks:
            wave = self._read_wave()  # a block of a newer wave than the one we hold
        return (has_resources(self.resources, wave, block)
                and has_time(self.time_left, need_of(wave, block)))

    def need_of(self, block: int) -> float:
        """The seconds each task of ``block`` asked for (0: none asked)."""
        wave = self._wave
        if root_of(block) > wave.blocks:
            wave = self._read_wave()
        return need_of(wave, block)

    def out_of_time(self) -> bool:
        """Whether everything left asked for more time than this worker has left (it will
        never have more): see :func:`.placement.only_too_long_left`."""
        if self.time_left is None:
            return False
        return only_too_long_left(self._read_wave(0.0), self._listing, self.time_left)

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
            if st.released and not st.done and self._fits(b, self._wave):
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
            if not self._fits(b, self._wave):
                continue  # left for a worker that has what its tasks need
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
        need = self.need_of(blk.block)
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
                    if need and not has_time(self.time_left, need):
                        # too close to the walltime for the next task: handed back whole for
                        # a worker with more time, spending nothing
                        remaining = blk.entries[i:]
                        outcome = "released"
                        self.stats.no_time += 1
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
