"""The fold lock: only one process folds journals into a run's catalog at a time.

Only one process folds at a time (:class:`FoldLock`: exclusive-create lock files
``fs/fold/<n>``, never deleted while current; a stale one is superseded by creating ``n+1``,
judged by its mtime against the folder's own freshly touched heartbeat, or at once when its
holder was a process on this host that no longer exists).
"""

from __future__ import annotations

import contextlib
import os
import socket
import time

from .layout import Layout
from .primitives import Liveness, create_excl, mtime_ns, read_small, server_now_ns


# ------------------------------------------------------------------------------------ the lock
def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class FoldLock:
    """Who may fold: the holder of the highest ``fs/fold/<n>`` (content ``holder host pid``).

    Taken by creating ``n+1`` exclusively when ``n`` is released (``<n>.released``), held by a
    dead process on this host, or stale by :class:`~.primitives.Liveness` (its mtime stopped
    changing; compared with the taker's own freshly touched heartbeat file), which takes
    ``lease_s / 2`` or more of watching: pass ``wait`` to :meth:`acquire`. The holder touches its file at least every
    ``lease_s / 4`` while it folds (:meth:`refresh`) and checks that no ``n+1`` appeared when
    it may have lapsed.
    """

    def __init__(self, layout: Layout, holder: str, lease_s: float) -> None:
        self.layout = layout
        self.dir = layout.foldlock
        self.holder = holder
        self.lease_s = lease_s
        self.n: int | None = None
        self._touched = float("-inf")
        self._verified = float("-inf")
        self._live = Liveness(lease_s)

    @property
    def held(self) -> bool:
        return self.n is not None

    def _path(self, n: int) -> str:
        return f"{self.dir}/{n}"

    def _scan(self) -> tuple[int, bool]:
        top, released = 0, set()
        for name in os.listdir(self.dir):
            parts = name.split(".")
            try:
                n = int(parts[0])
            except ValueError:
                continue
            if len(parts) == 1:
                top = max(top, n)
            elif parts[1:] == ["released"]:
                released.add(n)
        return top, top in released

    def _stale(self, n: int, content: str) -> bool:
        parts = content.split()
        if len(parts) >= 3 and parts[1] == socket.gethostname():
            with contextlib.suppress(ValueError):
                if not _pid_alive(int(parts[2])):
                    return True
        def ref() -> int:
            return server_now_ns(self.layout.hb_of(self.holder))

        return self._live.dead(self._path(n), mtime_ns(self._path(n)), ref)

    def _try(self) -> bool:
        os.makedirs(self.dir, mode=0o700, exist_ok=True)
        top, released = self._scan()
        if top and not released:
            data = read_small(self._path(top)) or b""
            content = data.decode(errors="replace").strip()
            if content.split()[:1] == [self.holder]:
                self.n = top
                self._touched = self._verified = time.monotonic()
                return True
            if not self._stale(top, content):
                return False
        me = f"{self.holder} {socket.gethostname()} {os.getpid()}\n".encode()
        if not create_excl(self._path(top + 1), me):
            return False
        self.n = top + 1
        self._touched = self._verified = time.monotonic()
        for name in os.listdir(self.dir):  # tidy: keep the last two
            with contextlib.suppress(ValueError, OSError):
                if int(name.split(".")[0]) < self.n - 1:
                    os.unlink(f"{self.dir}/{name}")
        return True

    def acquire(self, wait: float = 0.0) -> bool:
        """Take the lock, waiting up to ``wait`` seconds; whether it is held."""
        if self.n is not None:
            return True
        deadline = time.monotonic() + wait
        delay = 0.02
        while True:
            if self._try():
                return True
            if time.monotonic() >= deadline:
                return False
            time.sleep(delay)
            delay = min(0.5, delay * 1.5)

    def refresh(self) -> bool:
        """Keep the lock alive; False (and not held any more) when someone took it over."""
        if self.n is None:
            return False
        mono = time.monotonic()
        lapsed = mono - self._touched >= self.lease_s / 2
        if mono - self._touched >= self.lease_s / 4:
            try:
                os.utime(self._path(self.n), None)
            except FileNotFoundError:
                self.n = None
                return False
            self._touched = mono
        if lapsed or mono - self._verified >= self.lease_s / 2:
            if os.path.exists(self._path(self.n + 1)):
                self.n = None
                return False
            self._verified = mono
        return True

    def release(self) -> None:
        if self.n is not None:
            create_excl(self._path(self.n) + ".released")
            self.n = None
