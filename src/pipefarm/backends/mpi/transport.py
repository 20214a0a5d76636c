"""The MPI transport: worker slots on MPI ranks 1..N-1, reached by MPI messages from rank 0.

Rank 0 runs the coordinator (the catalog's only writer). Each other rank runs
:func:`serve_rank`: a relay that starts one local worker process (the local transport's
:class:`~pipefarm.backends.local.transport.ProcessTransport`, i.e. ``local_worker_main``,
forked on that rank's host) and moves bytes between it and rank 0. So each task still runs in a
process the rank can kill (per-task timeouts), and the worker protocol (``Batch``/``Revoke``,
``Done``/``Revoked``) is the local one, unchanged: MPI only carries its encoded bytes.

The task a worker runs now lives in its host's slots file, which rank 0 cannot read on
another host: the relay sends it as a message whenever it changes (as an age, not a start
time, so that clocks of other hosts do not skew timeouts).

Messages (pickled tuples, one MPI tag, ordered per pair of ranks)::

    rank 0 -> rank r: ("start", gen, run_dir, capture) ("data", gen, bytes) ("kill", gen)
                      ("stop", gen) ("exit",)
    rank r -> rank 0: ("started", gen, wid, pid) ("error", gen, text) ("data", gen, bytes)
                      ("cur", gen, task, age_s) ("gone", gen, status, task, age_s, last_words)
                      ("ended", gen, task, age_s)

``gen`` numbers the workers started on a rank, so what an old (killed) worker said is dropped.
Every send is non-blocking (``isend``): two ranks each sending a large message to the other
never wait on each other.

mpi4py is imported only here and by the backend, never by ``import pipefarm``.
"""

from __future__ import annotations

import collections
import signal
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from ..local.transport import REAP_WAIT_S, ProcessTransport, _host
from ..transport import Transport

#: The MPI tag of every pipefarm message (ranks may carry other traffic on other tags).
TAG = 7411

#: How long rank 0 waits for a rank to answer "start" before it counts as unable to start a
#: worker (a fork plus a handshake: milliseconds; a loaded or swapping host may take seconds).
START_WAIT_S = 60.0

#: Longest sleep between polls of an idle rank (rank 0 or a relay). MPI has no select(): a
#: blocking receive spins a CPU in Open MPI, which steals it from the tasks when ranks share
#: cores. The sleep doubles from POLL_MIN_S while nothing arrives. Measured on the 2-core
#: development host (mpiexec -n 3, oversubscribed), 20,000 no-op tasks: 0.5 ms ~20k tasks/s,
#: 2 ms ~19k/s, 5 ms ~32k/s, 10 ms ~28k/s (polling ranks compete with the tasks for the
#: cores); 400 x 20 ms sleeps took 4.44 s with 2 ms and with 5 ms (4.0 s ideal).
POLL_MAX_S = 0.005
POLL_MIN_S = 0.0001
#: For this long after its last message a rank sleeps at most POLL_SOON_S: an answer is
#: usually on its way then (a worker's next batch, a "stop" after the last result, "started"
#: or "ended" after a request), and at POLL_MAX_S each such hop cost ~2.5 ms on average, ~5 ms
#: at worst. Measured (2 cores, mpiexec -n 3): stopping 2 workers took ~18 ms, ~7 ms of it rank
#: 0 asleep after both had answered; 400 x 20 ms sleeps lost ~20 ms at start and end.
QUIET_AFTER_S = 0.05
POLL_SOON_S = 0.0005


def next_nap(nap: float, quiet_s: float) -> float:
    """The next sleep of a polling loop that slept ``nap`` and last heard something
    ``quiet_s`` seconds ago: doubling from POLL_MIN_S, capped by how long it has been quiet."""
    return min(max(nap * 2, POLL_MIN_S), POLL_SOON_S if quiet_s < QUIET_AFTER_S else POLL_MAX_S)


def _mpi() -> Any:
    from mpi4py import MPI

    return MPI


class _Sender:
    """Non-blocking sends whose requests are kept until complete (their buffers with them)."""

    def __init__(self, comm: Any) -> None:
        self.comm = comm
        self.reqs: list[Any] = []

    def send(self, obj: Any, dest: int) -> None:
        self.reqs.append(self.comm.isend(obj, dest=dest, tag=TAG))
        if len(self.reqs) > 64:
            self.reqs = [r for r in self.reqs if not r.Test()]

    def flush(self, wait_s: float = 5.0) -> None:
        """Wait (up to ``wait_s``) for every send to complete."""
        end = time.monotonic() + wait_s
        while self.reqs and time.monotonic() < end:
            self.reqs = [r for r in self.reqs if not r.Test()]
            if self.reqs:
                time.sleep(POLL_MIN_S)


@dataclass
class _RankLink:
    """One worker on a rank as rank 0 knows it (the coordinator's ``link``)."""

    rank: int
    gen: int
    inbox: collections.deque = field(default_factory=collections.deque)  # bytes, None: gone
    dead: bool = False
    status: int | None = None
    words: str = ""


class MPITransport(Transport):
    """Rank 0's side: the workers of ranks 1..size-1 of ``comm``, one slot per rank."""

    def __init__(self, comm: Any, capture_output: bool = True) -> None:
        self.comm = comm
        self.capture_output = capture_output
        self.host = _host()
        self.out = _Sender(comm)
        self.run_dir: str | None = None
        self.gen: dict[int, int] = {}  # rank -> the generation of its latest worker
        self.links: dict[int, _RankLink] = {}  # rank -> its latest worker
        self.cur: dict[int, tuple[int, float]] = {}  # slot -> (task, since) as last reported
        self.started: dict[int, tuple[str, int] | str] = {}  # rank -> (wid, pid) or an error
        self.prestarted: set[int] = set()  # ranks asked to start a worker that start() will take
        self.status = _mpi().Status()
        self.heard = 0.0  # time.monotonic() of the latest message

    # --- receiving ----------------------------------------------------------------------------
    def _pump(self) -> bool:
        """Receive every message that has arrived; True when there was one."""
        got = False
        while True:
            m = self.comm.improbe(_mpi().ANY_SOURCE, TAG, status=self.status)
            if m is None:
                return got
            src = self.status.Get_source()
            self._route(src, m.recv())
            got = True
            self.heard = time.monotonic()

    def _route(self, rank: int, msg: tuple) -> None:
        kind, gen = msg[0], msg[1]
        if gen != self.gen.get(rank):
            return  # an old worker's words: it was replaced
        slot = rank - 1
        if kind == "data":
            self.links[rank].inbox.append(msg[2])
        elif kind == "cur":
            self._set_cur(slot, msg[2], msg[3])
        elif kind == "started":
            self.started[rank] = (msg[2], msg[3])
        elif kind == "error":
            self.started[rank] = msg[2]
        elif kind in ("gone", "ended"):
            link = self.links[rank]
            self._set_cur(slot, msg[2] if kind == "ended" else msg[3],
                          msg[3] if kind == "ended" else msg[4])
            if kind == "gone":
                link.status, link.words = msg[2], msg[5]
                link.inbox.append(None)
            link.dead = True

    def _set_cur(self, slot: int, task: int, age: float) -> None:
        self.cur[slot] = (task, time.time() - age) if task else (0, 0.0)

    def _wait(self, done: Any, timeout: float) -> bool:
        """Receive until ``done()`` or ``timeout`` seconds passed; ``done()``'s last answer."""
        end = time.monotonic() + timeout
        nap = 0.0
        while True:
            got = self._pump()
            if done():
                return True
            now = time.monotonic()
            if now >= end:
                return False
            nap = 0.0 if got else min(next_nap(nap, now - self.heard), end - now)
            if nap:
                time.sleep(nap)

    # --- the Transport interface ----------------------------------------------------------------
    def open(self, size: int, run_dir: str | None) -> None:
        if size > self.comm.Get_size() - 1:
            raise ValueError(f"{size} worker slots asked for; MPI has {self.comm.Get_size() - 1}"
                             " worker rank(s)")
        self.run_dir = run_dir
        # Every rank forks its worker now, all at once, while the coordinator reads the run;
        # start() then only collects the answer. Started one after the other, each start cost a
        # round trip plus a fork (~17 ms a rank on the 2-core host: 2 ranks ~40 ms, now ~20 ms).
        # A worker never asked for is killed by close()'s "exit".
        for rank in range(1, size + 1):
            self._ask_start(rank)
            self.prestarted.add(rank)

    def _ask_start(self, rank: int) -> _RankLink:
        gen = self.gen[rank] = self.gen.get(rank, 0) + 1
        self.started.pop(rank, None)
        link = self.links[rank] = _RankLink(rank, gen)
        self.out.send(("start", gen, self.run_dir or "", self.capture_output), rank)
        return link

    def close(self) -> None:
        """Tell every worker rank to exit (ends :func:`serve_rank` there)."""
        for rank in range(1, self.comm.Get_size()):
            self.out.send(("exit",), rank)
        self.out.flush()

    def start(self, slot: int) -> tuple[str, int, _RankLink]:
        rank = slot + 1
        if rank in self.prestarted:  # open() asked for it already
            self.prestarted.discard(rank)
            link = self.links[rank]
        else:
            link = self._ask_start(rank)
        self.cur[slot] = (0, 0.0)
        if not self._wait(lambda: rank in self.started, START_WAIT_S):
            link.dead = True
            raise OSError(f"MPI rank {rank} did not start a worker within {START_WAIT_S:g} s")
        got = self.started[rank]
        if isinstance(got, str):
            link.dead = True
            raise OSError(f"MPI rank {rank} cannot start a worker: {got}")
        return got[0], got[1], link

    def send(self, link: _RankLink, message: bytes) -> bool:
        if link.dead:
            return False
        self.out.send(("data", link.gen, message), link.rank)
        return True

    def ready(self, links: Sequence[_RankLink], timeout: float) -> list[_RankLink]:
        self._wait(lambda: any(x.inbox for x in links), timeout)
        return [x for x in links if x.inbox]

    def receive(self, link: _RankLink) -> bytes | None:
        return link.inbox.popleft() if link.inbox else None

    def current(self, slot: int) -> tuple[int, float]:
        return self.cur.get(slot, (0, 0.0))

    def clear(self, slot: int) -> None:
        self.cur[slot] = (0, 0.0)

    def exit_status(self, link: _RankLink) -> int | None:
        return link.status

    def _end(self, links: Sequence[_RankLink], kind: str) -> None:
        live = [x for x in links if not x.dead]
        for x in live:
            self.out.send((kind, x.gen), x.rank)
        self._wait(lambda: all(x.dead for x in live), REAP_WAIT_S)
        for x in live:
            x.dead = True  # no answer in time: the rank is stuck; nothing more is sent to it

    def kill(self, links: Sequence[_RankLink]) -> None:
        self._end(links, "kill")

    def stop(self, links: Sequence[_RankLink]) -> None:
        self._end(links, "stop")

    def last_words(self, link: _RankLink) -> str:
        return link.words

    def forget(self, link: _RankLink) -> None:
        link.inbox.clear()


def serve_rank(comm: Any) -> None:
    """A worker rank's loop: run rank 0's workers on this rank until rank 0 says "exit".

    Never opens the catalog. Returns when told to exit (or raises when MPI fails).
    """
    # what a worker needs for its first task, imported once here before any worker is forked
    # (a rank imports less of pipefarm than a local coordinator does, whose forks inherit it)
    from ...execute import output, py  # noqa: F401

    # Ctrl-C and SIGTERM reach every rank (mpiexec forwards them to the whole job): a worker
    # rank leaves stopping to rank 0, which releases the running tasks and then says "exit"
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    out = _Sender(comm)
    pt: ProcessTransport | None = None
    link: Any = None
    gen = 0
    last = (0, 0.0)  # the (task, start) last reported to rank 0
    nap = 0.0
    heard = time.monotonic()  # the latest message, either way

    def cur() -> tuple[int, float]:
        assert pt is not None
        task, started = pt.current(0)
        return (task, max(0.0, time.time() - started)) if task else (0, 0.0)

    def report_cur() -> None:
        nonlocal last
        assert pt is not None
        now = pt.current(0)
        if now != last:
            last = now
            out.send(("cur", gen, *cur()), 0)

    def end_pt() -> None:
        nonlocal pt, link
        if pt is not None:
            pt.close()
        pt = link = None

    try:
        while True:
            busy = False
            while (m := comm.improbe(0, TAG)) is not None:
                msg = m.recv()
                busy = True
                kind = msg[0]
                if kind == "exit":
                    if link is not None:
                        pt.kill([link])  # type: ignore[union-attr]
                    return
                if kind == "start":
                    if link is not None:  # rank 0 forgot it: it must not outlive its slot
                        pt.kill([link])  # type: ignore[union-attr]
                    end_pt()
                    gen = msg[1]
                    pt = ProcessTransport(bool(msg[3]))
                    pt.open(1, msg[2] or None)
                    try:
                        wid, pid, link = pt.start(0)
                    except OSError as exc:
                        end_pt()
                        out.send(("error", gen, f"{type(exc).__name__}: {exc}"), 0)
                        continue
                    last = (0, 0.0)
                    out.send(("started", gen, wid, pid), 0)
                elif msg[1] != gen or link is None:
                    if kind in ("kill", "stop"):  # already gone: say so, the caller waits
                        out.send(("ended", msg[1], 0, 0.0), 0)
                elif kind == "data":
                    pt.send(link, msg[2])  # type: ignore[union-attr]
                elif kind in ("kill", "stop"):
                    task, age = cur()
                    (pt.kill if kind == "kill" else pt.stop)([link])  # type: ignore[union-attr]
                    pt.forget(link)  # type: ignore[union-attr]
                    end_pt()
                    out.send(("ended", gen, task, age), 0)
            if link is not None:
                assert pt is not None
                if pt.ready([link], nap):
                    busy = True
                    data = pt.receive(link)
                    if data is None:  # the worker died on its own
                        status = pt.exit_status(link)
                        task, age = cur()
                        words = pt.last_words(link)
                        end_pt()
                        out.send(("gone", gen, status, task, age, words), 0)
                        continue
                    report_cur()
                    out.send(("data", gen, data), 0)
                report_cur()
            elif nap:
                time.sleep(nap)
            now = time.monotonic()
            if busy:
                heard, nap = now, 0.0
            else:
                nap = next_nap(nap, now - heard)
    finally:
        end_pt()
        out.flush()
