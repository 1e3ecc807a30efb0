"""`--stats-file`: one JSON object per micro-batch this peer trains, appended to a file scripts can tail."""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path

from dragon_swarm.events import StepReport


class StatsWriter:
    """Subscribes to `StepReport` events: `bus.subscribe(writer.write, StepReport)`."""

    def __init__(self, path: Path):
        self.path = path
        path.parent.mkdir(parents=True, exist_ok=True)

    def write(self, report: StepReport) -> None:
        record = asdict(report)
        record["banned_peers"] = list(report.banned_peers)
        with self.path.open("a") as f:
            f.write(json.dumps(record) + "\n")
