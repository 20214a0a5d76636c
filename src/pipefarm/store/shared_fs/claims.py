"""Reading and closing ``claims/``: who holds which block at which epoch, and the cut slots
that splits fill.

One readdir of ``claims/`` tells every claimed block's latest epoch and markers
(:func:`list_claims`); a claim file's content names its holder (:func:`holder_of`). Whoever
creates a newer epoch of a block (a worker's takeover, the catalog's fence) seals the cut slots
of the earlier ones first (:func:`seal_cuts`); whoever takes a child block over checks that its
split was agreed (:func:`child_committed`).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

from .layout import BlockFile, Cut, Layout, read_cut
from .primitives import read_small, write_link


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
