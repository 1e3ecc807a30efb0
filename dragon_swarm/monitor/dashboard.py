"""The local web dashboard: one HTML page, its JSON feed, Start/Stop, and Prometheus `/metrics`.

Stdlib only (`http.server`), served from a daemon thread so a hung browser can never keep the peer
alive. Routes:

    GET  /             the page (static/dashboard.html; it polls /api/status every second)
    GET  /api/status   PeerStatus.snapshot() as JSON, never cached
    GET  /metrics      the same snapshot in Prometheus text format 0.0.4
    POST /api/stop     TrainingSwitch.pause()  -> {"paused": true}
    POST /api/start    TrainingSwitch.resume() -> {"paused": false}

The dashboard controls training, so the POST routes are guarded: with no switch (a bootstrap
monitor) they answer 403, and a POST whose `Origin` is some other site answers 403 too, so a web
page the volunteer visits cannot pause their peer behind their back (CSRF). Bind to 127.0.0.1 (the
default) unless the volunteer asks otherwise: anyone who can reach the port can press Stop.
"""

from __future__ import annotations

import ipaddress
import json
import logging
import math
import socket
import threading
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from importlib import resources
from typing import Any
from urllib.parse import urlsplit

from dragon_swarm.monitor.metrics import CONTENT_TYPE as METRICS_CONTENT_TYPE
from dragon_swarm.monitor.metrics import prometheus_text
from dragon_swarm.monitor.status import PeerStatus, TrainingSwitch

logger = logging.getLogger(__name__)

DEFAULT_HOST = "127.0.0.1"
MAX_BODY_BYTES = 64 * 1024  # the control endpoints take no body; anything bigger is not our page
_LOOPBACK_NAMES = ("127.0.0.1", "localhost", "::1")
_WILDCARD_HOSTS = ("0.0.0.0", "::", "")

# The page is fully inline and only talks to its own origin; refusing frames stops clickjacking
# of the Stop button.
_PAGE_SECURITY_HEADERS = {
    "Content-Security-Policy": (
        "default-src 'none'; script-src 'unsafe-inline'; style-src 'unsafe-inline'; "
        "connect-src 'self'; img-src 'self' data:; frame-ancestors 'none'; base-uri 'none'; form-action 'none'"
    ),
    "X-Frame-Options": "DENY",
}


def parse_listen_address(text: str) -> tuple[str, int]:
    """Parse `--dashboard` style addresses: "PORT", "HOST:PORT", ":PORT" or "[IPv6]:PORT".

    Returns (host, port) with the host unbracketed; a missing host means 127.0.0.1 (local only).
    Port 0 asks the OS for a free port. Raises ValueError with a message naming the bad input when
    the port is not an integer in 0..65535, the host is empty-bracketed or malformed, or an IPv6
    address is given without brackets (where its port would be ambiguous).
    """
    raw = text
    text = text.strip()
    if not text:
        raise ValueError("empty listen address: expected PORT, HOST:PORT or [IPv6]:PORT")
    if text.startswith("["):
        close = text.find("]")
        if close < 0 or not text[close + 1 :].startswith(":"):
            raise ValueError(f"bad listen address {raw!r}: expected [IPv6]:PORT, e.g. [::1]:8080")
        host, port_text = text[1:close], text[close + 2 :]
        try:
            ipaddress.IPv6Address(host)
        except ValueError:
            raise ValueError(f"bad listen address {raw!r}: {host!r} is not an IPv6 address") from None
    elif ":" in text:
        host, _, port_text = text.rpartition(":")
        if ":" in host:
            raise ValueError(f"bad listen address {raw!r}: put an IPv6 host in brackets, e.g. [::1]:8080")
        host = host or DEFAULT_HOST
    else:
        host, port_text = DEFAULT_HOST, text
    if any(ch.isspace() or ch in "/?#@" for ch in host):
        raise ValueError(f"bad listen address {raw!r}: {host!r} is not a host name or address")
    # isdecimal rather than int(): int() also takes "+80", " 80" and "8_0".
    if not port_text.isascii() or not port_text.isdecimal():
        raise ValueError(f"bad listen address {raw!r}: port {port_text!r} is not a number in 0..65535")
    port = int(port_text)
    if not 0 <= port <= 65535:
        raise ValueError(f"bad listen address {raw!r}: port {port} is out of range 0..65535")
    return host, port


def _finite(value: Any) -> Any:
    """Replace NaN/Inf by None, recursively: browsers' JSON.parse rejects Python's `NaN` literal."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {key: _finite(item) for key, item in value.items()}
    if isinstance(value, list):
        return [_finite(item) for item in value]
    return value


def _load_page() -> bytes:
    return resources.files("dragon_swarm.monitor").joinpath("static", "dashboard.html").read_bytes()


def _netloc(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def _is_ip_literal(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


def _is_loopback(host: str) -> bool:
    return _is_ip_literal(host) and ipaddress.ip_address(host).is_loopback


class _Server(ThreadingHTTPServer):
    daemon_threads = True  # a stuck client must not keep the process alive on exit
    dashboard: Dashboard

    def handle_error(self, request: Any, client_address: Any) -> None:
        # The default prints a traceback to stderr; a client that hangs up mid-answer is routine.
        logger.debug("Dashboard request from %s failed", client_address, exc_info=True)


class _V6Server(_Server):
    address_family = socket.AF_INET6


class _Handler(BaseHTTPRequestHandler):
    server: _Server
    protocol_version = "HTTP/1.1"  # keep-alive: the page polls every second
    server_version = "dragon-dashboard"
    sys_version = ""

    # --- routing ---

    def do_GET(self) -> None:
        self._route("GET")

    def do_HEAD(self) -> None:
        self._route("HEAD")

    def do_POST(self) -> None:
        self._route("POST")

    def _route(self, method: str) -> None:
        dashboard = self.server.dashboard
        path = urlsplit(self.path).path
        try:
            if method == "POST" and not self._read_body():
                return
            routes = {
                "/": ("GET", self._page),
                "/index.html": ("GET", self._page),
                "/api/status": ("GET", self._status),
                "/metrics": ("GET", self._metrics),
                "/api/stop": ("POST", lambda: self._control(dashboard.switch.pause if dashboard.switch else None)),
                "/api/start": ("POST", lambda: self._control(dashboard.switch.resume if dashboard.switch else None)),
            }
            if path not in routes:
                self._send_json(HTTPStatus.NOT_FOUND, {"error": f"no such page: {path}"})
                return
            allowed, handler = routes[path]
            if method == "HEAD" and allowed == "GET":
                method = "GET"  # answered as GET; _send drops the body
            if method != allowed:
                self._send_json(
                    HTTPStatus.METHOD_NOT_ALLOWED, {"error": f"{path} takes {allowed}"}, {"Allow": allowed}
                )
                return
            handler()
        except (BrokenPipeError, ConnectionResetError):
            logger.debug("Dashboard client %s hung up", self.client_address)
        except Exception:
            logger.exception("Dashboard failed to answer %s %s", method, path)
            try:
                self._send_json(HTTPStatus.INTERNAL_SERVER_ERROR, {"error": "internal error"})
            except OSError:
                pass

    # --- pages ---

    def _page(self) -> None:
        self._send(HTTPStatus.OK, self.server.dashboard.page, "text/html; charset=utf-8", _PAGE_SECURITY_HEADERS)

    def _status(self) -> None:
        self._send_json(HTTPStatus.OK, _finite(self.server.dashboard.status.snapshot()))

    def _metrics(self) -> None:
        body = prometheus_text(self.server.dashboard.status.snapshot()).encode()
        self._send(HTTPStatus.OK, body, METRICS_CONTENT_TYPE)

    def _control(self, action: Any) -> None:
        dashboard = self.server.dashboard
        if action is None:
            self._send_json(HTTPStatus.FORBIDDEN, {"error": "read-only dashboard: this peer cannot be started or stopped"})
            return
        origin = self.headers.get("Origin")
        if origin is not None and not dashboard._origin_allowed(origin, self.headers.get("Host")):
            logger.warning("Dashboard refused a %s from foreign origin %r", self.path, origin)
            self._send_json(HTTPStatus.FORBIDDEN, {"error": "cross-origin request refused"})
            return
        action()
        self._send_json(HTTPStatus.OK, {"paused": dashboard.switch.paused})

    # --- plumbing ---

    def _read_body(self) -> bool:
        """Drain the (ignored) request body so keep-alive stays in sync; False when answered with an error."""
        length_text = self.headers.get("Content-Length", "0")
        try:
            length = int(length_text)
            if length < 0:
                raise ValueError
        except ValueError:
            self.close_connection = True
            self._send_json(HTTPStatus.BAD_REQUEST, {"error": f"bad Content-Length {length_text!r}"})
            return False
        if length > MAX_BODY_BYTES:
            self.close_connection = True  # do not read it: the rest of the stream is garbage to us
            self._send_json(HTTPStatus.REQUEST_ENTITY_TOO_LARGE, {"error": "request body too large"})
            return False
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            self.close_connection = True  # we do not parse chunks; closing keeps the next request sane
        elif length:
            self.rfile.read(length)
        return True

    def _send_json(self, code: HTTPStatus, payload: Any, headers: dict[str, str] | None = None) -> None:
        self._send(code, json.dumps(payload).encode(), "application/json", headers)

    def _send(self, code: HTTPStatus, body: bytes, content_type: str, headers: dict[str, str] | None = None) -> None:
        self.send_response(code)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Cache-Control", "no-store")  # live numbers: never show a stale copy
        self.send_header("X-Content-Type-Options", "nosniff")
        for key, value in (headers or {}).items():
            self.send_header(key, value)
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 (the stdlib's signature)
        # The page polls every second: request lines belong at DEBUG, not on the volunteer's console.
        logger.debug("Dashboard %s: " + format, self.address_string(), *args)


class Dashboard:
    """Serves the web dashboard of one `PeerStatus`; `switch=None` makes it read-only.

    Lifecycle: construct (binds nothing), `start()` (binds, serves from a daemon thread),
    `shutdown()` (stops serving, closes the socket and joins the thread; idempotent). Port 0 picks a
    free port; `url` then reports the real one.
    """

    def __init__(
        self,
        status: PeerStatus,
        switch: TrainingSwitch | None,
        host: str = DEFAULT_HOST,
        port: int = 0,
    ):
        self.status = status
        self.switch = switch
        self.host = host
        self.port = port
        self.page = _load_page()  # read at construction: a broken install fails before we bind
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()
        self._closed = False

    @property
    def read_only(self) -> bool:
        return self.switch is None

    def start(self) -> None:
        """Bind host:port and serve in a daemon thread. Raises OSError when the port is taken."""
        with self._lock:
            if self._server is not None or self._closed:
                raise RuntimeError("Dashboard.start() may be called once")
            server_class = _V6Server if ":" in self.host else _Server
            server = server_class((self.host, self.port), _Handler)
            server.dashboard = self
            self.port = server.server_address[1]
            self._server = server
            self._thread = threading.Thread(
                target=server.serve_forever, kwargs={"poll_interval": 0.1}, name="dashboard", daemon=True
            )
            self._thread.start()
        logger.info("Dashboard at %s%s", self.url, " (read-only)" if self.read_only else "")

    @property
    def url(self) -> str:
        """"http://HOST:PORT/" with the bound port (after start()); a wildcard host reads as 127.0.0.1."""
        host = DEFAULT_HOST if self.host in _WILDCARD_HOSTS else self.host
        return f"http://{_netloc(host, self.port)}/"

    def shutdown(self, timeout_s: float = 5.0) -> None:
        """Stop serving, close the socket and join the thread. Safe to call twice or before start()."""
        with self._lock:
            server, thread, self._server, self._thread = self._server, self._thread, None, None
            self._closed = True
        if server is None:
            return
        server.shutdown()  # returns once serve_forever has left its loop
        server.server_close()
        if thread is not None:
            thread.join(timeout_s)

    def _origin_allowed(self, origin: str, host_header: str | None) -> bool:
        """Whether a POST's Origin is this dashboard itself, as the volunteer's browser may name it.

        Allowed: the bound address; localhost/127.0.0.1/[::1] when bound to loopback or a wildcard;
        and the request's own Host when it is an IP literal (a LAN address on a wildcard bind).
        A *host name* in Host is not trusted: with DNS rebinding, evil.example can resolve to us.
        """
        try:
            parts = urlsplit(origin)
            origin_port = parts.port or 80
        except ValueError:
            return False
        if parts.scheme != "http" or not parts.hostname or origin_port != self.port:
            return False  # includes "null" (sandboxed frames, file:// pages)
        allowed = {self.host.lower()}
        if self.host in _WILDCARD_HOSTS or self.host == "localhost" or _is_loopback(self.host):
            allowed.update(_LOOPBACK_NAMES)
        if host_header:
            try:
                own = urlsplit(f"//{host_header}")
                if own.hostname and _is_ip_literal(own.hostname) and (own.port or 80) == self.port:
                    allowed.add(own.hostname)
            except ValueError:
                pass
        return parts.hostname in allowed
