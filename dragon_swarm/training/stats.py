"""One JSON object per optimizer step, appended to a file scripts can tail."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path


@dataclass
class StepStats:
    step: int  # local optimizer steps (micro-batches contributed) of this peer
    epoch: int  # global epoch: swarm-wide optimizer steps
    loss: float  # cross-entropy of this micro-batch, nats/token
    aux_loss: float
    tokens: int  # tokens this peer has trained on
    samples_per_second: float
    tokens_per_second: float
    peers: int  # trainers in the swarm's progress tracker
    experts_online: int
    expert_failures: int
    banned_peers: list[str]  # trainers this peer currently refuses in averaging
    rejected_parts: int  # invalid gradient parts received so far (wrong size/dtype, NaN, Inf)
    time: float


class StatsWriter:
    def __init__(self, path: Path | None):
        self.path = path
        if path is not None:
            path.parent.mkdir(parents=True, exist_ok=True)

    def write(self, stats: StepStats) -> None:
        if self.path is None:
            return
        with self.path.open("a") as f:
            f.write(json.dumps(asdict(stats)) + "\n")
