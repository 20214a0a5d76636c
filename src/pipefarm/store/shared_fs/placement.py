"""Placement: which blocks a worker has the resources and the time for.

Blocks are exported one class per resources and ``time_request`` (:mod:`.exporting`); the wave
lists the classes that are not the default (``Wave.classes``: cpus and gpus; ``Wave.times``: the
seconds each task asked for), by ranges of block ids, and a child block made by a split has its
family's class. A worker claims no block it lacks the resources for, nor one whose tasks asked
for more time than it has left before its walltime warning (``time_left``, seconds; None: no
limit known). Time left only shrinks, so a worker that has the time for none of what is left
never will (:func:`only_too_long_left`).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

from ...task import Resources
from .claims import BlockState
from .layout import Wave, root_of

#: seconds a worker has left before its walltime warning; None: no limit known
TimeLeft = Callable[[], "float | None"]


def need_of(wave: Wave, block: int) -> float:
    """The seconds each task of ``block`` asked for (0: none asked)."""
    root = root_of(block)
    for first, last, need in wave.times:
        if first <= root <= last:
            return need
    return 0.0


def has_time(time_left: TimeLeft | None, need: float) -> bool:
    """Whether a worker with ``time_left`` can start a task that asked for ``need`` seconds."""
    if not need or time_left is None:
        return True
    left = time_left()
    return left is None or left >= need


def has_resources(resources: Resources | None, wave: Wave, block: int) -> bool:
    """Whether a worker with ``resources`` (None: any) can run ``block``'s tasks."""
    if resources is None:
        return True
    root = root_of(block)
    for first, last, cpus, gpus in wave.classes:
        if first <= root <= last:
            return cpus <= resources.cpus and gpus <= resources.gpus
    return resources.cpus >= 1


def only_too_long_left(wave: Wave, listing: Mapping[int, BlockState],
                       time_left: TimeLeft | None) -> bool:
    """Whether everything left asked for more time than ``time_left``: the wave is final and
    no block that is not done (``listing``: the claims as last listed) fits."""
    if time_left is None or not wave.final or not wave.times:
        return False
    left = [b for b in range(1, wave.blocks + 1) if not (b in listing and listing[b].done)]
    left += [b for b, st in listing.items() if b > wave.blocks and not st.done]
    return bool(left) and not any(has_time(time_left, need_of(wave, b)) for b in left)
