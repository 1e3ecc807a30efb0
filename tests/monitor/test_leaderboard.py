"""Badges, the leaderboard and swarm totals over contribution records: pure views, no network."""

from __future__ import annotations

import pytest

from dragon_swarm.monitor.leaderboard import badge_for, leaderboard, network_stats
from dragon_swarm.swarm.contributions import ContributionRecord


def record(**overrides) -> ContributionRecord:
    base = dict(peer_id="12D3KooWpeerA", name="alice", tokens=10, batches=2, expert_requests=1, uptime_s=5.0, role="trainer")
    return ContributionRecord(**{**base, **overrides})


@pytest.mark.parametrize(
    "batches, badge",
    [(0, None), (999, None), (1000, "bronze"), (9999, "bronze"), (10000, "silver"), (99999, "silver"), (100000, "gold")],
)
def test_badges_at_their_boundaries(batches, badge):
    assert badge_for(batches) == badge


def test_leaderboard_orders_by_tokens_then_batches_then_peer_id_and_limits():
    records = {
        r.peer_id: r
        for r in [
            record(peer_id="c", tokens=5, batches=1),
            record(peer_id="b", tokens=50, batches=1),
            record(peer_id="a", tokens=50, batches=1),
            record(peer_id="d", tokens=50, batches=1500),
            record(peer_id="e", tokens=0, batches=0),
        ]
    }
    rows = leaderboard(records)
    assert [row.peer_id for row in rows] == ["d", "a", "b", "c", "e"]
    assert rows[0].badge == "bronze" and rows[1].badge is None
    assert (rows[0].name, rows[0].tokens, rows[0].batches, rows[0].expert_requests, rows[0].uptime_s) == (
        "alice",
        50,
        1500,
        1,
        5.0,
    )
    assert [row.peer_id for row in leaderboard(records, limit=2)] == ["d", "a"]
    assert leaderboard(records, limit=0) == []
    assert leaderboard({}) == []
    with pytest.raises(ValueError):
        leaderboard(records, limit=-1)


def test_network_stats_sums_and_counts_roles():
    records = {
        "a": record(peer_id="a", tokens=10, batches=1, expert_requests=0, role="trainer"),
        "b": record(peer_id="b", tokens=0, batches=0, expert_requests=7, role="host"),
        "c": record(peer_id="c", tokens=5, batches=2, expert_requests=3, role="trainer+host"),
        "d": record(peer_id="d", tokens=0, batches=0, expert_requests=0, role="monitor"),
    }
    assert network_stats(records) == {
        "peers_alive": 4,
        "swarm_tokens": 15,
        "swarm_batches": 3,
        "expert_requests": 10,
        "trainers": 2,
        "hosts": 2,
    }
    assert network_stats({}) == dict.fromkeys(
        ["peers_alive", "swarm_tokens", "swarm_batches", "expert_requests", "trainers", "hosts"], 0
    )
