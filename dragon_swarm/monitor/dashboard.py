"""The local web dashboard: one HTML page, its JSON feed, Start/Stop, and Prometheus `/metrics`.

A small WSGI app on werkzeug (routing, HEAD, 404/405, body limits) served by the standard library's
`wsgiref` server, one thread per request, from a daemon thread so a hung browser can never keep the peer
alive. Routes (each GET route answers HEAD too):

    GET  /, /index.html  the page (static/dashboard.html; it polls /api/status every second)
    GET  /api/status     PeerStatus.snapshot() as JSON (NaN and infinities as null)
    GET  /metrics        the same snapshot in Prometheus text format 0.0.4 (monitor/metrics.py)
    POST /api/stop       PauseGate.pause()  -> {"paused": true}
    POST /api/start      PauseGate.resume() -> {"paused": false}

The dashboard controls training, so the POST routes are guarded: with no gate (a bootstrap monitor) they
answer 403, and a POST whose `Origin` is some other site answers 403 too, so a web page the volunteer visits
cannot pause their peer behind their back (CSRF). Bind to 127.0.0.1 (the default) unless the volunteer asks
otherwise: anyone who can reach the port can press Stop. Every answer is JSON except the page and /metrics,
and carries `Cache-Control: no-store` and `X-Content-Type-Options: nosniff`.
"""

from __future__ import annotations

import ipaddress
import json
import logging
import math
import socket
import threading
from collections.abc import Callable, Iterable
from importlib import resources
from socketserver import ThreadingMixIn
from typing import Any
from urllib.parse import urlsplit
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

from prometheus_client import generate_latest
from werkzeug.exceptions import BadRequest, Forbidden, HTTPException, MethodNotAllowed, NotFound
from werkzeug.routing import Map, Rule
from werkzeug.wrappers import Request, Response

from dragon_swarm.events import PauseGate
from dragon_swarm.monitor.metrics import CONTENT_TYPE as METRICS_CONTENT_TYPE
from dragon_swarm.monitor.metrics import metrics_registry
from dragon_swarm.monitor.status import PeerStatus

logger = logging.getLogger(__name__)

DEFAULT_HOST = "127.0.0.1"
MAX_BODY_BYTES = 64 * 1024  # the control endpoints take no body; anything bigger is not our page
SERVER_NAME = "dragon-dashboard"  # the Server header: no library or Python versions
_LOOPBACK_NAMES = ("127.0.0.1", "localhost", "::1")
_WILDCARD_HOSTS = ("0.0.0.0", "::", "")

_COMMON_HEADERS = {
    "Cache-Control": "no-store",  # live numbers: never show a stale copy
    "X-Content-Type-Options": "nosniff",
    "Server": SERVER_NAME,
}
# The page is fully inline and only talks to its own origin; refusing frames stops clickjacking
# of the Stop button.
_PAGE_SECURITY_HEADERS = {
    "Content-Security-Policy": (
        "default-src 'none'; script-src 'unsafe-inline'; style-src 'unsafe-inline'; "
        "connect-src 'self'; img-src 'self' data:; frame-ancestors 'none'; base-uri 'none'; form-action 'none'"
    ),
    "X-Frame-Options": "DENY",
}
# No redirects: "/api/stop/" is a 404, not a way around the exact path; "//api/stop" is the same path.
_ROUTES = Map(
    [
        Rule("/", endpoint="page", methods=["GET"]),
        Rule("/index.html", endpoint="page", methods=["GET"]),
        Rule("/api/status", endpoint="status", methods=["GET"]),
        Rule("/metrics", endpoint="metrics", methods=["GET"]),
        Rule("/api/stop", endpoint="stop", methods=["POST"]),
        Rule("/api/start", endpoint="start", methods=["POST"]),
    ],
    merge_slashes=False,
    redirect_defaults=False,
)


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


# --- HTTP plumbing ---


class _Request(Request):
    max_content_length = MAX_BODY_BYTES  # get_data() answers 413 beyond it, without reading


def _json(payload: Any, status: int = 200, headers: dict[str, str] | None = None) -> Response:
    return Response(json.dumps(payload), status, headers, mimetype="application/json")


def _error(request: Request, error: HTTPException) -> Response:
    """Every error as JSON {"error": ...}; a 405 names the allowed methods in `Allow`."""
    if isinstance(error, MethodNotAllowed):
        allowed = ", ".join(sorted(error.valid_methods or ()))
        return _json({"error": f"{request.path} takes {allowed}"}, 405, {"Allow": allowed})
    if isinstance(error, NotFound):
        return _json({"error": f"no such page: {request.path}"}, 404)
    return _json({"error": error.description}, error.code or 500)


def _drain(request: Request) -> None:
    """Read the (ignored) body, so the client is not cut off mid-send: 400 for a Content-Length that is not a
    number (werkzeug would take it as 0), 413 past MAX_BODY_BYTES."""
    length = request.headers.get("Content-Length")  # "" when absent (wsgiref)
    if length and not (length.isascii() and length.isdecimal()):
        raise BadRequest(f"bad Content-Length {length!r}")
    request.get_data()


class _Server(ThreadingMixIn, WSGIServer):
    daemon_threads = True  # a stuck client must not keep the process alive on exit

    def handle_error(self, request: Any, client_address: Any) -> None:
        # The default prints a traceback to stderr; a client that hangs up mid-answer is routine.
        logger.debug("Dashboard request from %s failed", client_address, exc_info=True)


class _V6Server(_Server):
    address_family = socket.AF_INET6


class _Handler(WSGIRequestHandler):
    server_version = SERVER_NAME  # for the few answers wsgiref writes itself (a malformed request line)
    sys_version = ""

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 (the stdlib's signature)
        # The page polls every second: request lines belong at DEBUG, not on the volunteer's console.
        logger.debug("Dashboard %s: " + format, self.address_string(), *args)


# --- the dashboard ---


class Dashboard:
    """Serves the web dashboard of one `PeerStatus`; `gate=None` makes it read-only.

    Lifecycle: construct (binds nothing), `start()` (binds, serves from a daemon thread),
    `shutdown()` (stops serving, closes the socket and joins the thread; idempotent). Port 0 picks a
    free port; `url` then reports the real one.
    """

    def __init__(self, status: PeerStatus, gate: PauseGate | None, host: str = DEFAULT_HOST, port: int = 0):
        self.status = status
        self.gate = gate
        self.host = host
        self.port = port
        self.page = _load_page()  # read at construction: a broken install fails before we bind
        self._registry = metrics_registry(status.snapshot)
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()
        self._closed = False

    @property
    def read_only(self) -> bool:
        return self.gate is None

    def start(self) -> None:
        """Bind host:port and serve in a daemon thread. Raises OSError when the port is taken."""
        with self._lock:
            if self._server is not None or self._closed:
                raise RuntimeError("Dashboard.start() may be called once")
            server_class = _V6Server if ":" in self.host else _Server
            server = make_server(self.host, self.port, self.wsgi_app, server_class, _Handler)
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

    # --- the WSGI app ---

    def wsgi_app(self, environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
        request = _Request(environ)
        try:
            _drain(request)
            endpoint, _ = _ROUTES.bind_to_environ(environ).match()
            response = getattr(self, f"_{endpoint}")(request)
        except HTTPException as error:
            response = _error(request, error)
        except Exception:
            logger.exception("Dashboard failed to answer %s %s", request.method, request.path)
            response = _json({"error": "internal error"}, 500)
        response.headers.update(_COMMON_HEADERS)
        return response(environ, start_response)  # werkzeug drops the body of a HEAD answer

    def _page(self, request: Request) -> Response:
        return Response(self.page, mimetype="text/html", headers=_PAGE_SECURITY_HEADERS)

    def _status(self, request: Request) -> Response:
        return _json(_finite(self.status.snapshot()))

    def _metrics(self, request: Request) -> Response:
        return Response(generate_latest(self._registry), content_type=METRICS_CONTENT_TYPE)

    def _stop(self, request: Request) -> Response:
        return self._control(request, pause=True)

    def _start(self, request: Request) -> Response:
        return self._control(request, pause=False)

    def _control(self, request: Request, pause: bool) -> Response:
        if self.gate is None:
            raise Forbidden("read-only dashboard: this peer cannot be started or stopped")
        origin = request.headers.get("Origin")
        if origin is not None and not self._origin_allowed(origin, request.headers.get("Host")):
            logger.warning("Dashboard refused a %s from foreign origin %r", request.path, origin)
            raise Forbidden("cross-origin request refused")
        if pause:
            self.gate.pause()
        else:
            self.gate.resume()
        return _json({"paused": self.gate.paused})

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
