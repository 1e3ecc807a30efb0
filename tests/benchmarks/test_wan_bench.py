"""The pure parts of `benchmarks/wan.py`: the timed window, the 125m projection, the single-process baseline's init."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from benchmarks.wan import (
    PLAN_BYTES_PER_HOUR,
    bytes_window,
    derived_config,
    project_volunteer_bytes_per_hour,
    round_bytes_model,
    single_process_model,
    timed_window,
)
from dragon_swarm.config import load_config
from dragon_swarm.model.hrm_smoe import count_parameters

TEST_CONFIG = Path(__file__).resolve().parents[1] / "configs" / "swarm-test.yaml"


def records(n: int, start: int = 1) -> list[dict]:
    return [{"micro_batches": i, "time": float(i)} for i in range(start, start + n)]


def test_window_without_rounds_spans_all_records():
    first, last = timed_window(records(10), None)
    assert (first["micro_batches"], last["micro_batches"]) == (1, 10)


def test_window_holds_whole_rounds_after_the_first_outer_step():
    first, last = timed_window(records(24), 4)
    assert (first["micro_batches"], last["micro_batches"]) == (5, 21)  # 4 rounds: outer steps after 8, 12, 16, 20
    first, last = timed_window(records(6), 4)  # no whole round after the first: start at the first record
    assert (first["micro_batches"], last["micro_batches"]) == (1, 5)


def test_bytes_window_waits_for_overlapped_rounds_to_be_applied():
    # rounds of 4; round r's boundary is after micro-batch 4r
    synchronous = [{"micro_batches": i, "time": float(i), "epoch": i // 4} for i in range(1, 25)]
    by_mb = {r["micro_batches"]: r for r in synchronous}
    start, end = bytes_window(synchronous, by_mb[5], by_mb[21], 4)
    assert (start["micro_batches"], end["micro_batches"]) == (5, 21)  # applied at the boundary: the timed window
    # overlapped: a round is applied 2 micro-batches after its boundary (its bytes go out in between)
    overlapped = [{"micro_batches": i, "time": float(i), "epoch": max(0, (i - 2) // 4)} for i in range(1, 25)]
    by_mb = {r["micro_batches"]: r for r in overlapped}
    start, end = bytes_window(overlapped, by_mb[5], by_mb[21], 4)
    assert (start["micro_batches"], end["micro_batches"]) == (6, 22)  # still 4 whole rounds, each counted once
    assert bytes_window(overlapped, by_mb[5], by_mb[21], None) == (by_mb[5], by_mb[21])
    last_round_never_applied = overlapped[:21]
    assert bytes_window(last_round_never_applied, by_mb[5], by_mb[21], 4)[1] is last_round_never_applied[-1]


def test_round_bytes_model_counts_the_all_reduce_and_the_expert_deltas():
    # 4 trainers: 2 * 3/4 of a 1000-value trunk at 1 byte; 64 expert values at 1 + 4/64 bytes to each of 2 other holders
    assert round_bytes_model(1000, 1.0, 4, 64, 3) == pytest.approx(1500 + 2 * 68)
    assert round_bytes_model(1000, 1.0, 1, 10, 1) == 0.0  # alone: nothing to send


def test_projection_scales_the_measured_overhead_to_the_target_and_round_length():
    measured = load_config(str(TEST_CONFIG))
    counts = count_parameters(measured.model)
    codec = {"none": 4.0, "fp16": 2.0}.get(measured.training.outer_compression, 1.0)
    model_m = round_bytes_model(counts["trunk"], codec, 4, 8 * counts["per_expert"], 4)
    out = project_volunteer_bytes_per_hour(
        3 * model_m, TEST_CONFIG, [1.0], peers=4, held_experts=8, target_held_experts=16, announce_bytes_per_expert=0.0
    )
    assert out["overhead"] == pytest.approx(3.0)
    target = load_config(out["target_config"])
    t_counts = count_parameters(target.model)
    t_codec = {"none": 4.0, "fp16": 2.0}.get(target.training.outer_compression, 1.0)
    expected_round = 3.0 * round_bytes_model(t_counts["trunk"], t_codec, 4, 16 * t_counts["per_expert"], 2)
    assert out["bytes_per_round_target"] == pytest.approx(expected_round)
    row = out["rows"][0]
    assert row["round_s"] == target.training.sync_every
    assert row["bytes_per_hour"] == pytest.approx(expected_round * 3600 / target.training.sync_every)
    assert row["vs_plan"] == pytest.approx(row["bytes_per_hour"] / PLAN_BYTES_PER_HOUR)


def test_projection_counts_expert_announcements_per_second_not_per_round():
    measured = load_config(str(TEST_CONFIG))
    counts = count_parameters(measured.model)
    codec = {"none": 4.0, "fp16": 2.0}.get(measured.training.outer_compression, 1.0)
    model_m = round_bytes_model(counts["trunk"], codec, 4, 8 * counts["per_expert"], 4)
    # a 100 s round: 8 experts announced every update_period, on top of twice the protocol's bytes
    announce = 1000.0 * 8 * 100.0 / measured.experts.update_period
    out = project_volunteer_bytes_per_hour(
        2 * model_m + announce, TEST_CONFIG, [1.0, 4.0], peers=4, held_experts=8, target_held_experts=16,
        round_s=100.0, announce_bytes_per_expert=1000.0,
    )  # fmt: skip
    assert out["overhead"] == pytest.approx(2.0) and out["announce_bytes_per_round_measured"] == pytest.approx(announce)
    target = load_config(out["target_config"])
    per_hour_announcing = 1000.0 * 16 / target.experts.update_period * 3600
    assert out["announce_mb_per_hour_target"] == pytest.approx(per_hour_announcing / 1e6)
    fast, slow = out["rows"]
    # 4x slower micro-batches: a quarter of the rounds' bytes per hour, the same announcements
    assert fast["bytes_per_hour"] - per_hour_announcing == pytest.approx(4 * (slow["bytes_per_hour"] - per_hour_announcing))
    assert fast["bytes_per_hour"] == pytest.approx(out["bytes_per_round_target"] * 3600 / target.training.sync_every + per_hour_announcing)


def test_derived_config_overrides_training(tmp_path):
    derived = derived_config(TEST_CONFIG, tmp_path, "x", sync_every=7, eval_every=0)
    t = load_config(str(derived)).training
    assert (t.sync_every, t.eval_every) == (7, 0)


def test_single_process_model_starts_from_the_swarms_init():
    from dragon_swarm.export import expert_state_name, fresh_expert_state
    from dragon_swarm.model.hrm_smoe import HRMSMoE
    from dragon_swarm.training.local_trainer import HeldExperts

    config = load_config(str(TEST_CONFIG))
    model = single_process_model(config)
    m = config.model
    torch.manual_seed(config.swarm.seed)  # a fresh local-expert trainer's trunk, as LocalExpertsTrainer builds it
    trunk = HRMSMoE(m, HeldExperts(config.expert_prefix, m.num_moe_layers, m.num_experts, {})).trunk_state_dict()
    for name, t in trunk.items():
        assert torch.equal(model.state_dict()[name], t), name
    uid = f"{config.expert_prefix}.1.2"
    for name, t in fresh_expert_state(uid, config).items():
        assert torch.equal(model.state_dict()[expert_state_name(1, 2, name)], t)
