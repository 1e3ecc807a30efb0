"""PeriodicThread: ticks on its period (jittered when asked), survives a failing tick, stops when told."""

import threading
import time

import pytest

from dragon_swarm.background import PeriodicThread


class Counting(PeriodicThread):
    def __init__(self, period_s: float, jitter: float = 0.0, fail_first: bool = False):
        super().__init__("counting", period_s, jitter=jitter)
        self.times: list[float] = []
        self.fail_first = fail_first
        self.ticked = threading.Event()

    def tick(self) -> None:
        self.times.append(time.monotonic())
        if self.fail_first and len(self.times) == 1:
            raise RuntimeError("a flaky DHT")
        if len(self.times) >= 4:
            self.ticked.set()


def test_a_failing_tick_does_not_stop_the_thread():
    duty = Counting(0.02, fail_first=True)
    duty.start()
    assert duty.ticked.wait(5.0)
    duty.stop()
    assert not duty.is_alive()


def test_jittered_waits_vary_within_their_bounds():
    duty = Counting(0.05, jitter=0.5)
    duty.start()
    assert duty.ticked.wait(5.0)
    duty.stop()
    gaps = [b - a for a, b in zip(duty.times, duty.times[1:])]
    assert all(gap >= 0.025 * 0.9 for gap in gaps)
    assert len({round(gap, 3) for gap in gaps}) > 1


@pytest.mark.parametrize("jitter", [-0.1, 1.0, 2.0])
def test_jitter_outside_0_1_is_refused(jitter):
    with pytest.raises(ValueError, match="jitter"):
        Counting(1.0, jitter=jitter)
