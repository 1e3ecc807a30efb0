"""Pure views over contribution records: badges, the leaderboard and swarm totals.

The records come from `dragon_swarm.swarm.contributions.fetch_contributions` (self-reported numbers; see its trust
model). Every peer computes these locally from the same records, so every peer shows the same board.
"""

from __future__ import annotations

from typing import Mapping

from dragon_swarm.monitor.status import LeaderboardRow
from dragon_swarm.swarm.contributions import HOST_ROLES, TRAINER_ROLES, ContributionRecord

# Badges by micro-batches trained, highest first. Names are metals; the UI may show the threshold next to them.
BADGES: tuple[tuple[int, str], ...] = ((100_000, "gold"), (10_000, "silver"), (1_000, "bronze"))


def badge_for(batches: int) -> str | None:
    """Badge for a lifetime count of micro-batches: bronze from 1,000, silver from 10,000, gold from 100,000.

    Returns "bronze", "silver" or "gold" (the UI adds the threshold if it wants), None below 1,000.
    """
    for threshold, badge in BADGES:
        if batches >= threshold:
            return badge
    return None


def leaderboard(records: Mapping[str, ContributionRecord], limit: int = 20) -> list[LeaderboardRow]:
    """Top `limit` rows by tokens, then batches (both descending), then peer id; monitors included if they list."""
    if limit < 0:
        raise ValueError(f"limit must be >= 0, got {limit}")
    ranked = sorted(records.values(), key=lambda r: (-r.tokens, -r.batches, r.peer_id))[:limit]
    return [
        LeaderboardRow(
            name=r.name,
            peer_id=r.peer_id,
            tokens=r.tokens,
            batches=r.batches,
            expert_requests=r.expert_requests,
            uptime_s=r.uptime_s,
            badge=badge_for(r.batches),
        )
        for r in ranked
    ]


def network_stats(records: Mapping[str, ContributionRecord]) -> dict[str, int]:
    """Swarm totals over live records. A "trainer+host" counts both as a trainer and as a host."""
    values = list(records.values())
    return {
        "peers_alive": len(values),
        "swarm_tokens": sum(r.tokens for r in values),
        "swarm_batches": sum(r.batches for r in values),
        "expert_requests": sum(r.expert_requests for r in values),
        "trainers": sum(r.role in TRAINER_ROLES for r in values),
        "hosts": sum(r.role in HOST_ROLES for r in values),
    }
