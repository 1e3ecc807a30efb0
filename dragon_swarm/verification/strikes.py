"""Strikes for faults nobody else can check: a trainer averaged without a commitment, or withheld its record.

Nothing signed proves either to a third peer, so they do not become evidence; an honest trainer can meet either
once (a DHT store that failed, a link that dropped), so the first is not a ban either. `max_strikes` in a row are.
"""

from __future__ import annotations


class StrikeBook:
    def __init__(self, max_strikes: int):
        if max_strikes < 1:
            raise ValueError(f"max_strikes must be >= 1, got {max_strikes}")
        self.max_strikes = max_strikes
        self.counts: dict[str, int] = {}

    def strike(self, peer: str) -> int:
        """Count one; returns the strikes in a row so far, and forgets them once they reach `max_strikes` (a ban)."""
        count = self.counts.get(peer, 0) + 1
        if count >= self.max_strikes:
            self.counts.pop(peer, None)
        else:
            self.counts[peer] = count
        return count

    def clear(self, peer: str) -> None:
        """The peer did what an honest one does (committed, showed its record): the run of strikes ends."""
        self.counts.pop(peer, None)
