"""The web dashboard of ``pipefarm serve``, ``Run.serve()`` and ``Run.execute(dashboard=True)``.

:func:`start` serves a run (or a directory of runs) in a background thread and returns a
:class:`Dashboard`; :mod:`.server` is the HTTP side, :mod:`.board` the cached reads, and
``assets/`` the page (hand-written HTML, CSS and JavaScript; charts are inline SVG).
"""

from __future__ import annotations

import errno
import html
import os
import subprocess
import sys
import threading
from typing import Any

#: the port ``pipefarm serve`` and ``execute(dashboard=True)`` try first
DEFAULT_PORT = 8787

#: the niceness of ``execute(dashboard=True)``'s server process: on cores the workers keep
#: busy, the run goes first and the page waits (bench W11)
SERVE_NICE = 10


class Dashboard:
    """A dashboard serving in a background thread (or a child process): open :attr:`url`;
    :meth:`stop` ends it."""

    def __init__(self, server: Any, url: str, process: subprocess.Popen[str] | None = None) -> None:
        self._server = server
        self._process = process
        self.url = url
        self._thread: threading.Thread | None = None
        if server is not None:
            self._thread = threading.Thread(target=server.serve_forever,
                                            kwargs={"poll_interval": 0.2},
                                            name="pipefarm-dashboard", daemon=True)
            self._thread.start()

    @property
    def port(self) -> int:
        import urllib.parse

        return int(urllib.parse.urlsplit(self.url).port or 80)

    def stop(self) -> None:
        """Stop serving (open SSE streams end within a refresh) and free the port."""
        if self._thread is not None and self._thread.is_alive():
            self._server.stopping.set()
            self._server.shutdown()
            self._server.server_close()
            self._thread.join(5)
        if self._process is not None and self._process.poll() is None:
            self._process.terminate()
            try:
                self._process.wait(5)
            except subprocess.TimeoutExpired:
                self._process.kill()
                self._process.wait()

    def __enter__(self) -> Dashboard:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def __repr__(self) -> str:
        return f"<pipefarm Dashboard {self.url}>"

    def _repr_html_(self) -> str:
        u = html.escape(self.url, quote=True)
        return f'<a href="{u}" target="_blank">pipefarm dashboard: {u}</a>'


def start(target: str | os.PathLike[str], port: int = 0, bind: str = "127.0.0.1",
          token: str | None = None, fallback: bool = False) -> Dashboard:
    """Serve ``target`` (a run, or a directory of runs) on ``bind:port`` (0: a free port).

    ``ValueError`` for a bind beyond loopback without ``token``; ``OSError`` if the port is
    taken, unless ``fallback``, which then takes any free port.
    """
    from .server import DashboardServer, Site, check_bind

    check_bind(bind, token)
    site = Site(target)
    try:
        server = DashboardServer((bind, port), site, token, bind)
    except OSError as exc:
        if not (fallback and port and exc.errno == errno.EADDRINUSE):
            raise
        server = DashboardServer((bind, 0), site, token, bind)
    host = server.server_address[0]
    shown = f"[{host}]" if ":" in host else host
    if host in ("0.0.0.0", "::"):
        import socket

        shown = socket.getfqdn()
    url = f"http://{shown}:{server.server_address[1]}/"
    if token:  # the page reads it for its actions (and sets a cookie off loopback)
        import urllib.parse

        url += "?token=" + urllib.parse.quote(token, safe="")
    return Dashboard(server, url)


def start_process(target: str | os.PathLike[str], port: int = DEFAULT_PORT,
                  bind: str = "127.0.0.1", token: str | None = None,
                  fallback: bool = True) -> Dashboard:
    """:func:`start`, but served by a ``pipefarm serve`` child process at niceness
    :data:`SERVE_NICE` that ends with this one: its reads never hold this process's GIL, and
    on busy cores the run goes first (``execute(dashboard=True)``)."""
    check_args = [sys.executable, "-m", "pipefarm", "serve", os.fspath(target), "--bind", bind,
                  "--parent", str(os.getpid()), "--nice", str(SERVE_NICE)]
    env = {**os.environ, "PIPEFARM_TOKEN": token} if token else \
        {k: v for k, v in os.environ.items() if k != "PIPEFARM_TOKEN"}
    for p in ([port, 0] if fallback and port else [port]):
        proc = subprocess.Popen([*check_args, "--port", str(p)], stdin=subprocess.DEVNULL,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
        line = proc.stdout.readline()  # type: ignore[union-attr]  # "serving RUN at URL ..."
        if " at http" in line:
            proc.stdout.close()  # type: ignore[union-attr]
            return Dashboard(None, line.split(" at ", 1)[1].split()[0], process=proc)
        err = proc.communicate()[1].strip()
        if "in use" not in err:
            break
    raise OSError(err.removeprefix("pipefarm: error: ") or "pipefarm serve did not start")
