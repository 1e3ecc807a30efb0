"""`/metrics`: a `PeerStatus.snapshot()` as Prometheus metrics, exposed with prometheus_client.

`SnapshotCollector` is a custom collector that reads a fresh snapshot on every scrape, so every number matches
what the dashboard and the terminal panel show. Each dashboard registers it in a `CollectorRegistry` of its own
(`metrics_registry`), never in prometheus_client's global one. Labels are kept off the samples on purpose: the
peer's identity lives on one info metric (`dragon_peer_info`), which a query joins when it needs it, so series
stay stable when a volunteer renames the peer.

Contract: every metric family gets `# HELP` and `# TYPE` lines, even when its sample is omitted; a sample whose
snapshot value is None or missing (e.g. `dragon_loss` before the first micro-batch) is left out rather than
written as 0, so dashboards show a gap instead of a false value. `dragon_peer_state` has one sample per
`PeerState`, 1 for the current one.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_PLAIN_0_0_4
from prometheus_client.metrics_core import CounterMetricFamily, GaugeMetricFamily, Metric

from dragon_swarm.events import PeerState

CONTENT_TYPE = CONTENT_TYPE_PLAIN_0_0_4  # what generate_latest writes: text format 0.0.4
INFO_LABELS = ("peer_id", "swarm", "name", "role")

# (exposed name, type, help, path into the snapshot). Counters are named here as exposed, with `_total`:
# prometheus_client strips it from the family name and puts it back on the sample. `swarm_tokens_total` is a
# gauge although it ends in `_total`: it sums the *live* contribution records, so it drops when one expires.
_SCALARS: tuple[tuple[str, str, str, tuple[str, ...]], ...] = (
    ("dragon_paused", "gauge", "1 while the volunteer has paused training with the Stop button.", ("paused",)),
    (
        "dragon_micro_batches_total",
        "counter",
        "Micro-batches this peer has trained, across restarts.",
        ("training", "micro_batches"),
    ),
    ("dragon_tokens_total", "counter", "Tokens this peer has trained on, across restarts.", ("contribution", "tokens")),
    (
        "dragon_expert_requests_total",
        "counter",
        "Forward and backward requests this peer's experts have answered.",
        ("contribution", "expert_requests"),
    ),
    ("dragon_loss", "gauge", "Loss of the latest micro-batch (absent before the first one).", ("training", "loss")),
    (
        "dragon_val_loss",
        "gauge",
        "Held-out loss of the latest evaluated model version, nats/token (absent before the first evaluation; on a "
        "monitor the median over the trainers that reported that version).",
        ("held_out", "loss"),
    ),
    (
        "dragon_val_loss_model_version",
        "gauge",
        "The model version dragon_val_loss was measured on.",
        ("held_out", "model_version"),
    ),
    (
        "dragon_tokens_per_second",
        "gauge",
        "Training throughput of the latest micro-batch, in tokens per second.",
        ("training", "tokens_per_second"),
    ),
    ("dragon_global_epoch", "gauge", "Swarm-wide optimizer steps: the model version.", ("model", "global_epoch")),
    (
        "dragon_samples_accumulated",
        "gauge",
        "Samples the swarm has accumulated toward the next global step.",
        ("model", "samples_accumulated"),
    ),
    (
        "dragon_target_batch_size",
        "gauge",
        "Samples the swarm accumulates before each global step.",
        ("model", "target_batch_size"),
    ),
    ("dragon_peers_alive", "gauge", "Peers with a live contribution record.", ("swarm_stats", "peers_alive")),
    ("dragon_trainers", "gauge", "Trainers in the optimizer's progress tracker.", ("swarm_stats", "trainers")),
    ("dragon_experts_online", "gauge", "Experts with at least one live host.", ("swarm_stats", "experts_online")),
    ("dragon_experts_total", "gauge", "Experts in the model.", ("swarm_stats", "experts_total")),
    ("dragon_replicas", "gauge", "(expert, host) pairs online.", ("swarm_stats", "replicas")),
    (
        "dragon_swarm_tokens_total",
        "gauge",
        "Tokens trained by the whole swarm: the sum over live contribution records.",
        ("swarm_stats", "swarm_tokens"),
    ),
    ("dragon_banned_peers", "gauge", "Peers this peer has banned.", ("swarm_stats", "banned_peers")),
    ("dragon_uptime_seconds", "gauge", "Seconds since this process started.", ("uptime_s",)),
)


def _lookup(snapshot: dict[str, Any], path: tuple[str, ...]) -> Any:
    node: Any = snapshot
    for key in path:
        if not isinstance(node, dict):
            return None
        node = node.get(key)
    return node


def _number(value: Any) -> float | None:
    """The sample value for a snapshot field, or None to omit the sample (missing or not numeric)."""
    if isinstance(value, (list, tuple)):
        return float(len(value))  # e.g. banned_peers: export how many, not who
    if isinstance(value, (bool, int, float)):
        return float(value)
    return None


class SnapshotCollector:
    """A prometheus_client collector over `snapshot()`, called once per scrape."""

    def __init__(self, snapshot: Callable[[], dict[str, Any]]):
        self._snapshot = snapshot

    def collect(self) -> Iterator[Metric]:
        snapshot = self._snapshot()
        info = GaugeMetricFamily("dragon_peer_info", "Identity of this peer; always 1.", labels=INFO_LABELS)
        info.add_metric([str(snapshot.get(key) or "") for key in INFO_LABELS], 1)
        yield info
        state = GaugeMetricFamily(
            "dragon_peer_state", "1 for the peer's current state, 0 for the others.", labels=["state"]
        )
        for peer_state in PeerState:
            state.add_metric([peer_state.value], 1 if peer_state.value == snapshot.get("state") else 0)
        yield state
        for name, kind, help_text, path in _SCALARS:
            family = (CounterMetricFamily if kind == "counter" else GaugeMetricFamily)(name, help_text)
            value = _number(_lookup(snapshot, path))
            if value is not None:
                family.add_metric([], value)
            yield family


def metrics_registry(snapshot: Callable[[], dict[str, Any]]) -> CollectorRegistry:
    """A registry of its own (not prometheus_client's global one) holding only a `SnapshotCollector`."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(SnapshotCollector(snapshot))
    return registry


def prometheus_text(snapshot: dict[str, Any]) -> str:
    """One snapshot in the Prometheus text exposition format 0.0.4 (what `/metrics` serves)."""
    return generate_latest(metrics_registry(lambda: snapshot)).decode()
