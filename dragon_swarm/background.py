"""Background duties as small named threads (as hivemind's `DHTHandlerThread` and `CheckpointSaver`).

A duty subclasses `PeriodicThread` and implements `tick()`; its owner calls `start()` and later `stop()`. A tick
that raises is logged and the next period tries again: a flaky DHT must never kill a peer's background work.
"""

from __future__ import annotations

import logging
import random
import threading

logger = logging.getLogger(__name__)


class PeriodicThread(threading.Thread):
    """Calls `tick()` every `period_s` seconds in a daemon thread until `stop()`.

    :param first_tick_now: tick once right after start (otherwise the first tick comes after one period)
    :param final_tick: tick once more when stopped, so that what happened since the last tick is not lost
    :param jitter: each wait is `period_s` times a random factor in [1 - jitter, 1 + jitter], so that peers started
        together do not act in lockstep
    """

    def __init__(self, name: str, period_s: float, *, first_tick_now: bool = False, final_tick: bool = False, jitter: float = 0.0):
        if not period_s > 0:
            raise ValueError(f"{name}: period_s must be > 0, got {period_s!r}")
        if not 0.0 <= jitter < 1.0:
            raise ValueError(f"{name}: jitter must be in [0, 1), got {jitter!r}")
        super().__init__(name=name, daemon=True)
        self.period_s, self.first_tick_now, self.final_tick, self.jitter = period_s, first_tick_now, final_tick, jitter
        self._stop_event = threading.Event()
        self._rng = random.Random()

    def tick(self) -> None:
        raise NotImplementedError

    def run(self) -> None:
        if self.first_tick_now:
            self._safe_tick()
        while not self._stop_event.wait(self.period_s * self._rng.uniform(1.0 - self.jitter, 1.0 + self.jitter)):
            self._safe_tick()
        if self.final_tick:
            self._safe_tick()

    def _safe_tick(self) -> None:
        try:
            self.tick()
        except Exception as e:
            logger.warning(f"{self.name}: {type(e).__name__}: {e}; trying again in {self.period_s:.0f} s")
            logger.debug(f"{self.name} failed", exc_info=True)

    @property
    def stopping(self) -> bool:
        return self._stop_event.is_set()

    def stop(self, timeout_s: float = 10.0) -> None:
        """Ask the loop to end and wait up to `timeout_s` for it (a tick in flight is waited for). Idempotent."""
        self._stop_event.set()
        if self.is_alive() and self is not threading.current_thread():
            self.join(timeout_s)
            if self.is_alive():
                logger.warning(f"{self.name} did not stop within {timeout_s:.0f} s; leaving it (daemon)")
