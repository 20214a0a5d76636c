"""The run directory's files: where each one lives (:class:`Layout`), what it holds (the
block, wave, config and cut formats), and the ids they are named by (blocks, child blocks of
splits, workers).

The full list of files and what each one means is in the package docstring
(:mod:`pipefarm.store.shared_fs`).
"""

from __future__ import annotations

import os
import secrets
import socket

import msgspec

from ...task import Finished
from ..base import DEFAULT_LEASE_S
from ..journal import Ended
from ..sqlite import INLINE_RESULT_MAX
from .primitives import read_small, write_atomic

# ------------------------------------------------------------------------------------ block ids
#: Ids of the blocks that splits make. Workers allocate them without the catalog, so they live
#: far above anything an exporter reaches: ``CHILD_BASE + (root << CHILD_BITS) + k`` for the
#: ``k``-th split (1 .. :data:`MAX_SPLITS`) of the family of exported block ``root`` (< 2**32).
#: Tokens stay below 2**62: ``(CHILD_BASE * 2) << EPOCH_BITS`` is 2**61.
CHILD_BASE = 1 << 40
CHILD_BITS = 8
MAX_SPLITS = (1 << CHILD_BITS) - 1


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
    the agreement; a slot whose content starts with ``!`` is no cut (see the package docstring)."""

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
    #: (first, last, seconds): blocks whose tasks asked for that much time (``time_request``);
    #: a worker with less walltime left does not claim them
    times: list[tuple[int, int, float]] = []


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



def read_config(layout: Layout) -> Config | None:
    data = read_small(layout.config)
    return None if not data else msgspec.msgpack.decode(data, type=Config)


def write_config(layout: Layout, lease_s: float) -> None:
    if not os.path.exists(layout.config):
        write_atomic(layout.config, msgspec.msgpack.encode(Config(lease_s=float(lease_s))))


def read_wave(layout: Layout) -> Wave:
    data = read_small(layout.wave, 1 << 26)
    return Wave() if not data else msgspec.msgpack.decode(data, type=Wave)


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
        peak_memory=f.peak_memory,
    )
