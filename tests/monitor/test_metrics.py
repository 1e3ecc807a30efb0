"""/metrics: every line has the 0.0.4 shape, the names are exactly the documented ones, and the values are the
snapshot's (checked line by line with regular expressions, and again through prometheus_client's own parser)."""

from __future__ import annotations

import math
import re

from prometheus_client import REGISTRY, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from dragon_swarm.monitor.metrics import CONTENT_TYPE, metrics_registry, prometheus_text
from dragon_swarm.monitor.status import ExpertCell, PeerState, PeerStatus, SwarmStats

NAME = r"[a-zA-Z_:][a-zA-Z0-9_:]*"
LABEL_VALUE = r'"(?:[^"\\\n]|\\\\|\\"|\\n)*"'
LABELS = rf"\{{(?:[a-zA-Z_][a-zA-Z0-9_]*={LABEL_VALUE})(?:,[a-zA-Z_][a-zA-Z0-9_]*={LABEL_VALUE})*\}}"
VALUE = r"(?:NaN|[+-]Inf|[+-]?(?:\d+\.?\d*|\.\d+)(?:[eE][+-]?\d+)?)"
HELP_RE = re.compile(rf"^# HELP ({NAME}) (?:[^\\\n]|\\\\|\\n)*$")
TYPE_RE = re.compile(rf"^# TYPE ({NAME}) (counter|gauge|histogram|summary|untyped)$")
SAMPLE_RE = re.compile(rf"^({NAME})({LABELS})? ({VALUE})$")

# Every family /metrics exposes, with its type: dashboards and alerts are built on these exact names.
FAMILIES = {
    "dragon_peer_info": "gauge",
    "dragon_peer_state": "gauge",
    "dragon_paused": "gauge",
    "dragon_micro_batches_total": "counter",
    "dragon_tokens_total": "counter",
    "dragon_expert_requests_total": "counter",
    "dragon_loss": "gauge",
    "dragon_val_loss": "gauge",
    "dragon_val_loss_model_version": "gauge",
    "dragon_tokens_per_second": "gauge",
    "dragon_global_epoch": "gauge",
    "dragon_samples_accumulated": "gauge",
    "dragon_target_batch_size": "gauge",
    "dragon_peers_alive": "gauge",
    "dragon_trainers": "gauge",
    "dragon_experts_online": "gauge",
    "dragon_experts_total": "gauge",
    "dragon_replicas": "gauge",
    "dragon_swarm_tokens_total": "gauge",  # sums live records only, so it can drop: not a counter
    "dragon_banned_peers": "gauge",
    "dragon_uptime_seconds": "gauge",
}


def _status() -> PeerStatus:
    status = PeerStatus(name='Ada "the" \\ dragon\nrider', peer_id="QmPeer", swarm="tiny-swarm", role="peer")
    status.set_state(PeerState.TRAINING)
    status.record_step(micro_batches=42, loss=2.5, tokens_per_second=1234.5)
    status.update_model(global_epoch=7, samples_accumulated=96, target_batch_size=256)
    status.update_contribution(micro_batches=40, tokens=81920, expert_requests=321, uptime_s=99.0)
    status.update_swarm(
        SwarmStats(
            peers_alive=5,
            trainers=3,
            experts_online=6,
            experts_total=8,
            replicas=11,
            swarm_tokens=1_000_000,
            banned_peers=["QmBad1", "QmBad2"],
        ),
        expert_map=[ExpertCell("expert.0", 2, True)],
    )
    return status


def _snapshot(**overrides) -> dict:
    snapshot = _status().snapshot()
    snapshot.update(overrides)
    return snapshot


def _parse(text: str) -> tuple[dict[str, str], dict[str, str], dict[str, float]]:
    """Check every line's shape; return HELP lines and TYPE by name, and sample values by `name{labels}`."""
    helps, types, samples = {}, {}, {}
    assert text.endswith("\n")
    for line in text.splitlines():
        if m := HELP_RE.match(line):
            helps[m.group(1)] = line
        elif m := TYPE_RE.match(line):
            assert m.group(1) not in types, f"TYPE repeated: {line}"
            types[m.group(1)] = m.group(2)
        else:
            m = SAMPLE_RE.match(line)
            assert m, f"not a valid exposition line: {line!r}"
            assert m.group(1) in types, f"sample before its TYPE: {line}"
            key = m.group(1) + (m.group(2) or "")
            assert key not in samples, f"sample repeated: {line}"
            samples[key] = float(m.group(3))
    return helps, types, samples


def test_every_line_is_valid_and_values_match_the_snapshot():
    # Prepare
    snapshot = _snapshot()
    # Execute
    helps, types, samples = _parse(prometheus_text(snapshot))
    # Assert
    assert types == FAMILIES  # exactly these names: prometheus_client's own `_total` handling changed none
    assert set(helps) == set(types)
    expected = {
        "dragon_paused": 0,
        "dragon_micro_batches_total": 42,  # the peer's running count of micro-batches, from training
        "dragon_tokens_total": 81920,
        "dragon_expert_requests_total": 321,
        "dragon_loss": 2.5,
        "dragon_tokens_per_second": 1234.5,
        "dragon_global_epoch": 7,
        "dragon_samples_accumulated": 96,
        "dragon_target_batch_size": 256,
        "dragon_peers_alive": 5,
        "dragon_trainers": 3,
        "dragon_experts_online": 6,
        "dragon_experts_total": 8,
        "dragon_replicas": 11,
        "dragon_swarm_tokens_total": 1_000_000,
        "dragon_banned_peers": 2,
    }
    for name, value in expected.items():
        assert samples[name] == value, name
    assert 0 <= samples["dragon_uptime_seconds"] < 60


def test_prometheus_client_parses_the_same_values():
    families = {f.name: f for f in text_string_to_metric_families(prometheus_text(_snapshot()))}
    (micro_batches,) = families["dragon_micro_batches"].samples  # the parser reports counters without `_total`
    assert (micro_batches.name, micro_batches.value) == ("dragon_micro_batches_total", 42)
    assert families["dragon_micro_batches"].type == "counter"
    (info,) = families["dragon_peer_info"].samples
    name = 'Ada "the" \\ dragon\nrider'
    assert info.labels == {"peer_id": "QmPeer", "swarm": "tiny-swarm", "name": name, "role": "peer"}


def test_peer_state_has_one_line_per_state_and_only_the_current_is_one():
    _, _, samples = _parse(prometheus_text(_snapshot()))
    states = {key: value for key, value in samples.items() if key.startswith("dragon_peer_state{")}
    assert len(states) == len(PeerState)
    for state in PeerState:
        assert states[f'dragon_peer_state{{state="{state.value}"}}'] == (1 if state is PeerState.TRAINING else 0)


def test_info_metric_escapes_label_values():
    text = prometheus_text(_snapshot())
    (info,) = [line for line in text.splitlines() if line.startswith("dragon_peer_info{")]
    labels = dict(re.findall(rf'([a-z_]+)=({LABEL_VALUE})', info))
    assert labels == {
        "peer_id": '"QmPeer"',
        "swarm": '"tiny-swarm"',
        "name": '"Ada \\"the\\" \\\\ dragon\\nrider"',  # backslash, quote and newline escaped
        "role": '"peer"',
    }
    assert info.endswith("} 1.0")


def test_missing_loss_and_speed_omit_the_sample_but_keep_the_family():
    # Before the first micro-batch PeerStatus reports loss and speed as None.
    snapshot = PeerStatus(name="fresh", peer_id="QmFresh", swarm="s").snapshot()
    helps, types, samples = _parse(prometheus_text(snapshot))
    assert "dragon_loss" in types and "dragon_loss" not in samples
    assert "dragon_tokens_per_second" in types and "dragon_tokens_per_second" not in samples
    assert samples["dragon_micro_batches_total"] == 0
    assert samples['dragon_peer_state{state="JOINING"}'] == 1
    assert samples["dragon_banned_peers"] == 0


def test_non_finite_values_use_prometheus_spelling():
    snapshot = _snapshot(training={"micro_batches": 1, "loss": math.nan, "tokens_per_second": math.inf}, paused=True)
    text = prometheus_text(snapshot)
    assert "dragon_loss NaN" in text.splitlines()
    assert "dragon_tokens_per_second +Inf" in text.splitlines()
    _, _, samples = _parse(text)
    assert samples["dragon_paused"] == 1
    assert samples["dragon_micro_batches_total"] == 1
    negative = _parse(prometheus_text(_snapshot(training={"loss": -math.inf})))[2]
    assert negative["dragon_loss"] == -math.inf and "dragon_micro_batches_total" not in negative


def test_empty_snapshot_does_not_crash():
    helps, types, samples = _parse(prometheus_text({}))
    assert types == FAMILIES
    assert samples['dragon_peer_info{name="",peer_id="",role="",swarm=""}'] == 1
    assert all(samples[f'dragon_peer_state{{state="{s.value}"}}'] == 0 for s in PeerState)


def test_registry_is_private_and_reads_a_fresh_snapshot_per_scrape():
    status = _status()
    registry = metrics_registry(status.snapshot)
    another = metrics_registry(status.snapshot)  # a second dashboard in the same process: no name clash
    assert "dragon_loss" not in generate_latest(REGISTRY).decode()  # the global registry stays untouched
    assert _parse(generate_latest(registry).decode())[2]["dragon_micro_batches_total"] == 42
    status.record_step(micro_batches=43, loss=2.4, tokens_per_second=1000.0)
    assert _parse(generate_latest(registry).decode())[2]["dragon_micro_batches_total"] == 43
    assert _parse(generate_latest(another).decode())[2]["dragon_loss"] == 2.4
    assert CONTENT_TYPE == "text/plain; version=0.0.4; charset=utf-8"
