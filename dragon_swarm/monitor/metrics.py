"""`/metrics`: a `PeerStatus.snapshot()` rendered in the Prometheus text exposition format 0.0.4.

A pure function over the snapshot dict, so it is tested without a server and every number matches
what the dashboard and the terminal panel show. Labels are kept off the samples on purpose: the
peer's identity lives on one info metric (`dragon_peer_info`), which a query joins when it needs it,
so series stay stable when a volunteer renames the peer.
"""

from __future__ import annotations

import math
from typing import Any

from dragon_swarm.monitor.status import PeerState

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

# (name, type, help, path into the snapshot). `swarm_tokens_total` is a gauge although it ends in
# `_total`: it sums the *live* contribution records, so it drops when a peer's record expires.
_SCALARS: tuple[tuple[str, str, str, tuple[str, ...]], ...] = (
    ("dragon_paused", "gauge", "1 while the volunteer has paused training with the Stop button.", ("paused",)),
    ("dragon_steps_total", "counter", "Training steps (micro-batches) this peer has run.", ("training", "step")),
    ("dragon_tokens_total", "counter", "Tokens this peer has trained on, across restarts.", ("contribution", "tokens")),
    (
        "dragon_expert_requests_total",
        "counter",
        "Forward and backward requests this peer's experts have answered.",
        ("contribution", "expert_requests"),
    ),
    ("dragon_loss", "gauge", "Training loss of the latest step (absent before the first step).", ("training", "loss")),
    (
        "dragon_tokens_per_second",
        "gauge",
        "Training throughput of the latest step, in tokens per second.",
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


def escape_label_value(value: str) -> str:
    """Escape a label value as format 0.0.4 requires: backslash, double quote and newline."""
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def _escape_help(text: str) -> str:
    # HELP lines escape backslash and newline only (quotes are legal there).
    return text.replace("\\", "\\\\").replace("\n", "\\n")


def format_value(value: bool | int | float) -> str:
    """A sample value as Prometheus parses it: integers exactly, floats by repr, NaN and +/-Inf by name."""
    if isinstance(value, bool):
        return "1" if value else "0"
    if isinstance(value, int):
        return str(value)
    value = float(value)
    if math.isnan(value):
        return "NaN"
    if math.isinf(value):
        return "+Inf" if value > 0 else "-Inf"
    return repr(value)


def _lookup(snapshot: dict[str, Any], path: tuple[str, ...]) -> Any:
    node: Any = snapshot
    for key in path:
        if not isinstance(node, dict):
            return None
        node = node.get(key)
    return node


def _number(value: Any) -> bool | int | float | None:
    """The sample value for a snapshot field, or None to omit the sample (missing or not numeric)."""
    if isinstance(value, (list, tuple)):
        return len(value)  # e.g. banned_peers: export how many, not who
    if isinstance(value, (bool, int, float)):
        return value
    return None


def _header(lines: list[str], name: str, kind: str, help_text: str) -> None:
    lines.append(f"# HELP {name} {_escape_help(help_text)}")
    lines.append(f"# TYPE {name} {kind}")


def prometheus_text(snapshot: dict[str, Any]) -> str:
    """Render `PeerStatus.snapshot()` as a Prometheus text exposition (format 0.0.4).

    Contract: every metric family gets `# HELP` and `# TYPE` lines, even when its sample is omitted;
    a sample whose snapshot value is None or missing (e.g. `dragon_loss` before the first step) is
    left out rather than written as 0, so dashboards show a gap instead of a false value. NaN and
    infinities are written as `NaN` / `+Inf` / `-Inf`. `dragon_peer_state` has one sample per
    `PeerState`, 1 for the current one. The output ends with a newline, as the format requires.
    """
    lines: list[str] = []

    _header(lines, "dragon_peer_info", "gauge", "Identity of this peer; always 1.")
    labels = ",".join(
        f'{key}="{escape_label_value(str(snapshot.get(key) or ""))}"' for key in ("peer_id", "swarm", "name", "role")
    )
    lines.append(f"dragon_peer_info{{{labels}}} 1")

    _header(lines, "dragon_peer_state", "gauge", "1 for the peer's current state, 0 for the others.")
    current = snapshot.get("state")
    for state in PeerState:
        lines.append(f'dragon_peer_state{{state="{state.value}"}} {1 if state.value == current else 0}')

    for name, kind, help_text, path in _SCALARS:
        _header(lines, name, kind, help_text)
        value = _number(_lookup(snapshot, path))
        if value is not None:
            lines.append(f"{name} {format_value(value)}")

    return "\n".join(lines) + "\n"
