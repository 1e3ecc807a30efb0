"""Kept model versions (`--keep-versions`), `--new-swarm --init-from` (rollback) and the pure parts of the live
export: version rotation, the state dir an exported file turns into, the refusals, and the robust trunk choice."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from dragon_swarm import export, live_export
from dragon_swarm.config import load_config
from dragon_swarm.model.dispatch import LocalExperts
from dragon_swarm.model.hrm_smoe import HRMSMoE
from dragon_swarm.moe import expert_state
from dragon_swarm.moe.expert_uids import all_expert_uids
from dragon_swarm.node.init_from import fresh_optimizer_state, init_state_dir
from dragon_swarm.node.options import parse_peer_options
from dragon_swarm.node.startup import StartupError
from dragon_swarm.state.checkpoint import load_module_checkpoint, load_tensors, save_tensors_atomic
from dragon_swarm.training.checkpoint import TrainerState, read_trainer_state
from dragon_swarm.training.optim import decay_param_groups
from dragon_swarm.training.versions import VersionKeeper, kept_versions, version_path
from tests.swarm.paths import TEST_CONFIG


@pytest.fixture(scope="module")
def config():
    return load_config(TEST_CONFIG)


@pytest.fixture(scope="module")
def model(config):
    torch.manual_seed(3)
    return HRMSMoE(config.model, LocalExperts.from_config(config.model))


def _state(model: HRMSMoE, epoch: int) -> TrainerState:
    trunk = {k: v + epoch for k, v in model.trunk_state_dict().items()}  # each version tells itself apart
    return TrainerState(trunk, {"state": {0: {"exp_avg": torch.ones(2)}}, "param_groups": [{"params": [0]}]}, {"m": torch.ones(2)}, epoch * 4, epoch * 100, epoch)


def test_versions_rotate_keeping_the_newest(tmp_path, config, model):
    keeper = VersionKeeper(tmp_path, 3, config.run_prefix, "peer")
    written = [keeper.maybe_keep(epoch, lambda e=epoch: _state(model, e)) for epoch in (0, 0, 1, 2, 2, 3, 4, 5)]
    assert written == [True, False, True, True, False, True, True, True]  # a version is written once
    assert kept_versions(tmp_path) == [3, 4, 5]
    saved = read_trainer_state(version_path(tmp_path, 4), config.run_prefix)
    assert saved is not None and saved.local_epoch == 4 and saved.tokens == 400
    assert saved.optimizer["param_groups"] == [] and saved.momentum == {}  # trunk only
    assert torch.equal(saved.trunk["tok_emb.weight"], model.trunk_state_dict()["tok_emb.weight"] + 4)
    # a restart does not rewrite a kept version, and off means off
    again = VersionKeeper(tmp_path, 3, config.run_prefix, "peer")
    assert not again.maybe_keep(5, lambda: pytest.fail("must not build the state of a kept version"))
    off = tmp_path / "off"
    assert not VersionKeeper(off, 0, config.run_prefix, "peer").maybe_keep(1, lambda: _state(model, 1)) and kept_versions(off) == []


def test_a_poisoned_version_is_not_kept(tmp_path, config, model):
    bad = _state(model, 7)
    bad.trunk["tok_emb.weight"][0, 0] = float("nan")
    assert not VersionKeeper(tmp_path, 3, config.run_prefix, "peer").maybe_keep(7, lambda: bad)
    assert kept_versions(tmp_path) == []


def _model_file(tmp_path: Path, config, model: HRMSMoE, version: int = 12) -> Path:
    m = config.model
    experts = {}
    for uid in all_expert_uids(config.expert_prefix, m.num_moe_layers, m.num_experts):
        layer, index = map(int, uid.rsplit(".", 2)[1:])
        experts[uid] = model.dispatcher.experts[layer][index].state_dict()
    out = tmp_path / "model" / "model.safetensors"
    export.write_model_file(config, model.trunk_state_dict(), experts, out, version, 5000, "test")
    return out


def test_export_of_a_kept_version(tmp_path, config, model):
    trainer, host = tmp_path / "trainer", tmp_path / "host"
    keeper = VersionKeeper(trainer, 5, config.run_prefix, "peer")
    for epoch in (3, 4):
        keeper.maybe_keep(epoch, lambda e=epoch: _state(model, e))
    init_state_dir(_model_file(tmp_path, config, model), config, host, train=False, host=True)  # some expert checkpoints
    summary = export.export_from_state_dirs([trainer, host], config, tmp_path / "v3.safetensors", model_version=3)
    tensors, meta = load_tensors(summary.path)
    assert meta["model_version"] == "3" and torch.equal(tensors["tok_emb.weight"], model.trunk_state_dict()["tok_emb.weight"] + 3)
    with pytest.raises(export.ExportError, match=r"no trainer checkpoint of model version 9 .*kept versions there: 3, 4"):
        export.export_from_state_dirs([trainer, host], config, tmp_path / "v9.safetensors", model_version=9)


def test_init_from_writes_what_trainer_and_host_resume_from(tmp_path, config, model):
    path = _model_file(tmp_path, config, model)
    state_dir = tmp_path / "fresh"
    assert init_state_dir(path, config, state_dir, train=True, host=True) == 12
    saved = read_trainer_state(state_dir / "trainer.safetensors", config.run_prefix)
    assert saved is not None and saved.local_epoch == 12 and saved.micro_batches == 0
    assert all(torch.equal(saved.trunk[k], v) for k, v in model.trunk_state_dict().items())
    template = expert_state.make_template(config.model.d_model, config.model.expert_hidden, config.training)
    uid = all_expert_uids(config.expert_prefix, config.model.num_moe_layers, config.model.num_experts)[-1]
    state = expert_state.from_checkpoint(*load_module_checkpoint(state_dir / "experts" / f"{uid}.safetensors"), uid)
    expert_state.validate(state, template, uid)  # what moe.hosting checks before it uses its own checkpoint
    assert torch.equal(state.module["w_up.weight"], model.dispatcher.experts[1][config.model.num_experts - 1].w_up.weight)
    # a second rollback into the same state dir is refused
    with pytest.raises(StartupError, match=r"already holds trainer.safetensors .*use a fresh --state-dir"):
        init_state_dir(path, config, state_dir, train=True, host=True)


def test_init_from_refuses_another_config_and_a_broken_file(tmp_path, config, model):
    path = _model_file(tmp_path, config, model)
    tensors, meta = load_tensors(path)
    other = tmp_path / "other.safetensors"
    save_tensors_atomic(other, tensors, {**meta, "config_hash": "0123abcd"})
    with pytest.raises(StartupError, match=r"exported from a swarm with config 0123abcd, this swarm's config is") as e:
        init_state_dir(other, config, tmp_path / "a", train=True, host=True)
    assert "\n" not in str(e.value)
    assert not (tmp_path / "a" / "trainer.safetensors").exists()
    shrunk = tmp_path / "shrunk.safetensors"
    save_tensors_atomic(shrunk, {**tensors, "tok_emb.weight": tensors["tok_emb.weight"][:10]}, meta)
    with pytest.raises(StartupError, match=r"does not fit the config's model: tok_emb.weight has shape"):
        init_state_dir(shrunk, config, tmp_path / "b", train=True, host=True)
    with pytest.raises(StartupError, match="no such file"):
        init_state_dir(tmp_path / "nope.safetensors", config, tmp_path / "c", train=True, host=True)


def test_init_from_needs_new_swarm(tmp_path, capsys):
    args = ["-c", str(TEST_CONFIG), "--init-from", str(tmp_path / "m.safetensors"), "--state-dir", str(tmp_path / "s")]
    with pytest.raises(SystemExit) as e:
        parse_peer_options(["--initial-peers", "/ip4/127.0.0.1/tcp/1/p2p/QmX", *args], env={})
    assert e.value.code == 2 and "--init-from starts a new swarm: add --new-swarm" in capsys.readouterr().err
    options = parse_peer_options(["--new-swarm", *args, "--keep-versions", "5"], env={})
    assert options.init_from == tmp_path / "m.safetensors" and options.keep_versions == 5
    assert parse_peer_options(["--new-swarm", "-c", str(TEST_CONFIG)], env={}).keep_versions == 3


def test_local_expert_mode_loads_the_fresh_optimizer_state(config, model):
    local = config.model_copy(update={"training": config.training.model_copy(update={"mode": "local_experts"})})
    inner = torch.optim.AdamW(decay_param_groups(model.named_trunk_parameters(), 0.01), lr=1e-3)
    inner.load_state_dict(fresh_optimizer_state(local))  # what LocalExpertsTrainer._restore does
    assert fresh_optimizer_state(config) == {"state": {}, "param_groups": []}  # Trainer._restore: fresh moments


# --- the live export's pure parts ---


def _answers(config, model):
    order = live_export.trunk_parameter_order(config)
    trunk = model.trunk_state_dict()
    honest = [[trunk[name] + 0.001 * i for name, _ in order] for i in range(2)]
    poisoned = [trunk[name] + 5.0 for name, _ in order]
    return order, [
        live_export.parse_trunk_answer({"epoch": 7 + i}, tensors, order, f"peer{i}") for i, tensors in enumerate([*honest, poisoned])
    ]


def test_trunk_order_is_the_optimizers(config, model):
    order = live_export.trunk_parameter_order(config)
    assert sorted(name for name, _ in order) == sorted(model.trunk_state_dict())
    dims = [len(shape) for _, shape in order]
    assert dims == sorted(dims, key=lambda d: d < 2)  # hivemind sends the decayed matrices first, then the rest


def test_robust_trunk_choice_outvotes_a_poisoned_answer(config, model):
    _, answers = _answers(config, model)
    chosen = live_export.robust_trunk_choice(answers)
    assert chosen.peer_id in ("peer0", "peer1")  # the poisoned one claims the newest epoch and still loses
    assert live_export.robust_trunk_choice(answers[2:]) is answers[2]  # alone, an answer is taken (validated only)


def test_trunk_answers_are_validated(config, model):
    order, answers = _answers(config, model)
    tensors = [answers[0].trunk[name] for name, _ in order]
    with pytest.raises(live_export.TrunkStateError, match="no usable epoch"):
        live_export.parse_trunk_answer({"group_bits": ""}, tensors, order, "peerX")
    with pytest.raises(live_export.TrunkStateError, match="tensors for"):
        live_export.parse_trunk_answer({"epoch": 1}, tensors[:-1], order, "peerX")
    nan = [t.clone() for t in tensors]
    nan[0][0] = float("nan")
    with pytest.raises(live_export.TrunkStateError, match="NaN or Inf"):
        live_export.parse_trunk_answer({"epoch": 1}, nan, order, "peerX")
    swapped = [tensors[1], tensors[0], *tensors[2:]]
    with pytest.raises(live_export.TrunkStateError, match="parameter 0 has shape"):
        live_export.parse_trunk_answer({"epoch": 1}, swapped, order, "peerX")
    assert json.dumps(live_export.trunk_state_prefix(config)).endswith('_state_averager"')
