"""The swarm view's pure summaries: robust progress from trainers' records, median reported loss."""

import pytest
from hivemind.optim.progress_tracker import LocalTrainingProgress

from dragon_swarm.monitor.swarm_view import median_loss, summarize_progress
from dragon_swarm.swarm.contributions import ContributionRecord


def progress(epoch: int, samples: int) -> LocalTrainingProgress:
    return LocalTrainingProgress(
        peer_id=b"x", epoch=epoch, samples_accumulated=samples, samples_per_second=1.0, time=0.0, client_mode=False
    )


def record(peer: str, loss: float | None) -> ContributionRecord:
    return ContributionRecord(
        peer_id=peer, name=peer, tokens=1, batches=1, expert_requests=0, uptime_s=1.0, role="trainer", loss=loss
    )


def test_progress_counts_samples_of_the_supported_epoch_only():
    view = summarize_progress([progress(7, 10), progress(7, 6), progress(6, 30), progress(99, 1000)])
    assert (view.trainers, view.global_epoch, view.samples_accumulated) == (4, 7, 16)


def test_progress_of_an_empty_swarm():
    assert summarize_progress([]).global_epoch == 0


def test_median_loss_ignores_peers_without_one_and_resists_a_liar():
    records = {p.peer_id: p for p in [record("a", 7.0), record("b", 7.2), record("c", None), record("liar", 0.0)]}
    assert median_loss(records) == pytest.approx(7.0)
    assert median_loss({}) is None


def test_record_rejects_a_non_finite_loss():
    with pytest.raises(ValueError):
        record("a", float("nan"))
