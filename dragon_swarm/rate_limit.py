"""Per-key token buckets for rate limits on what peers may ask of us (expert calls, matchmaking joins, state
downloads). Pure: the caller passes the time."""

from __future__ import annotations

from typing import Hashable


class RateLimiter:
    """Pure per-key token buckets: each key earns `rate` tokens per second up to `burst`; a request costs one.

    Keys idle long enough to have refilled their bucket are forgotten once there are many, so a stream of new
    callers cannot grow the table without bound."""

    MAX_KEYS = 4096

    def __init__(self, rate: float, burst: float):
        if not rate > 0 or not burst >= 1:
            raise ValueError(f"rate must be > 0 and burst >= 1, got rate {rate!r}, burst {burst!r}")
        self.rate, self.burst = float(rate), float(burst)
        self.buckets: dict[Hashable, tuple[float, float]] = {}  # key -> (tokens, time they were counted)

    def take(self, key: Hashable, now: float) -> bool:
        """Spend one token of `key`'s bucket at time `now` (seconds, monotonic); False when it is empty."""
        tokens, then = self.buckets.get(key, (self.burst, now))
        tokens = min(self.burst, tokens + max(0.0, now - then) * self.rate)
        allowed = tokens >= 1.0
        self.buckets[key] = (tokens - 1.0 if allowed else tokens, now)
        if len(self.buckets) > self.MAX_KEYS:
            self._forget_full(now)
        return allowed

    def _forget_full(self, now: float) -> None:
        full = [k for k, (tokens, then) in self.buckets.items() if tokens + (now - then) * self.rate >= self.burst]
        for key in full:
            del self.buckets[key]
