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
``journal/<worker>.log``     one append-only framed journal per worker
                             (:mod:`pipefarm.store.journal`).
``hb/<worker>``              the worker's heartbeat: its *mtime*, set with ``os.utime(path, None)``
                             so that the file server stamps it.
``fold/<n>``                 the fold lock (see :class:`~.foldlock.FoldLock`).
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
* A worker claims (fresh, released or stale) only blocks it has the resources and the time
  for: blocks are exported one class per resources and ``time_request``, listed in ``wave``
  (:mod:`.placement`). A worker that knows its walltime hands a block back when the next task
  no longer fits before its warning, and leaves once nothing left fits.
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

Drain: the worker loop (:mod:`pipefarm.backends.array.worker_loop`) stops claiming when its ``stop`` event is set (or one of its
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
  tasks to the child (:func:`~.folding.register_child`) instead of taking them back.
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

Modules (one job each; imports go down this list, never up)
-----------------------------------------------------------
``primitives``  tokens, whole-file writes, exclusive creates, the file server's clock
``layout``      the run directory's paths and file formats, block and worker ids
``claims``      reading ``claims/``, sealing cut slots, checking a child's split
``claimant``    the worker side: :class:`FsWorker` (claim, adopt, run a block, split)
``tables``      the catalog side's own tables (``fs_*``) and SQL helpers
``foldlock``    :class:`FoldLock`: one folder at a time
``folding``     :func:`fold`: journals into the catalog, through the SQLite store's methods
``exporting``   :func:`export`: ready tasks into blocks, in waves
``fence``       :func:`reap_blocks`, :func:`recall_blocks`: taking blocks back
``store``       :class:`FsJournalStore`: both sides behind the
                :class:`~pipefarm.store.base.Store` interface (see its docstring for where it
                differs)

The loop that drives a worker (signals, heartbeat thread, the default runner) lives with the
workers, in :mod:`pipefarm.backends.array.worker_loop`: nothing here imports the worker or
backend layers.
"""

from .claimant import STEAL_CHECK_S, FsWorker, HeldBlock, WorkStats
from .claims import BlockState, holder_of, list_claims
from .exporting import ExportStats, export, min_block_for, plan_blocks, write_block
from .fence import reap_blocks, recall_blocks
from .folding import FoldStats, fold
from .foldlock import FoldLock
from .layout import (
    BlockFile,
    Config,
    Cut,
    Layout,
    Wave,
    new_worker_id,
    read_config,
    read_cut,
    read_wave,
    write_config,
)
from .primitives import (
    Liveness,
    decode,
    encode,
    mtime_ns,
    server_now_ns,
    split_token,
    token_of,
    touch,
)
from .store import FsJournalStore

__all__ = [
    "STEAL_CHECK_S",
    "BlockFile",
    "BlockState",
    "Config",
    "Cut",
    "ExportStats",
    "FoldLock",
    "FoldStats",
    "FsJournalStore",
    "FsWorker",
    "HeldBlock",
    "Layout",
    "Liveness",
    "Wave",
    "WorkStats",
    "decode",
    "encode",
    "export",
    "fold",
    "holder_of",
    "list_claims",
    "min_block_for",
    "mtime_ns",
    "new_worker_id",
    "plan_blocks",
    "reap_blocks",
    "recall_blocks",
    "read_config",
    "read_cut",
    "read_wave",
    "server_now_ns",
    "split_token",
    "token_of",
    "touch",
    "write_block",
    "write_config",
]
