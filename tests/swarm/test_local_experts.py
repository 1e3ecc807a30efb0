"""Local-expert mode on a real loopback swarm: three trainers, each holding 6 of the 8 experts (placement), train
locally and make an outer step every 4 micro-batches (3 rounds), overlapped: round 2 averages in the background
while round 3 trains and applies when it ends; round 1 (it aligns the trainers) and round 3 (the last) run to their
end before training goes on. The last one starts its first round from weights
nobody else holds (the test-only `off_start` fault, as after a failed or partial round): the round-start digests at
the barrier must tell it, and it must take the swarm's state and be in step again. One scenario per module; each
test asserts one property of what the peers did. The Byzantine variant is `test_local_experts_byzantine.py`.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from benchmarks.local_peers import PeerProcess, read_stats
from dragon_swarm.state.checkpoint import load_module_checkpoint
from tests.swarm.paths import TEST_CONFIG

pytestmark = pytest.mark.swarm

STEPS = 12  # 3 outer rounds of 4 micro-batches
HONEST = 3
OFF_START = HONEST - 1  # this trainer's first round starts elsewhere (`--attack off_start`: honest in what it sends)


@dataclass
class Scenario:
    log_dir: Path
    trainers: list[PeerProcess]
    stats: list[Path]
    exit_codes: list[int]


@pytest.fixture(scope="module")
def scenario(module_launcher) -> Scenario:
    log_dir = module_launcher.log_dir
    raw = yaml.safe_load(TEST_CONFIG.read_text())
    raw["training"]["mode"] = "local_experts"
    raw["training"]["outer_overlap"] = True  # the sync path runs in `test_local_experts_byzantine.py`
    config = log_dir / "local.yaml"
    config.write_text(yaml.safe_dump(raw))
    boot = module_launcher.bootstrap()
    initial = boot.initial_peers()

    def start(name: str, *extra: str) -> PeerProcess:
        args = ["-c", str(config), "--initial-peers", *initial, "--state-dir", str(log_dir / name), "--max-experts", "6",
                "--max-steps", str(STEPS), "--stats-file", str(log_dir / f"{name}.jsonl"), *extra]  # fmt: skip
        return module_launcher.start(name, args)

    trainers = [start(f"trainer{i}", *(["--attack", "off_start"] if i == OFF_START else [])) for i in range(HONEST)]
    exit_codes = [t.wait(timeout=400) for t in trainers]
    return Scenario(log_dir, trainers, [log_dir / f"trainer{i}.jsonl" for i in range(HONEST)], exit_codes)


def test_trainers_finish_and_loss_falls(scenario):
    assert scenario.exit_codes == [0] * HONEST, [t.stderr()[-2000:] for t in scenario.trainers]
    for path in scenario.stats:
        records = read_stats(path)
        # reported before its outer step; round 2 (in the background) applied a few micro-batches into round 3, or
        # at its end when it took the whole round
        assert records[-1]["micro_batches"] == STEPS and records[-1]["epoch"] in (STEPS // 4 - 2, STEPS // 4 - 1)
        first, last = records[0]["loss"], sum(r["loss"] for r in records[-3:]) / 3
        assert last < first - 0.2, f"{path.name}: loss {first:.3f} -> {last:.3f}"
    for trainer in scenario.trainers:  # the config evaluates every 2 model versions: after the second outer step
        assert re.search(r"held-out loss \d+\.\d+ at model version 2", trainer.stderr()), trainer.name


def test_outer_rounds_average_the_trunk_with_the_others(scenario):
    for trainer in scenario.trainers:
        rounds = re.findall(r"Outer step (\d+): trunk averaged with (\d+) other", trainer.stderr())
        assert len(rounds) == STEPS // 4
        assert all(int(others) == HONEST - 1 for _, others in rounds), rounds
        # the middle round averaged while the trainer went on training
        assert re.search(r"Outer step 2: .* \(in the background; applied \d+ micro-batch", trainer.stderr()), trainer.name


def test_a_trainer_out_of_step_is_told_by_the_digests_and_takes_the_swarm_s_state(scenario):
    off = scenario.trainers[OFF_START].stderr()
    assert re.search(r"Outer round 1: this trainer's round start differs from that of 2 of 2 other trainer", off), off[-3000:]
    assert "Downloaded the trunk from a peer: now at epoch 1" in off, off[-3000:]
    assert "Outer round 2: this trainer's round start differs" not in off  # in step again for the second round
    for i, trainer in enumerate(scenario.trainers):
        if i != OFF_START:
            assert "round start differs" not in trainer.stderr(), trainer.name


def test_every_model_version_is_kept(scenario):
    for i in range(HONEST):
        kept = sorted(p.name for p in (scenario.log_dir / f"trainer{i}" / "versions").glob("*.safetensors"))
        assert kept == [f"trainer-v{v}.safetensors" for v in range(1, STEPS // 4 + 1)], kept


def test_the_trunk_is_the_same_on_every_honest_trainer(scenario):
    # a trainer whose last all-reduce lost a reducer's answer (it says so) keeps its own values there until the next
    # round's barrier finds it out of step; every trainer whose last round came back whole must hold the same trunk, and at least two must
    whole = [i for i, t in enumerate(scenario.trainers) if "of values; the rest kept" not in t.stderr().split(f"Outer step {STEPS // 4}:")[-1].splitlines()[0]]
    assert len(whole) >= 2, [t.stderr()[-2000:] for t in scenario.trainers]
    trunks = [load_file(str(scenario.log_dir / f"trainer{i}" / "trainer.safetensors")) for i in whole]
    names = [n for n in trunks[0] if n.startswith("trunk.")] or list(trunks[0])
    for other in trunks[1:]:  # every member of a round gets the same averaged bytes: bit-identical, not just close
        for name in names:
            assert torch.equal(trunks[0][name], other[name]), name


def test_each_expert_agrees_across_its_holders(scenario):
    holders: dict[str, list[torch.Tensor]] = {}
    for i, trainer in enumerate(scenario.trainers):
        # what the trainer held at the end (a file of an expert it dropped when rebalancing stays behind, older)
        held = re.findall(r"Serving \d+ expert\(s\): ([^(]+) \(", trainer.stderr())[-1].split(", ")
        for uid in held:
            path = scenario.log_dir / f"trainer{i}" / "experts" / f"{uid}.safetensors"
            module, _, _ = load_module_checkpoint(path)
            holders.setdefault(uid, []).append(torch.cat([module[k].reshape(-1) for k in sorted(module)]))
    shared = {uid: vs for uid, vs in holders.items() if len(vs) >= 2}
    assert shared, "no expert had two honest holders"
    for uid, vectors in shared.items():
        for v in vectors[1:]:
            assert float((v - vectors[0]).norm() / vectors[0].norm()) < 0.05, uid
