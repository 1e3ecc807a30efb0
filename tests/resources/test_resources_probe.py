"""The batch-size search (pure, over synthetic measurements) and measured probes (real forks, real steps)."""

import os
from pathlib import Path

import pytest
import torch

from dragon_swarm import resources
from dragon_swarm.config import load_config
from dragon_swarm.resources import StepDidNotFit, auto_batch_size, choose_batch_size, measure_step_memory, probe

GiB, MiB = 2**30, 2**20
TEST_CONFIG = Path(__file__).resolve().parents[1] / "configs" / "swarm-test.yaml"


# --- choose_batch_size: pure search over synthetic measurements ---


def linear(base: int, per_sample: int, oom_from: int | None = None):
    calls = []

    def measure(batch: int) -> int | None:
        calls.append(batch)
        if oom_from is not None and batch >= oom_from:
            return None
        return base + per_sample * batch

    return measure, calls


@pytest.mark.parametrize("cap_samples", [1, 2, 3, 5, 7, 8, 13, 100, 255])
def test_linear_memory_gets_the_largest_fitting_batch(cap_samples):
    measure, _ = linear(base=1000, per_sample=10)
    batch, measured = choose_batch_size(measure, cap_bytes=1000 + 10 * cap_samples, max_batch=256)
    assert batch == cap_samples
    assert measured[batch] <= 1000 + 10 * cap_samples
    assert measured[batch + 1] > 1000 + 10 * cap_samples  # the next size up was measured not to fit


def test_oom_counts_as_not_fitting():
    measure, _ = linear(base=0, per_sample=1, oom_from=11)
    batch, measured = choose_batch_size(measure, cap_bytes=10**9, max_batch=256)
    assert batch == 10
    assert measured[11] is None and measured[16] is None
    assert measured[10] == 10


def test_max_batch_is_respected_and_not_exceeded():
    measure, calls = linear(base=0, per_sample=1)
    batch, measured = choose_batch_size(measure, cap_bytes=10**9, max_batch=100)
    assert batch == 100
    assert max(calls) == 100
    assert sorted(measured) == [1, 2, 4, 8, 16, 32, 64, 100]


def test_measurements_record_each_probe_once():
    measure, calls = linear(base=0, per_sample=1)
    batch, measured = choose_batch_size(measure, cap_bytes=5, max_batch=256)
    assert batch == 5
    assert calls == [1, 2, 4, 8, 6, 5]
    assert measured == {1: 1, 2: 2, 4: 4, 8: 8, 6: 6, 5: 5}


def test_min_batch_starts_the_doubling():
    measure, calls = linear(base=0, per_sample=1)
    batch, _ = choose_batch_size(measure, cap_bytes=20, max_batch=256, min_batch=3)
    assert batch == 20
    assert calls[:4] == [3, 6, 12, 24]


@pytest.mark.parametrize("oom", [False, True])
def test_nothing_fits_raises_with_cap_and_need(oom):
    measure, _ = linear(base=5 * GiB, per_sample=MiB, oom_from=1 if oom else None)
    with pytest.raises(ValueError) as info:
        choose_batch_size(measure, cap_bytes=GiB)
    text = str(info.value)
    assert "even micro-batch 1 does not fit" in text and "1.0 GiB" in text
    assert ("out of memory" in text) if oom else ("needs 5.0 GiB" in text)


@pytest.mark.parametrize("kwargs", [{"min_batch": 0}, {"min_batch": 8, "max_batch": 4}, {"cap_bytes": 0}])
def test_bad_bounds_are_rejected(kwargs):
    measure, _ = linear(base=0, per_sample=1)
    with pytest.raises(ValueError):
        choose_batch_size(measure, **{"cap_bytes": 100, **kwargs})


# --- measured probes (real forks, real steps) ---


def test_forked_measurement_reports_allocations_and_failures():
    def allocate(batch: int) -> None:
        block = torch.ones(batch * 16 * MiB // 4)  # float32: batch * 16 MiB, touched
        assert float(block[-1]) == 1.0

    small = measure_step_memory(allocate, 1, "cpu")
    large = measure_step_memory(allocate, 4, "cpu")
    assert 15 * MiB < small < 40 * MiB
    assert 63 * MiB < large < 90 * MiB

    def out_of_memory(batch: int) -> None:
        raise MemoryError

    with pytest.raises(StepDidNotFit):
        measure_step_memory(out_of_memory, 1, "cpu")

    def oom_killed(batch: int) -> None:
        os.kill(os.getpid(), 9)

    with pytest.raises(StepDidNotFit, match="OOM killer"):
        measure_step_memory(oom_killed, 1, "cpu")

    def buggy(batch: int) -> None:
        raise KeyError("bug in the step")

    with pytest.raises(RuntimeError, match="bug in the step") as info:
        measure_step_memory(buggy, 1, "cpu")
    assert not isinstance(info.value, StepDidNotFit)


def test_hanging_step_is_killed():
    def hang(batch: int) -> None:
        import time

        time.sleep(60)

    with pytest.raises(resources.StepTimedOut, match="killed"):
        measure_step_memory(hang, 1, "cpu", timeout=0.5)


def test_auto_batch_size_measures_a_real_trainer_step():
    config = load_config(str(TEST_CONFIG))
    probe._warm_up(config, "cpu")  # as auto_batch_size does, so both see the same baseline
    step = probe._trainer_step(config, "cpu")
    need_2 = measure_step_memory(step, 2, "cpu")
    need_4 = measure_step_memory(step, 4, "cpu")
    per_sample = max(need_4 - need_2, 0) / 2
    assert per_sample > 0, "activation memory must grow with the batch"
    cap = int(need_4 + 1.5 * per_sample)  # about batch 5.5

    batch, measured = auto_batch_size(config, cap, "cpu", max_batch=64)

    assert measured[batch] is not None and measured[batch] <= cap
    assert measured[batch + 1] is None or measured[batch + 1] > cap
    assert 3 <= batch <= 7
