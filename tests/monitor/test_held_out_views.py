"""Held-out loss in the views: stats file, status board, panel, /metrics, contribution records, the monitor's median."""

from __future__ import annotations

import json

import pytest
from pydantic import ValidationError
from rich.console import Console

from dragon_swarm.events import EventBus, StepReport
from dragon_swarm.monitor.metrics import prometheus_text
from dragon_swarm.monitor.panel_render import render_panel
from dragon_swarm.monitor.status import PeerStatus
from dragon_swarm.monitor.swarm_view import median_val_losses
from dragon_swarm.swarm.contributions import ContributionRecord
from dragon_swarm.swarm.counters import ContributionCounters
from dragon_swarm.training.stats import StatsWriter


def _report(micro_batches: int, epoch: int, val_loss: float | None) -> StepReport:
    return StepReport(
        micro_batches=micro_batches, epoch=epoch, loss=5.0, aux_loss=1.0, tokens=micro_batches * 256, batch_tokens=256,
        samples_per_second=10.0, tokens_per_second=2560.0, peers=2, experts_online=8, expert_failures=0, banned_peers=(),
        rejected_parts=0, global_epoch=epoch, samples_accumulated=8, target_batch_size=32, val_loss=val_loss,
        eval_seconds=None if val_loss is None else 0.05,
    )  # fmt: skip


def test_stats_file_has_val_loss_on_every_line(tmp_path):
    path = tmp_path / "stats.jsonl"
    writer = StatsWriter(path)
    bus = EventBus()
    bus.subscribe(writer.write, StepReport)
    bus.publish(_report(1, 0, 8.9))
    bus.publish(_report(2, 0, None))
    lines = [json.loads(line) for line in path.read_text().splitlines()]
    assert [r["val_loss"] for r in lines] == [8.9, None]


def test_status_panel_and_metrics_show_the_latest_held_out_loss():
    status = PeerStatus("ada", "QmAda", "swarm")
    assert status.snapshot()["held_out"] == {"loss": None, "model_version": None, "history": []}
    assert not any(line.startswith("dragon_val_loss") for line in prometheus_text(status.snapshot()).splitlines())
    status.record_step(3, 5.0, 100.0, epoch=1)
    status.record_val_loss(2, 6.25)
    status.record_val_loss(4, 5.5)
    status.record_val_loss(4, 5.25)  # a newer value for a version replaces it
    held_out = status.snapshot()["held_out"]
    assert (held_out["loss"], held_out["model_version"]) == (5.25, 4)
    assert [(p["x"], p["val_loss"]) for p in held_out["history"]] == [(2, 6.25), (4, 5.25)]
    assert status.snapshot()["history"][-1]["epoch"] == 1
    lines = prometheus_text(status.snapshot()).splitlines()
    assert "dragon_val_loss 5.25" in lines and "dragon_val_loss_model_version 4.0" in lines
    console = Console(width=120, record=True, color_system=None)
    console.print(render_panel(status.snapshot(), width=120, height=40))
    text = console.export_text()
    assert "Held-out loss" in text and "5.250 (v4)" in text


def test_records_carry_the_held_out_loss_and_the_monitor_takes_the_median_per_version():
    counters = ContributionCounters("swarm")
    counters.set_val_loss(6, 4.5)
    record = counters.to_record("QmA", "a", "trainer")
    assert (record.val_epoch, record.val_loss) == (6, 4.5)
    counters.set_val_loss(7, float("nan"))  # never published
    assert counters.to_record("QmA", "a", "trainer").val_loss is None
    with pytest.raises(ValidationError):
        ContributionRecord(peer_id="QmB", name="b", tokens=0, batches=0, expert_requests=0, uptime_s=0.0, role="trainer", val_loss=1.0)

    def rec(peer: str, epoch: int | None, loss: float | None) -> ContributionRecord:
        return ContributionRecord(
            peer_id=peer, name=peer, tokens=0, batches=0, expert_requests=0, uptime_s=0.0, role="trainer", val_epoch=epoch, val_loss=loss
        )

    records = {r.peer_id: r for r in (rec("a", 6, 4.0), rec("b", 6, 5.0), rec("c", 6, 100.0), rec("d", 4, 6.0), rec("e", None, None))}
    assert median_val_losses(records) == {4: 6.0, 6: 5.0}  # one liar cannot move the median far
