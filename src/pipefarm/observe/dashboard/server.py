"""The dashboard's HTTP server: pages, a JSON API, live updates over SSE, ``/metrics``.

Standard library only (:class:`http.server.ThreadingHTTPServer`); every asset is served from
this package, nothing from a CDN. One server shows one run, or every run under a directory
(``/`` lists them, each at ``/run/<name>/``). Per run (``P`` is ``""`` or ``/run/<name>``)::

    GET  P/                       the page (overview, task stream, durations, failures, task)
    GET  P/api/snapshot           the page's payload, JSON (cached: one read per refresh)
    GET  P/api/events             the same payload as Server-Sent Events, at most once a second
    GET  P/api/stream|durations|failures|throughput|workers   parts of it
    GET  P/api/task/<id>          one task: attempts, outcomes, workers, times, output tails
    GET  P/api/log/<id>?attempt=N&stream=stderr                what an attempt printed
    POST P/api/retry, P/api/cancel  {"ids": [...]} or {"signature": "..."}; token required
    GET  /metrics, P/metrics      Prometheus text (all runs / this run)
    GET  /api/runs                the runs under the directory

Security: loopback by default; another bind needs a token, and then every request must carry
it (``Authorization: Bearer T``, ``?token=T`` once, which sets a cookie, or a form field).
Actions need the token always: without one configured they are refused (403).
"""

from __future__ import annotations

import hmac
import ipaddress
import json
import threading
import time
import urllib.parse
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from importlib import resources
from pathlib import Path
from typing import Any

from .board import REFRESH_S, Board, encode

#: seconds between SSE comments on an unchanged payload (proxies drop silent streams)
KEEPALIVE_S = 15.0

#: a POST body larger than this is refused (ids of a retry: a few MB at most)
MAX_BODY = 8 << 20

_TYPES = {".html": "text/html; charset=utf-8", ".js": "text/javascript; charset=utf-8",
          ".css": "text/css; charset=utf-8", ".svg": "image/svg+xml", ".png": "image/png"}


def is_loopback(bind: str) -> bool:
    """Whether ``bind`` is a loopback address or ``localhost``."""
    if bind == "localhost":
        return True
    try:
        return ipaddress.ip_address(bind).is_loopback
    except ValueError:
        return False


def check_bind(bind: str, token: str | None) -> None:
    """``ValueError`` (one line) unless ``bind`` is loopback or a token is given."""
    if not is_loopback(bind) and not token:
        raise ValueError(f"binding to {bind} exposes the run beyond this host: give --token T "
                         "(or bind to 127.0.0.1)")


def asset(name: str) -> bytes:
    """An asset of the page (``index.html``, ``app.js``, ...) from the package."""
    return resources.files(__package__).joinpath("assets", name).read_bytes()


class Site:
    """What one server shows: one run, or the runs under a directory."""

    def __init__(self, target: str | Path) -> None:
        self.top = Path(target)
        self.single = (self.top / "catalog.db").is_file()
        self._boards: dict[str, Board] = {}
        self._lock = threading.Lock()
        self._runs: tuple[float, list[dict[str, Any]]] | None = None
        if self.single:
            self._boards[""] = Board(self.top, self.top.name)
            self._boards[""].warm()

    def board(self, name: str) -> Board | None:
        """The board of the run called ``name`` (``""``: the one run), or None."""
        with self._lock:
            b = self._boards.get(name)
            if b is not None or self.single:
                return b
            p = (self.top / name).resolve()
            if not p.is_relative_to(self.top.resolve()) or not (p / "catalog.db").is_file():
                return None
            b = self._boards[name] = Board(p, name)
            return b

    def runs(self) -> list[dict[str, Any]]:
        """``list_runs`` of the directory with each run's name and link, cached a refresh."""
        from ..runs import list_runs

        with self._lock:
            if self._runs is not None and time.monotonic() - self._runs[0] < REFRESH_S:
                return self._runs[1]
        rows = list_runs(self.top)
        for r in rows:
            name = Path(r["run"]).relative_to(self.top).as_posix()
            r["name"] = name
            r["url"] = f"/run/{urllib.parse.quote(name, safe='')}/"
        with self._lock:
            self._runs = (time.monotonic(), rows)
        return rows

    def all_metrics(self) -> list[tuple[str, dict[str, Any]]]:
        if self.single:
            b = self._boards[""]
            return [(b.name, b.metrics())]
        out = []
        for r in self.runs():
            b = self.board(r["name"])
            if b is not None and r["state"] != "unreadable":
                out.append((r["name"], b.metrics()))
        return out


class DashboardServer(ThreadingHTTPServer):
    daemon_threads = True  # an open SSE stream never keeps the process alive
    allow_reuse_address = True

    def __init__(self, addr: tuple[str, int], site: Site, token: str | None, bind: str) -> None:
        self.site = site
        self.token = token
        self.open_reads = is_loopback(bind)  # reads need the token only off loopback
        self.stopping = threading.Event()
        super().__init__(addr, Handler)


class Handler(BaseHTTPRequestHandler):
    server: DashboardServer
    protocol_version = "HTTP/1.1"
    server_version = "pipefarm"

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - the base's name
        pass  # a page refresh is no news on the terminal

    # --- replies -------------------------------------------------------------------------------
    def _send(self, status: int, body: bytes, ctype: str = "application/json",
              headers: dict[str, str] | None = None) -> None:
        self.send_response(status)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Cache-Control", "no-store")
        self.send_header("X-Content-Type-Options", "nosniff")
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def _json(self, obj: Any, status: int = 200) -> None:
        self._send(status, encode(obj))

    def _error(self, status: int, msg: str) -> None:
        self._json({"error": msg}, status)

    # --- the token -----------------------------------------------------------------------------
    def _given_token(self, form: dict[str, Any] | None = None) -> str | None:
        auth = self.headers.get("Authorization", "")
        if auth.startswith("Bearer "):
            return auth[7:].strip()
        if form and isinstance(form.get("token"), str):
            return form["token"]
        q = urllib.parse.parse_qs(urllib.parse.urlsplit(self.path).query)
        if q.get("token"):
            return q["token"][0]
        for part in self.headers.get("Cookie", "").split(";"):
            k, _, v = part.strip().partition("=")
            if k == "pipefarm_token":
                return urllib.parse.unquote(v)
        return None

    def _token_ok(self, form: dict[str, Any] | None = None) -> bool:
        want = self.server.token
        got = self._given_token(form)
        return bool(want) and got is not None and hmac.compare_digest(got.encode(), want.encode())

    # --- routing -------------------------------------------------------------------------------
    def _route(self) -> tuple[Board | None, str, bool]:
        """``(board, path within the run, found)``; board None with found: a site-wide path."""
        parts = urllib.parse.urlsplit(self.path).path.split("/")
        site = self.server.site
        if len(parts) >= 3 and parts[1] == "run" and not site.single:
            b = site.board(urllib.parse.unquote(parts[2]))
            return b, "/" + "/".join(parts[3:]), b is not None
        if site.single:
            return site.board(""), "/".join(parts) or "/", True
        return None, "/".join(parts) or "/", True

    def do_HEAD(self) -> None:
        self.do_GET()

    def do_GET(self) -> None:
        try:
            self._get()
        except (BrokenPipeError, ConnectionResetError):
            pass

    def do_POST(self) -> None:
        try:
            self._post()
        except (BrokenPipeError, ConnectionResetError):
            pass

    def _get(self) -> None:
        if not self.server.open_reads and not self._token_ok():
            return self._error(403, "this dashboard needs its token: ?token=T or "
                                    "Authorization: Bearer T")
        headers = {}
        q = urllib.parse.parse_qs(urllib.parse.urlsplit(self.path).query)
        if q.get("token") and self._token_ok():
            headers["Set-Cookie"] = (f"pipefarm_token={urllib.parse.quote(q['token'][0])};"
                                     " Path=/; HttpOnly; SameSite=Strict")
        board, path, found = self._route()
        if not found:
            return self._error(404, "no such run here")
        if path.startswith("/assets/"):
            name = path[len("/assets/"):]
            if "/" in name or name.startswith(".") or Path(name).suffix not in _TYPES:
                return self._error(404, "no such asset")
            try:
                return self._send(200, asset(name), _TYPES[Path(name).suffix])
            except (FileNotFoundError, IsADirectoryError):
                return self._error(404, "no such asset")
        if path == "/metrics":
            try:
                import prometheus_client  # noqa: F401 - the optional dependency (extra "web")

                from ..metrics import render
            except ImportError:
                return self._send(501, b"/metrics needs prometheus-client: "
                                       b"pip install 'pipefarm[web]'\n", "text/plain")
            site = self.server.site
            pairs = (lambda: [(board.name, board.metrics())]) if board is not None \
                else site.all_metrics
            body, ctype = render(pairs)
            return self._send(200, body, ctype)
        if board is None:  # the directory's own pages
            if path == "/":
                return self._send(200, asset("runs.html"), _TYPES[".html"], headers)
            if path == "/api/runs":
                return self._json(self.server.site.runs())
            return self._error(404, "no such page")
        if path == "":  # /run/<name> -> /run/<name>/ so that relative links work
            return self._send(301, b"", headers={"Location": self.path.split("?")[0] + "/"})
        if path in ("/", "/index.html"):
            return self._send(200, asset("index.html"), _TYPES[".html"], headers)
        return self._api_get(board, path, q)

    def _api_get(self, board: Board, path: str, q: dict[str, list[str]]) -> None:
        if path == "/api/events":
            return self._events(board)
        part = {"/api/stream": "stream", "/api/durations": "durations", "/api/failures": "failures",
                "/api/throughput": "throughput", "/api/workers": "workers",
                "/api/overview": "overview", "/api/running": "running"}.get(path)
        if path == "/api/snapshot" or part:
            p, body, _ = board.payload()
            return self._send(200, body) if part is None else self._json(p[part])
        kind, _, num = path[len("/api/"):].partition("/")
        if kind in ("task", "log") and path.startswith("/api/") and num.isdigit():
            try:
                if kind == "task":
                    return self._json(board.task(int(num)))
                attempt = int(q["attempt"][0]) if q.get("attempt") else None
                stream = q.get("stream", ["stdout"])[0]
                if stream not in ("stdout", "stderr"):
                    return self._error(400, "stream is stdout or stderr")
                return self._send(200, board.log(int(num), attempt, stream),
                                  "text/plain; charset=utf-8")
            except KeyError:
                return self._error(404, f"no task {num}")
            except OSError as exc:
                return self._error(410, f"task {num}'s output cannot be read: {exc}")
        return self._error(404, "no such page")

    def _events(self, board: Board) -> None:
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.send_header("Cache-Control", "no-store")
        self.send_header("Connection", "close")
        self.end_headers()
        self.close_connection = True
        sent, quiet_since = -1, time.monotonic()
        while not self.server.stopping.is_set():
            _, body, version = board.payload()
            if version != sent:
                self.wfile.write(b"data: " + body + b"\n\n")
                sent, quiet_since = version, time.monotonic()
            elif time.monotonic() - quiet_since > KEEPALIVE_S:
                self.wfile.write(b": keepalive\n\n")
                quiet_since = time.monotonic()
            self.wfile.flush()
            self.server.stopping.wait(REFRESH_S)

    def _form(self) -> dict[str, Any]:
        n = int(self.headers.get("Content-Length") or 0)
        if n > MAX_BODY:
            raise ValueError("request too large")
        raw = self.rfile.read(n) if n else b""
        ctype = self.headers.get("Content-Type", "")
        if "json" in ctype:
            data = json.loads(raw or b"{}")
            if not isinstance(data, dict):
                raise ValueError("the body must be a JSON object")
            return data
        return {k: v[0] for k, v in urllib.parse.parse_qs(raw.decode()).items()}

    def _post(self) -> None:
        try:
            form = self._form()
        except (ValueError, UnicodeDecodeError) as exc:
            return self._error(400, f"cannot read the request: {exc}")
        board, path, found = self._route()
        if not found or board is None or path not in ("/api/retry", "/api/cancel"):
            return self._error(404, "no such action")
        if not self._token_ok(form):
            why = ("actions need the token given to pipefarm serve --token"
                   if self.server.token else "actions are off: start pipefarm serve with --token T")
            return self._error(403, why)
        try:
            ids = _ids(form.get("ids"))
        except ValueError:
            return self._error(400, "ids: a list of task ids, or '1,2,3'")
        if form.get("signature"):
            ids = sorted(set(ids or []) | set(board.group_ids(str(form["signature"]))))
            if not ids:
                return self._error(404, "no failed task has that signature now")
        from ...errors import PipefarmError
        from ...run import Run

        try:
            with Run.open(board.path) as run:
                if path == "/api/retry":
                    if ids is None:
                        return self._error(400, "say which tasks: ids or signature")
                    n = run.retry(ids, force=bool(form.get("force")))
                    return self._json({"retried": n, "ids": ids[:1000]})
                n = run.cancel(ids)
                return self._json({"cancelled": n})
        except PipefarmError as exc:
            return self._error(409, str(exc).splitlines()[0])


def _ids(v: Any) -> list[int] | None:
    if v is None or v == "":
        return None
    if isinstance(v, str):
        return [int(x) for x in v.replace(" ", "").split(",") if x]
    if isinstance(v, list):
        return [int(x) for x in v]
    raise ValueError(v)
