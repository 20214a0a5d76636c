"""The protocol's primitives: lease tokens, whole-file writes, exclusive creates, and the file
server's clock.

Everything here is one system call or a few: what the claiming, exporting, folding and fencing
modules of this package are built from. Nothing is ever locked (no flock/fcntl across hosts):
exclusivity comes from ``O_CREAT|O_EXCL`` and ``link``, which are atomic on NFSv3+, Lustre and
GPFS.

The clock: lease expiry is judged with the file server's own clock, read by
:func:`server_now_ns` (touch a file of our own, read its mtime back) and nowhere else, and by
:class:`Liveness`, which watches heartbeat mtimes change against our monotonic clock.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import time
from collections.abc import Callable

from ..journal import decode_record, encode_record

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


# -------------------------------------------------------------------------------------- records
# one record union and codec for every journal: journal.py's (Claimed included)
encode = encode_record
decode = decode_record


# ------------------------------------------------------------------------------- files on disk
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


# ----------------------------------------------------------------------------------- the clock
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


def server_now_ns(path: str) -> int:
    """"Now" on the file server's clock: touch ``path`` (a file of the caller's own: its
    heartbeat) and read its mtime back. Where the server stamps ``utime(NULL)`` (NFS) this is
    the clock every heartbeat mtime was stamped with; where it cannot be read back, the local
    clock. The one place the protocol reads the server's clock."""
    touch(path)
    m = mtime_ns(path)
    return m if m is not None else time.time_ns()


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
