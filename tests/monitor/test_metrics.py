"""prometheus_text: every line has the 0.0.4 shape, and the values are the snapshot's (no parser needed)."""

from __future__ import annotations

import math
import re

from dragon_swarm.monitor.metrics import escape_label_value, format_value, prometheus_text
from dragon_swarm.monitor.status import ExpertCell, PeerState, PeerStatus, SwarmStats

NAME = r"[a-zA-Z_:][a-zA-Z0-9_:]*"
LABEL_VALUE = r'"(?:[^"\\\n]|\\\\|\\"|\\n)*"'
LABELS = rf"\{{(?:[a-zA-Z_][a-zA-Z0-9_]*={LABEL_VALUE})(?:,[a-zA-Z_][a-zA-Z0-9_]*={LABEL_VALUE})*\}}"
VALUE = r"(?:NaN|[+-]Inf|[+-]?(?:\d+\.?\d*|\.\d+)(?:[eE][+-]?\d+)?)"
HELP_RE = re.compile(rf"^# HELP ({NAME}) (?:[^\\\n]|\\\\|\\n)*$")
TYPE_RE = re.compile(rf"^# TYPE ({NAME}) (counter|gauge|histogram|summary|untyped)$")
SAMPLE_RE = re.compile(rf"^({NAME})({LABELS})? ({VALUE})$")


def _snapshot(**overrides) -> dict:
    status = PeerStatus(name='Ada "the" \\ dragon\nrider', peer_id="QmPeer", swarm="tiny-swarm", role="peer")
    status.set_state(PeerState.TRAINING)
    status.record_step(step=42, loss=2.5, tokens_per_second=1234.5)
    status.update_model(global_epoch=7, samples_accumulated=96, target_batch_size=256)
    status.update_contribution(steps=40, tokens=81920, expert_requests=321, uptime_s=99.0)
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
    snapshot = status.snapshot()
    snapshot.update(overrides)
    return snapshot


def _parse(text: str) -> tuple[dict[str, str], dict[str, str], dict[str, str]]:
    """Check every line's shape; return HELP names, TYPE by name, and sample values by `name{labels}`."""
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
            samples[key] = m.group(3)
    return helps, types, samples


def test_every_line_is_valid_and_values_match_the_snapshot():
    # Prepare
    snapshot = _snapshot()
    # Execute
    helps, types, samples = _parse(prometheus_text(snapshot))
    # Assert
    assert set(helps) == set(types)
    expected = {
        "dragon_paused": "0",
        "dragon_steps_total": "42",
        "dragon_tokens_total": "81920",
        "dragon_expert_requests_total": "321",
        "dragon_loss": "2.5",
        "dragon_tokens_per_second": "1234.5",
        "dragon_global_epoch": "7",
        "dragon_samples_accumulated": "96",
        "dragon_target_batch_size": "256",
        "dragon_peers_alive": "5",
        "dragon_trainers": "3",
        "dragon_experts_online": "6",
        "dragon_experts_total": "8",
        "dragon_replicas": "11",
        "dragon_swarm_tokens_total": "1000000",
        "dragon_banned_peers": "2",
    }
    for name, value in expected.items():
        assert samples[name] == value, name
    assert 0 <= float(samples["dragon_uptime_seconds"]) < 60
    assert types["dragon_steps_total"] == "counter"
    assert types["dragon_loss"] == "gauge"


def test_peer_state_has_one_line_per_state_and_only_the_current_is_one():
    _, _, samples = _parse(prometheus_text(_snapshot()))
    states = {key: value for key, value in samples.items() if key.startswith("dragon_peer_state{")}
    assert len(states) == len(PeerState)
    for state in PeerState:
        assert states[f'dragon_peer_state{{state="{state.value}"}}'] == ("1" if state is PeerState.TRAINING else "0")


def test_info_metric_escapes_label_values():
    text = prometheus_text(_snapshot())
    (info,) = [line for line in text.splitlines() if line.startswith("dragon_peer_info{")]
    assert info == (
        'dragon_peer_info{peer_id="QmPeer",swarm="tiny-swarm",name="Ada \\"the\\" \\\\ dragon\\nrider",role="peer"} 1'
    )
    assert escape_label_value('a\\b"c\nd') == 'a\\\\b\\"c\\nd'


def test_missing_loss_and_speed_omit_the_sample_but_keep_the_family():
    # Before the first step PeerStatus reports loss and speed as None.
    snapshot = PeerStatus(name="fresh", peer_id="QmFresh", swarm="s").snapshot()
    helps, types, samples = _parse(prometheus_text(snapshot))
    assert "dragon_loss" in types and "dragon_loss" not in samples
    assert "dragon_tokens_per_second" in types and "dragon_tokens_per_second" not in samples
    assert samples["dragon_steps_total"] == "0"
    assert samples['dragon_peer_state{state="JOINING"}'] == "1"
    assert samples["dragon_banned_peers"] == "0"


def test_non_finite_values_use_prometheus_spelling():
    snapshot = _snapshot(training={"step": 1, "loss": math.nan, "tokens_per_second": math.inf}, paused=True)
    _, _, samples = _parse(prometheus_text(snapshot))
    assert samples["dragon_loss"] == "NaN"
    assert samples["dragon_tokens_per_second"] == "+Inf"
    assert samples["dragon_paused"] == "1"
    assert format_value(-math.inf) == "-Inf"
    assert format_value(True) == "1"
    assert format_value(3) == "3"
    assert float(format_value(1e-7)) == 1e-7


def test_empty_snapshot_does_not_crash():
    helps, types, samples = _parse(prometheus_text({}))
    assert samples["dragon_peer_info{peer_id=\"\",swarm=\"\",name=\"\",role=\"\"}"] == "1"
    assert all(samples[f'dragon_peer_state{{state="{s.value}"}}'] == "0" for s in PeerState)
