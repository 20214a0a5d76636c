"""The web dashboard of ``pipefarm serve``, ``Run.serve()`` and ``Run.execute(dashboard=True)``.

:func:`start` serves a run (or a directory of runs) in a background thread and returns a
:class:`Dashboard`; :mod:`.server` is the HTTP side, :mod:`.board` the cached reads, and
``assets/`` the page (hand-written HTML, CSS and JavaScript; charts are inline SVG).
"""

from __future__ import annotations

import errno
import html
import os
import threading
from typing import Any

#: the port ``pipefarm serve`` and ``execute(dashboard=True)`` try first
DEFAULT_PORT = 8787


class Dashboard:
    """A dashboard serving in a background thread: open :attr:`url`; :meth:`stop` ends it."""

    def __init__(self, server: Any, url: str) -> None:
        self._server = server
        self.url = url
        self._thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.2},
                                        name="pipefarm-dashboard", daemon=True)
        self._thread.start()

    @property
    def port(self) -> int:
        return int(self._server.server_address[1])

    def stop(self) -> None:
        """Stop serving (open SSE streams end within a refresh) and free the port."""
        if self._thread.is_alive():
            self._server.stopping.set()
            self._server.shutdown()
            self._server.server_close()
            self._thread.join(5)

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
