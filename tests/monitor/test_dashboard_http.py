"""The dashboard's HTTP routes against a real PeerStatus and TrainingSwitch, on a loopback port."""

from __future__ import annotations

import http.client
import json
import re
import urllib.error
import urllib.request
from collections.abc import Iterator

import pytest

from dragon_swarm.monitor.dashboard import Dashboard, parse_listen_address
from tests.monitor.serving import serving
from dragon_swarm.monitor.status import (
    ExpertCell,
    LeaderboardRow,
    PeerState,
    PeerStatus,
    SwarmStats,
    TrainingSwitch,
)

TIMEOUT_S = 10


def _status(read_only: bool = False) -> PeerStatus:
    status = PeerStatus(name="ada", peer_id="QmAda", swarm="tiny", read_only=read_only)
    status.set_state(PeerState.TRAINING)
    status.record_step(step=12, loss=3.25, tokens_per_second=2048.0)
    status.update_model(global_epoch=3, samples_accumulated=10, target_batch_size=64)
    status.update_contribution(steps=12, tokens=24576, expert_requests=7)
    status.update_swarm(
        SwarmStats(peers_alive=2, trainers=2, experts_online=1, experts_total=2, replicas=1, swarm_tokens=50000),
        expert_map=[ExpertCell("expert.0", 1, True), ExpertCell("expert.1", 0, False)],
        leaderboard=[LeaderboardRow("ada", "QmAda", 24576, 12, 7, 60.0, None)],
    )
    status.record_event("joined the swarm")
    return status


@pytest.fixture
def served() -> Iterator[tuple[Dashboard, PeerStatus, TrainingSwitch]]:
    status = _status()
    switch = TrainingSwitch(status)
    with serving(status, switch) as dashboard:
        yield dashboard, status, switch


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
    for element_id in ("state", "step", "loss", "progress", "expert-map", "leaderboard", "events", "start-button", "stop-button"):
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
                "swarm_stats", "expert_map", "leaderboard", "events", "history"):
        assert got[key] == expected[key], key
    assert got["training"] == {"step": 12, "loss": 3.25, "tokens_per_second": 2048.0}


def test_status_json_is_valid_when_the_loss_is_nan(served):
    # Python would write the bare token NaN, which the page's JSON.parse rejects.
    dashboard, status, _ = served
    status.record_step(step=13, loss=float("nan"), tokens_per_second=float("inf"))
    _, _, body = _request(dashboard, "GET", "/api/status")
    got = json.loads(body, parse_constant=lambda token: pytest.fail(f"non-standard JSON token {token}"))
    assert got["training"]["loss"] is None and got["training"]["tokens_per_second"] is None
    assert got["training"]["step"] == 13


def test_metrics_are_prometheus_text(served):
    code, headers, body = _request(served[0], "GET", "/metrics")
    assert code == 200
    assert headers["Content-Type"].startswith("text/plain; version=0.0.4")
    lines = body.decode().splitlines()
    assert "dragon_steps_total 12" in lines
    assert 'dragon_peer_state{state="TRAINING"} 1' in lines
    assert all(re.fullmatch(r"# (HELP|TYPE) .+|[a-z_]+(\{.*\})? \S+", line) for line in lines)


def test_stop_and_start_flip_the_switch(served):
    dashboard, status, switch = served
    code, _, body = _request(dashboard, "POST", "/api/stop")
    assert (code, json.loads(body)) == (200, {"paused": True})
    assert switch.paused and status.snapshot()["paused"]
    code, _, body = _request(dashboard, "POST", "/api/start", headers={"Origin": dashboard.url.rstrip("/")})
    assert (code, json.loads(body)) == (200, {"paused": False})
    assert not switch.paused and not status.snapshot()["paused"]


def test_localhost_origin_is_the_dashboard_itself(served):
    dashboard, _, switch = served
    code, _, _ = _request(dashboard, "POST", "/api/stop", headers={"Origin": f"http://localhost:{dashboard.port}"})
    assert code == 200 and switch.paused


@pytest.mark.parametrize(
    "origin",
    ["http://evil.example", "null", "https://127.0.0.1:{port}", "http://127.0.0.1:1", "http://evil.example:{port}"],
)
def test_foreign_origin_is_refused(served, origin):
    dashboard, _, switch = served
    code, _, body = _request(dashboard, "POST", "/api/stop", headers={"Origin": origin.format(port=dashboard.port)})
    assert code == 403
    assert "error" in json.loads(body)
    assert not switch.paused


def test_read_only_dashboard_refuses_control(read_only):
    for path in ("/api/stop", "/api/start"):
        code, headers, body = _request(read_only, "POST", path)
        assert code == 403
        assert headers["Content-Type"] == "application/json"
        assert "read-only" in json.loads(body)["error"]
    code, _, body = _request(read_only, "GET", "/api/status")
    assert code == 200 and json.loads(body)["read_only"] is True


def test_unknown_paths_and_wrong_methods(served):
    dashboard, _, switch = served
    assert _request(dashboard, "GET", "/nope")[0] == 404
    assert _request(dashboard, "POST", "/nope")[0] == 404
    assert _request(dashboard, "GET", "/api/stop")[0] == 405
    assert _request(dashboard, "POST", "/api/status")[0] == 405
    assert _request(dashboard, "PUT", "/api/stop")[0] == 501
    assert not switch.paused


def test_head_answers_headers_only(served):
    dashboard, _, _ = served
    code, headers, body = _request(dashboard, "HEAD", "/api/status")
    assert code == 200 and body == b"" and int(headers["Content-Length"]) > 0


def test_bad_bodies_do_not_break_the_server(served):
    dashboard, _, switch = served
    code, _, _ = _request(dashboard, "POST", "/api/stop", body=b"\x00\xffgarbage" * 100)
    assert code == 200 and switch.paused
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
        assert connection.getresponse().status == 413
    finally:
        connection.close()
    assert switch.paused  # neither bad request resumed training
    # Keep-alive: a second request on the same connection after a body still parses.
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
    again.shutdown()


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
