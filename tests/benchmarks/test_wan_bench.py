"""The pure parts of `benchmarks/wan.py`: the timed window, the 125m projection, the single-process baseline's init."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from benchmarks.wan import PLAN_BYTES_PER_HOUR, derived_config, project_volunteer_bytes_per_hour, single_process_model, timed_window
from dragon_swarm.config import load_config

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


def test_projection_scales_by_trunk_codec_and_round_length():
    out = project_volunteer_bytes_per_hour(1e6, TEST_CONFIG, [1.0])
    row = out["rows"][0]
    target = load_config(out["target_config"])
    codec = {"none": 4.0, "fp16": 2.0}.get(target.averaging.compression, 1.0) / 4.0  # swarm-test: no compression
    expected_round = 1e6 * out["trunk_ratio"] * codec
    assert out["bytes_per_round_target"] == pytest.approx(expected_round)
    assert row["round_s"] == target.training.sync_every
    assert row["bytes_per_hour"] == pytest.approx(expected_round * 3600 / target.training.sync_every)
    assert row["vs_plan"] == pytest.approx(row["bytes_per_hour"] / PLAN_BYTES_PER_HOUR)


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
