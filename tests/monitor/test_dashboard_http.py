"""The dashboard's HTTP routes against a real PeerStatus and PauseGate, on a loopback port."""

from __future__ import annotations

import http.client
import json
import re
import socket
import urllib.error
import urllib.request
from collections.abc import Iterator

import pytest

from dragon_swarm.events import PauseGate
from dragon_swarm.monitor.dashboard import MAX_BODY_BYTES, Dashboard, parse_listen_address
from dragon_swarm.monitor.status import ExpertCell, LeaderboardRow, PeerState, PeerStatus, SwarmStats
from tests.monitor.serving import serving, wired_gate

TIMEOUT_S = 10


def _status(read_only: bool = False) -> PeerStatus:
    status = PeerStatus(name="ada", peer_id="QmAda", swarm="tiny", read_only=read_only)
    status.set_state(PeerState.TRAINING)
    status.record_step(micro_batches=12, loss=3.25, tokens_per_second=2048.0)
    status.update_model(global_epoch=3, samples_accumulated=10, target_batch_size=64)
    status.update_contribution(micro_batches=12, tokens=24576, expert_requests=7)
    status.update_swarm(
        SwarmStats(peers_alive=2, trainers=2, experts_online=1, experts_total=2, replicas=1, swarm_tokens=50000),
        expert_map=[ExpertCell("expert.0", 1, True), ExpertCell("expert.1", 0, False)],
        leaderboard=[LeaderboardRow("ada", "QmAda", 24576, 12, 7, 60.0, None)],
    )
    status.record_event("joined the swarm")
    return status


@pytest.fixture
def served() -> Iterator[tuple[Dashboard, PeerStatus, PauseGate]]:
    status = _status()
    gate = wired_gate(status)
    with serving(status, gate) as dashboard:
        yield dashboard, status, gate


@pytest.fixture
def read_only() -> Iterator[Dashboard]:
    with serving(_status(read_only=True), None) as dashboard:
        yield dashboard


def _request(dashboard: Dashboard, method: str, path: str, headers: dict[str, str] | None = None, body: bytes | None = None):
    """(status code, headers, body) — urllib raises on 4xx, so read the error as a response."""
    request = urllib.request.Request(dashboard.url.rstrip("/") + path, method=method, headers=headers or {}, data=body)
    try:
        with urllib.request.urlopen(request, timeout=TIMEOUT_S) as response:
            return response.status, response.headers, response.read()
    except urllib.error.HTTPError as error:
        with error:
            return error.code, error.headers, error.read()


def test_url_reports_the_bound_port(served):
    dashboard, _, _ = served
    assert re.fullmatch(r"http://127\.0\.0\.1:\d+/", dashboard.url)
    assert dashboard.port != 0


def test_index_serves_the_page(served):
    code, headers, body = _request(served[0], "GET", "/")
    assert code == 200
    assert headers["Content-Type"].startswith("text/html")
    assert "frame-ancestors 'none'" in headers["Content-Security-Policy"]
    assert headers["X-Frame-Options"] == "DENY"
    for element_id in ("state", "micro-batches", "loss", "progress", "expert-map", "leaderboard", "events", "start-button", "stop-button"):
        assert f'id="{element_id}"' in body.decode()


def test_status_json_matches_the_snapshot(served):
    dashboard, status, _ = served
    code, headers, body = _request(dashboard, "GET", "/api/status")
    assert code == 200
    assert headers["Content-Type"] == "application/json"
    assert headers["Cache-Control"] == "no-store"
    got, expected = json.loads(body), status.snapshot()
    assert got.keys() == expected.keys()
    for key in ("name", "peer_id", "swarm", "state", "paused", "read_only", "model", "training", "contribution",
                "swarm_stats", "expert_map", "leaderboard", "events", "history", "history_x"):
        assert got[key] == expected[key], key
    assert got["training"] == {"micro_batches": 12, "loss": 3.25, "tokens_per_second": 2048.0}
    assert got["contribution"]["micro_batches"] == 12
    assert [(p["x"], p["loss"]) for p in got["history"]] == [(12, 3.25)] and got["history_x"] == "micro_batches"


def test_status_json_is_valid_when_the_loss_is_nan(served):
    # Python would write the bare token NaN, which the page's JSON.parse rejects.
    dashboard, status, _ = served
    status.record_step(micro_batches=13, loss=float("nan"), tokens_per_second=float("inf"))
    _, _, body = _request(dashboard, "GET", "/api/status")
    got = json.loads(body, parse_constant=lambda token: pytest.fail(f"non-standard JSON token {token}"))
    assert got["training"]["loss"] is None and got["training"]["tokens_per_second"] is None
    assert got["training"]["micro_batches"] == 13
    assert got["history"][-1]["loss"] is None


def test_metrics_are_prometheus_text(served):
    code, headers, body = _request(served[0], "GET", "/metrics")
    assert code == 200
    assert headers["Content-Type"].startswith("text/plain; version=0.0.4")
    lines = body.decode().splitlines()
    assert "dragon_micro_batches_total 12.0" in lines
    assert not any(line.startswith("dragon_steps_total") for line in lines)
    assert 'dragon_peer_state{state="TRAINING"} 1.0' in lines
    assert all(re.fullmatch(r"# (HELP|TYPE) .+|[a-z_]+(\{.*\})? \S+", line) for line in lines)


def test_stop_and_start_flip_the_gate(served):
    dashboard, status, gate = served
    code, _, body = _request(dashboard, "POST", "/api/stop")
    assert (code, json.loads(body)) == (200, {"paused": True})
    assert gate.paused and status.snapshot()["paused"]
    code, _, body = _request(dashboard, "POST", "/api/start", headers={"Origin": dashboard.url.rstrip("/")})
    assert (code, json.loads(body)) == (200, {"paused": False})
    assert not gate.paused and not status.snapshot()["paused"]


def test_localhost_origin_is_the_dashboard_itself(served):
    dashboard, _, gate = served
    code, _, _ = _request(dashboard, "POST", "/api/stop", headers={"Origin": f"http://localhost:{dashboard.port}"})
    assert code == 200 and gate.paused


@pytest.mark.parametrize(
    "origin",
    ["http://evil.example", "null", "https://127.0.0.1:{port}", "http://127.0.0.1:1", "http://evil.example:{port}"],
)
def test_foreign_origin_is_refused(served, origin):
    dashboard, _, gate = served
    code, _, body = _request(dashboard, "POST", "/api/stop", headers={"Origin": origin.format(port=dashboard.port)})
    assert code == 403
    assert "error" in json.loads(body)
    assert not gate.paused


def test_read_only_dashboard_refuses_control(read_only):
    for path in ("/api/stop", "/api/start"):
        code, headers, body = _request(read_only, "POST", path)
        assert code == 403
        assert headers["Content-Type"] == "application/json"
        assert "read-only" in json.loads(body)["error"]
    code, _, body = _request(read_only, "GET", "/api/status")
    assert code == 200 and json.loads(body)["read_only"] is True


def test_unknown_paths_and_wrong_methods(served):
    dashboard, _, gate = served
    for method, path in (("GET", "/nope"), ("POST", "/nope"), ("POST", "/api/stop/"), ("GET", "/api/status/")):
        code, headers, body = _request(dashboard, method, path)
        assert code == 404, (method, path)
        assert headers["Content-Type"] == "application/json"
        assert json.loads(body) == {"error": f"no such page: {path}"}
    for method, path, allowed in (
        ("GET", "/api/stop", "POST"),
        ("PUT", "/api/stop", "POST"),
        ("POST", "/api/status", "GET, HEAD"),
        ("DELETE", "/", "GET, HEAD"),
    ):
        code, headers, body = _request(dashboard, method, path)
        assert (code, headers["Allow"]) == (405, allowed), (method, path)
        assert json.loads(body) == {"error": f"{path} takes {allowed}"}
    assert not gate.paused


def test_every_answer_forbids_caching_and_sniffing(served, read_only):
    dashboard, _, _ = served
    answers = [
        _request(dashboard, "GET", "/"),
        _request(dashboard, "HEAD", "/index.html"),
        _request(dashboard, "GET", "/api/status"),
        _request(dashboard, "GET", "/metrics"),
        _request(dashboard, "GET", "/nope"),
        _request(dashboard, "GET", "/api/stop"),
        _request(dashboard, "POST", "/api/stop", headers={"Origin": "http://evil.example"}),
        _request(dashboard, "POST", "/api/stop"),
        _request(read_only, "POST", "/api/start"),
    ]
    assert [code for code, _, _ in answers] == [200, 200, 200, 200, 404, 405, 403, 200, 403]
    for _, headers, _ in answers:
        assert headers["Cache-Control"] == "no-store"
        assert headers["X-Content-Type-Options"] == "nosniff"
        assert headers["Server"] == "dragon-dashboard"  # no library or Python version on show
    page_headers = answers[1][1]
    assert "frame-ancestors 'none'" in page_headers["Content-Security-Policy"]
    assert "Content-Security-Policy" not in answers[2][1]  # the page's policy is the page's


def test_head_answers_headers_only(served):
    dashboard, _, _ = served
    for path in ("/", "/index.html", "/api/status", "/metrics"):
        code, headers, body = _request(dashboard, "HEAD", path)
        assert code == 200 and body == b"" and int(headers["Content-Length"]) > 0, path
    _, headers, _ = _request(dashboard, "HEAD", "/")
    assert int(headers["Content-Length"]) == len(dashboard.page)  # the length of the body it left out
    assert headers["Content-Type"].startswith("text/html")
    assert _request(dashboard, "HEAD", "/api/stop")[0] == 405


def test_bad_bodies_do_not_break_the_server(served):
    dashboard, _, gate = served
    code, _, _ = _request(dashboard, "POST", "/api/stop", body=b"\x00\xffgarbage" * 100)
    assert code == 200 and gate.paused
    code, _, _ = _request(dashboard, "POST", "/api/stop", body=b"x" * MAX_BODY_BYTES)  # at the limit: fine
    assert code == 200
    connection = http.client.HTTPConnection("127.0.0.1", dashboard.port, timeout=TIMEOUT_S)
    try:
        connection.putrequest("POST", "/api/start")
        connection.putheader("Content-Length", "banana")
        connection.endheaders()
        assert connection.getresponse().status == 400
    finally:
        connection.close()
    connection = http.client.HTTPConnection("127.0.0.1", dashboard.port, timeout=TIMEOUT_S)
    try:
        # Announce a huge body but send none: the server must answer without waiting for it.
        connection.putrequest("POST", "/api/start")
        connection.putheader("Content-Length", str(1 << 30))
        connection.endheaders()
        response = connection.getresponse()
        assert response.status == 413 and "error" in json.loads(response.read())
    finally:
        connection.close()
    assert gate.paused  # neither bad request resumed training
    # The body is read, so the answer arrives in full; a second request from the same client still parses.
    connection = http.client.HTTPConnection("127.0.0.1", dashboard.port, timeout=TIMEOUT_S)
    try:
        connection.request("POST", "/api/start", body=b'{"ignored": true}')
        assert connection.getresponse().read() == b'{"paused": false}'
        connection.request("GET", "/api/status")
        assert connection.getresponse().status == 200
    finally:
        connection.close()


def test_shutdown_is_idempotent_and_frees_the_port():
    dashboard = Dashboard(_status(), None)
    dashboard.shutdown()  # before start: nothing to do
    dashboard = Dashboard(_status(), None)
    dashboard.start()
    port = dashboard.port
    dashboard.shutdown()
    dashboard.shutdown()
    with pytest.raises(RuntimeError):
        dashboard.start()
    again = Dashboard(_status(), None, port=port)  # the port is free again
    again.start()
    try:
        with pytest.raises(OSError):
            Dashboard(_status(), None, port=port).start()  # ...and taken while `again` serves
    finally:
        again.shutdown()


def test_ipv6_loopback():
    if not socket.has_ipv6:
        pytest.skip("no IPv6 on this machine")
    dashboard = Dashboard(_status(), None, host="::1")
    try:
        dashboard.start()
    except OSError as error:  # e.g. a container with IPv6 disabled
        pytest.skip(f"cannot bind [::1]: {error}")
    try:
        assert re.fullmatch(r"http://\[::1\]:\d+/", dashboard.url)
        code, _, body = _request(dashboard, "GET", "/api/status")
        assert code == 200 and json.loads(body)["name"] == "ada"
    finally:
        dashboard.shutdown()


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("8080", ("127.0.0.1", 8080)),
        ("0", ("127.0.0.1", 0)),
        (":9000", ("127.0.0.1", 9000)),
        ("0.0.0.0:65535", ("0.0.0.0", 65535)),
        ("localhost:80", ("localhost", 80)),
        ("[::1]:8080", ("::1", 8080)),
        ("[::]:0", ("::", 0)),
        (" 127.0.0.1:1234 ", ("127.0.0.1", 1234)),
    ],
)
def test_parse_listen_address_accepts(text, expected):
    assert parse_listen_address(text) == expected


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("", "empty"),
        ("65536", "out of range"),
        ("-1", "not a number"),
        ("+80", "not a number"),
        ("host:", "not a number"),
        ("host:http", "not a number"),
        ("::1:8080", "brackets"),
        ("[::1]", "expected [IPv6]:PORT"),
        ("[::1:8080", "expected [IPv6]:PORT"),
        ("[nope]:80", "not an IPv6 address"),
        ("a b:80", "not a host"),
        ("８０", "not a number"),
    ],
)
def test_parse_listen_address_rejects(text, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        parse_listen_address(text)
