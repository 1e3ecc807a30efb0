import os
from pathlib import Path

import pytest
import torch

from dragon_swarm import resources
from dragon_swarm.config import load_config
from dragon_swarm.resources import (
    StepDidNotFit,
    apply_threads,
    auto_batch_size,
    available_profiles,
    choose_batch_size,
    load_profile,
    measure_step_memory,
    parse_memory_limit,
)

GiB, MiB = 2**30, 2**20
TEST_CONFIG = Path(__file__).resolve().parents[1] / "configs" / "swarm-test.yaml"


# --- parse_memory_limit ---


@pytest.mark.parametrize(
    "text, total, expected",
    [
        ("0.5", 8 * GiB, 4 * GiB),
        ("50%", 8 * GiB, 4 * GiB),
        ("100%", 1000, 1000),
        ("1.0", 1000, 1000),
        (".25", 1000, 250),
        ("12.5 %", 800, 100),
        ("6GiB", 1, 6 * GiB),
        ("512MiB", 1, 512 * MiB),
        ("4Ki", 1, 4096),
        ("1TiB", 1, 2**40),
        ("2G", 1, 2 * 10**9),
        ("1.5GB", 1, 1_500_000_000),
        ("800M", 1, 800 * 10**6),
        ("3kb", 1, 3000),
        ("1000000", 1, 1_000_000),
        ("1000000B", 1, 1_000_000),
        (" 6 gib ", 1, 6 * GiB),
    ],
)
def test_parse_memory_limit_valid(text, total, expected):
    assert parse_memory_limit(text, total) == expected


@pytest.mark.parametrize(
    "text, message",
    [
        ("", "empty memory limit"),
        ("lots", "cannot read memory limit"),
        ("6 gigs", "cannot read memory limit"),
        ("1e9", "cannot read memory limit"),
        ("GiB", "cannot read memory limit"),
        ("abc%", "cannot read memory limit"),
        ("inf%", "cannot read memory limit"),
        ("0", "must be positive"),
        ("0GiB", "must be positive"),
        ("0%", "must be positive"),
        ("0.0", "must be positive"),
        ("-1GiB", "must be positive"),
        ("-50%", "must be positive"),
        ("1.5", "more than all of the memory"),
        ("150%", "more than all of the memory"),
    ],
)
def test_parse_memory_limit_invalid(text, message):
    with pytest.raises(ValueError, match=message):
        parse_memory_limit(text, 8 * GiB)


def test_fraction_needs_a_known_total():
    with pytest.raises(ValueError, match="total memory unknown"):
        parse_memory_limit("50%", 0)
    assert parse_memory_limit("1GiB", 0) == GiB  # absolute sizes do not need it


def test_total_memory_honours_a_smaller_cgroup_limit(tmp_path, monkeypatch):
    ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    limit = tmp_path / "memory.max"
    monkeypatch.setattr(resources, "CGROUP_MEMORY_FILES", (limit,))
    limit.write_text("max\n")
    assert resources.total_memory_bytes("cpu") == ram
    limit.write_text(f"{ram // 4}\n")
    assert resources.total_memory_bytes("cpu") == ram // 4
    limit.write_text(f"{ram * 4}\n")  # a limit above RAM changes nothing
    assert resources.total_memory_bytes("cpu") == ram


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


# --- profiles ---


def test_shipped_profiles_load():
    names = available_profiles()
    assert {"cpu-laptop", "gpu-8gb", "gpu-24gb", "expert-host"} <= set(names)
    for name in names:
        profile = load_profile(name)
        assert profile.description
    laptop = load_profile("cpu-laptop")
    assert (laptop.device, laptop.max_memory, laptop.threads, laptop.batch_size) == ("cpu", "50%", 2, "auto")
    assert laptop.train and laptop.host_experts
    assert load_profile("gpu-8gb").device == "cuda"
    assert parse_memory_limit(load_profile("gpu-24gb").max_memory, 0) == 22 * GiB
    host = load_profile("expert-host")
    assert not host.train and host.host_experts


def write_profile(tmp_path: Path, body: str) -> str:
    path = tmp_path / "mine.yaml"
    path.write_text("description: test peer\n" + body)
    return str(path)


def test_profile_from_a_path_and_number_spelling(tmp_path):
    profile = load_profile(write_profile(tmp_path, "device: auto\nmax_memory: 0.25\nbatch_size: 12\n"))
    assert (profile.device, profile.max_memory, profile.batch_size) == ("auto", "0.25", 12)


@pytest.mark.parametrize(
    "body, message",
    [
        ("gpus: 2\n", "unknown key(s) gpus"),
        ("batch_size: big\n", "batch_size"),
        ("batch_size: 0\n", "batch_size must be >= 1"),
        ("batch_size: 2.5\n", "batch_size"),
        ("threads: 0\n", "threads"),
        ("device: tpu\n", "device must be"),
        ("max_memory: lots\n", "cannot read memory limit"),
        ("train: 'yes'\n", "train"),
    ],
)
def test_bad_profiles_name_the_file(tmp_path, body, message):
    with pytest.raises(ValueError, match="mine.yaml") as info:
        load_profile(write_profile(tmp_path, body))
    assert message in str(info.value)


def test_unknown_profile_name_lists_known_ones():
    with pytest.raises(ValueError, match="known: .*cpu-laptop"):
        load_profile("supercomputer")


# --- apply_threads ---


def test_apply_threads(monkeypatch):
    interop = []
    monkeypatch.setattr(torch, "set_num_interop_threads", interop.append)
    before = torch.get_num_threads()
    try:
        assert apply_threads(None) == before
        assert apply_threads(1) == 1 and torch.get_num_threads() == 1 and interop == [1]

        def too_late(n):
            raise RuntimeError("cannot set number of interop threads after parallel work has started")

        monkeypatch.setattr(torch, "set_num_interop_threads", too_late)
        assert apply_threads(2) == 2  # the inter-op failure is not fatal
        for bad in (0, -1, True, 1.5):
            with pytest.raises(ValueError, match="threads must be an integer >= 1"):
                apply_threads(bad)
    finally:
        torch.set_num_threads(before)


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
    resources._warm_up(config, "cpu")  # as auto_batch_size does, so both see the same baseline
    step = resources._trainer_step(config, "cpu")
    need_2 = measure_step_memory(step, 2, "cpu")
    need_4 = measure_step_memory(step, 4, "cpu")
    per_sample = max(need_4 - need_2, 0) / 2
    assert per_sample > 0, "activation memory must grow with the batch"
    cap = int(need_4 + 1.5 * per_sample)  # about batch 5.5

    batch, measured = auto_batch_size(config, cap, "cpu", max_batch=64)

    assert measured[batch] is not None and measured[batch] <= cap
    assert measured[batch + 1] is None or measured[batch + 1] > cap
    assert 3 <= batch <= 7
