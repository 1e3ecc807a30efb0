"""Export from state dirs and generate: state dirs made from a real short single-process run, exported, loaded into
one process and sampled; missing and corrupt experts are reported."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from dragon_swarm import export, generate
from dragon_swarm.config import load_config
from dragon_swarm.data.corpus import default_data_dir
from dragon_swarm.data.dataset import build_token_stream
from dragon_swarm.model.dispatch import LocalExperts
from dragon_swarm.model.hrm_smoe import HRMSMoE
from dragon_swarm.moe.expert_uids import expert_uid
from dragon_swarm.state.checkpoint import save_module_checkpoint
from dragon_swarm.training.checkpoint import TrainerState, save_trainer_state
from dragon_swarm.training.evaluation import eval_batches, evaluate_loss
from tests.swarm.paths import TEST_CONFIG

STEPS = 30


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A single-process run of the swarm-test model, saved as two trainers' and two hosts' state dirs would be."""
    root = tmp_path_factory.mktemp("export")
    config = load_config(TEST_CONFIG)
    m = config.model
    data_dir = default_data_dir()
    train, val = build_token_stream(config.data.source, data_dir, data_dir / "cache", config.data.tokenizer, config.data.val_fraction)
    torch.manual_seed(0)
    fresh = HRMSMoE(m, LocalExperts.from_config(m))
    model = HRMSMoE(m, LocalExperts.from_config(m))
    model.load_state_dict(fresh.state_dict())
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    for step in range(STEPS):
        inputs, targets = train.batch(config.swarm.seed, "single", step, 8, m.seq_len)
        loss, _, _ = model.compute_loss(inputs, targets)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    dirs = {name: root / name for name in ("trainer-old", "trainer-new", "host-a", "host-b")}
    empty_optimizer = {"state": {}, "param_groups": []}

    def trainer_state(net: HRMSMoE, epoch: int, val_loss: float | None) -> TrainerState:
        return TrainerState(net.trunk_state_dict(), empty_optimizer, {}, micro_batches=epoch * 4, tokens=epoch * 1000, local_epoch=epoch,
                            val_loss=val_loss, val_epoch=epoch if val_loss is not None else None)  # fmt: skip

    # an older trainer holds a fresh trunk at version 3, the newer one the trained trunk at version 9
    assert save_trainer_state(dirs["trainer-old"] / "trainer.safetensors", trainer_state(fresh, 3, None), config.run_prefix, "old")
    assert save_trainer_state(dirs["trainer-new"] / "trainer.safetensors", trainer_state(model, 9, 6.5), config.run_prefix, "new")
    for layer in range(m.num_moe_layers):
        for index in range(m.num_experts):
            uid = expert_uid(config.expert_prefix, layer, index)
            host = dirs["host-a"] if layer == 0 else dirs["host-b"]
            weights = model.dispatcher.experts[layer][index].state_dict()
            save_module_checkpoint(host / "experts" / f"{uid}.safetensors", weights, None, {"uid": uid, "version": 50})
    # host-b also kept a stale replica of expert 0.0 (fewer updates): the export must take host-a's
    stale_uid = expert_uid(config.expert_prefix, 0, 0)
    stale = fresh.dispatcher.experts[0][0].state_dict()
    save_module_checkpoint(dirs["host-b"] / "experts" / f"{stale_uid}.safetensors", stale, None, {"uid": stale_uid, "version": 7})
    return config, model, fresh, dirs, val


def _export(run, tmp_path: Path, *extra: str, dirs: list[Path] | None = None) -> tuple[int, Path]:
    config, _, _, all_dirs, _ = run
    out = tmp_path / "out" / "model.safetensors"
    given = dirs if dirs is not None else list(all_dirs.values())
    code = export.main(["--from-state-dir", *map(str, given), "-c", str(TEST_CONFIG), "--out", str(out), "--log-level", "WARNING", *extra])
    return code, out


def test_export_then_generate_round_trip(run, tmp_path, capsys):
    config, model, fresh, _, val = run
    code, out = _export(run, tmp_path)
    assert code == 0, capsys.readouterr().err
    assert (out.parent / f"{config.data.tokenizer}.json").is_file()
    tensors = load_file(str(out))
    assert set(tensors) == set(model.state_dict())  # the single-process model's names, weights only
    loaded = generate.load_exported_model(out)
    meta = loaded.metadata
    assert meta["model_version"] == "9" and meta["config_hash"] == config.swarm_hash() and meta["val_loss"].startswith("6.5")
    assert json.loads(meta["experts_missing"]) == [] and int(meta["tokens_trained"]) == 9000 + 3000 and meta["date"]
    # the exported model is the trained one: same logits, bit for bit
    inputs = torch.randint(0, config.model.vocab_size, (2, config.model.seq_len))
    with torch.no_grad():
        assert torch.equal(loaded.model(inputs)[0], model(inputs)[0])
    batches = eval_batches(val.tokens, config.model.seq_len, 2, config.swarm.seed)
    assert evaluate_loss(loaded.model, batches) < evaluate_loss(fresh, batches) - 0.5  # it learned something
    # generate: the same seed gives the same text, greedy needs none
    args = ["--model", str(out), "--prompt", "ROMEO:", "--max-new-tokens", "20", "--seed", "7"]
    texts = []
    for _ in range(2):
        assert generate.main(args) == 0
        texts.append(capsys.readouterr().out)
    assert texts[0] == texts[1] and texts[0].startswith("ROMEO:") and len(texts[0]) > len("ROMEO:\n")
    greedy = [generate.generate_text(loaded, "ROMEO:", 15, temperature=0.0, top_k=None, seed=s) for s in (1, 2)]
    assert greedy[0] == greedy[1]


def test_missing_expert_is_named_unless_allowed(run, tmp_path, capsys):
    config, _, _, dirs, _ = run
    code, out = _export(run, tmp_path, dirs=[dirs["trainer-new"], dirs["host-a"]])  # layer 1's host is not given
    err = capsys.readouterr().err
    missing = expert_uid(config.expert_prefix, 1, 0)
    assert code == 1 and f"expert {missing} is in none of the state dirs" in err and len(err.strip().splitlines()) == 1
    assert not out.exists()
    code, out = _export(run, tmp_path, "--allow-missing", dirs=[dirs["trainer-new"], dirs["host-a"]])
    assert code == 0
    assert len(json.loads(generate.load_exported_model(out).metadata["experts_missing"])) == config.model.num_experts


def test_corrupt_or_poisoned_expert_is_refused(run, tmp_path, capsys):
    config, _, _, dirs, _ = run
    bad = tmp_path / "bad-host"
    uid = expert_uid(config.expert_prefix, 1, 0)  # the first of layer 1: its only copy is the bad one
    (bad / "experts").mkdir(parents=True)
    (bad / "experts" / f"{uid}.safetensors").write_bytes(b"not a safetensors file")
    code, _ = _export(run, tmp_path, dirs=[dirs["trainer-new"], dirs["host-a"], bad])
    err = capsys.readouterr().err
    assert code == 1 and f"expert {uid}" in err and "refused" in err
    # a NaN copy with more updates loses to the good copy
    nan_weights = {k: torch.full_like(v, float("nan")) for k, v in run[1].dispatcher.experts[1][0].state_dict().items()}
    save_module_checkpoint(bad / "experts" / f"{uid}.safetensors", nan_weights, None, {"uid": uid, "version": 10_000})
    code, out = _export(run, tmp_path, dirs=[*dirs.values(), bad])
    assert code == 0
    assert torch.isfinite(load_file(str(out))["dispatcher.experts.1.0.w_up.weight"]).all()


def test_wrong_config_or_no_trainer_is_a_clear_error(run, tmp_path, capsys):
    _, _, _, dirs, _ = run
    code, _ = _export(run, tmp_path, dirs=[dirs["host-a"], dirs["host-b"]])
    assert code == 1 and "no usable trainer.safetensors" in capsys.readouterr().err
    both = ["--initial-peers", "/ip4/127.0.0.1/tcp/1/p2p/Qm", "--from-state-dir", str(dirs["host-a"])]
    assert export.main([*both, "-c", str(TEST_CONFIG), "--out", str(tmp_path / "x")]) == 2
    assert "give either --from-state-dir" in capsys.readouterr().err
