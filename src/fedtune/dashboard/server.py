"""The live dashboard: a read-only web page over a run directory, served by the standard library.

``GET /`` is the page (packaged with fedtune: HTML, CSS and a plain-JS file that draws SVG; nothing is fetched
from anywhere else), ``GET /api/run`` the run as JSON (``fedtune.run.runview``: metrics.jsonl and
status.json), polled by the page every second. Nothing can be changed through it (GET and HEAD only).

Access: bound to 127.0.0.1 unless told otherwise, and guarded by a random token (printed in the URL at start)
that the page sends as ``Authorization: Bearer`` (``?token=`` works too); it is compared in constant time, and
without it the server shows nothing of the run. Responses forbid framing, sniffing, caching and referrers, and
a Content-Security-Policy lets the page load only its own files.
"""

from __future__ import annotations

import hmac
import json
import logging
import secrets
import threading
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from importlib import resources
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

from rich.console import Console

from fedtune.errors import FedtuneError
from fedtune.run.rundir import clean_json
from fedtune.run.runview import RunView
from fedtune.run.sinks import BaseSink, RunEnd, RunInfo

log = logging.getLogger("fedtune.dashboard")
DEFAULT_PORT = 8765
STATIC = {"app.js": "text/javascript", "style.css": "text/css"}  # public: they hold nothing of the run
HEADERS = {
    "Content-Security-Policy": (
        "default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; img-src 'self' data:; "
        "base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
    ),
    "X-Content-Type-Options": "nosniff",
    "X-Frame-Options": "DENY",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-store",
}


def _asset(name: str) -> bytes:
    return resources.files("fedtune.dashboard").joinpath("static", name).read_bytes()


class _Handler(BaseHTTPRequestHandler):
    server: _Server
    server_version = "fedtune-dashboard"
    sys_version = ""

    def log_message(self, format: str, *args: object) -> None:
        log.debug("%s %s", self.address_string(), format % args)

    def _send(self, status: int, body: bytes, content_type: str, *, head: bool = False) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        for key, value in HEADERS.items():
            self.send_header(key, value)
        self.end_headers()
        if not head:
            self.wfile.write(body)

    def _authorized(self, query: dict[str, list[str]]) -> bool:
        expected = self.server.token
        if expected is None:
            return True
        header = self.headers.get("Authorization", "")
        given = header[7:] if header.startswith("Bearer ") else (query.get("token") or [""])[0]
        return hmac.compare_digest(given.encode(), expected.encode())  # constant time

    def do_GET(self, head: bool = False) -> None:
        url = urlsplit(self.path)
        path, query = url.path, parse_qs(url.query)
        name = path.lstrip("/")
        if name in STATIC:
            self._send(200, _asset(name), f"{STATIC[name]}; charset=utf-8", head=head)
            return
        if path not in ("/", "/index.html", "/api/run"):
            self._send(404, b"not found\n", "text/plain; charset=utf-8", head=head)
            return
        if not self._authorized(query):
            body = b"this dashboard needs its access token: open the URL fedtune printed (.../?token=...)\n"
            self._send(401, body, "text/plain; charset=utf-8", head=head)
            return
        if path == "/api/run":
            body = json.dumps(clean_json(self.server.view.snapshot()), allow_nan=False, default=str).encode()
            self._send(200, body, "application/json", head=head)
        else:
            self._send(200, _asset("index.html"), "text/html; charset=utf-8", head=head)

    def do_HEAD(self) -> None:
        self.do_GET(head=True)

    def _read_only(self) -> None:
        self._send(HTTPStatus.METHOD_NOT_ALLOWED, b"read-only\n", "text/plain; charset=utf-8")

    do_POST = do_PUT = do_DELETE = do_PATCH = _read_only


class _Server(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, address: tuple[str, int], view: RunView, token: str | None) -> None:
        super().__init__(address, _Handler)
        self.view, self.token = view, token


class Dashboard:
    """``start()`` serves ``run_dir`` from a background thread and returns the URL (with its token)."""

    def __init__(
        self, run_dir: Path, *, host: str = "127.0.0.1", port: int = DEFAULT_PORT, token: str | None = ""
    ) -> None:
        """``token``: "" draws a random one; None turns authentication off (tests and trusted machines only)."""
        self.run_dir, self.host, self.port = Path(run_dir), host, port
        self.token = secrets.token_urlsafe(24) if token == "" else token
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}/" + (f"?token={self.token}" if self.token else "")

    def start(self) -> str:
        try:
            self._server = _Server((self.host, self.port), RunView(self.run_dir), self.token)
        except OSError as err:
            raise FedtuneError(
                f"the dashboard cannot listen on {self.host}:{self.port}: {err.strerror} "
                "(give another port, or 0 for any free one)"
            ) from None
        self.port = self._server.server_address[1]
        self._thread = threading.Thread(target=self._server.serve_forever, name="fedtune-dashboard", daemon=True)
        self._thread.start()
        return self.url

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None


class DashboardSink(BaseSink):
    """``--dashboard``: serve the run directory while the run goes, from the moment it is open."""

    def __init__(self, console: Console, *, host: str = "127.0.0.1", port: int = DEFAULT_PORT) -> None:
        self.console, self.host, self.port = console, host, port
        self.dashboard: Dashboard | None = None

    def on_start(self, run: RunInfo) -> None:
        self.dashboard = Dashboard(run.run_dir, host=self.host, port=self.port)
        url = self.dashboard.start()
        self.console.print(f"dashboard: {url}", soft_wrap=True)
        if self.host not in ("127.0.0.1", "localhost", "::1"):
            self.console.print(
                "[yellow]the dashboard listens beyond this machine over plain HTTP: anyone who sees the URL's "
                "token can read the run; prefer an SSH tunnel to 127.0.0.1[/yellow]"
            )

    def close(self, end: RunEnd) -> None:
        if self.dashboard is not None:
            self.dashboard.stop()


def serve_run_dir(run_dir: Path, console: Console, *, host: str = "127.0.0.1", port: int = DEFAULT_PORT) -> None:
    """``fedtune dashboard RUN_DIR``: serve a finished or running run until Ctrl-C."""
    run_dir = Path(run_dir)
    if not (run_dir / "config.yaml").is_file() and not (run_dir / "metrics.jsonl").is_file():
        raise FedtuneError(f"{run_dir} is not a fedtune run directory (no config.yaml or metrics.jsonl)")
    dashboard = Dashboard(run_dir, host=host, port=port)
    try:  # Ctrl-C at any moment after the start, even right after the URL is printed, stops it cleanly
        url = dashboard.start()
        console.print(f"dashboard of {run_dir}: {url}  (Ctrl-C to stop)", soft_wrap=True)
        threading.Event().wait()
    except KeyboardInterrupt:
        pass
    finally:
        dashboard.stop()
