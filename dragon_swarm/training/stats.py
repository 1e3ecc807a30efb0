"""`--stats-file`: one JSON object per micro-batch this peer trains, appended to a file scripts can tail."""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path

from dragon_swarm.events import ExpertBanReport, StepReport


class StatsWriter:
    """Subscribes to `StepReport` (one line each) and `ExpertBanReport` (counted into the next line's
    `expert_bans`, cumulative, and `expert_banned_hosts`, the hosts banned so far):
    `bus.subscribe(writer.write, StepReport, ExpertBanReport)`."""

    def __init__(self, path: Path):
        self.path = path
        path.parent.mkdir(parents=True, exist_ok=True)
        self.expert_bans = 0
        self.expert_banned_hosts: list[str] = []

    def write(self, report: StepReport | ExpertBanReport) -> None:
        if isinstance(report, ExpertBanReport):
            # one line per micro-batch stays the file's contract: bans ride on the next micro-batch's line
            self.expert_bans += 1
            if report.peer_id not in self.expert_banned_hosts:
                self.expert_banned_hosts.append(report.peer_id)
            return
        record = asdict(report)
        record["banned_peers"] = list(report.banned_peers)
        record["expert_bans"] = self.expert_bans
        record["expert_banned_hosts"] = list(self.expert_banned_hosts)
        with self.path.open("a") as f:
            f.write(json.dumps(record) + "\n")
