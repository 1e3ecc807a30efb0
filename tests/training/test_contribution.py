"""What a trainer sends after a micro-batch: the honest contribution, an injected attack, the trainer checkpoint's
round trip and the stats file. Pure: no network."""

import json
import math

import torch

from dragon_swarm.attacks import SIGN_FLIP_SCALE, Attack, ByzantineContribution
from dragon_swarm.events import StepReport
from dragon_swarm.training.checkpoint import TrainerState, read_trainer_state, save_trainer_state
from dragon_swarm.training.contribution import HonestContribution
from dragon_swarm.training.stats import StatsWriter


def params_with_grads(*grads: list[float]) -> list[tuple[str, torch.nn.Parameter]]:
    named = []
    for i, g in enumerate(grads):
        p = torch.nn.Parameter(torch.zeros(len(g)))
        p.grad = torch.tensor(g)
        named.append((f"p{i}", p))
    return named


def test_honest_contribution_clips_then_sends_its_momentum():
    honest = HonestContribution(clip_grad_norm=1.0, worker_momentum=0.5)
    first = params_with_grads([3.0, 4.0])  # norm 5 -> clipped to norm 1
    assert honest.prepare(first, torch.tensor(2.0), batch_size=8, num_peers=3) == 8
    assert torch.allclose(first[0][1].grad, torch.tensor([0.6, 0.8]), atol=1e-5)  # momentum starts at the first gradient
    second = params_with_grads([0.0, 0.5])
    honest.prepare(second, torch.tensor(2.0), batch_size=8, num_peers=3)
    assert torch.allclose(second[0][1].grad, torch.tensor([0.3, 0.65]), atol=1e-5)  # 0.5 * m + 0.5 * g
    restored = HonestContribution(clip_grad_norm=1.0, worker_momentum=0.5)
    restored.load_state_tensors(honest.state_tensors())
    assert torch.equal(restored.state_tensors()["p0"], honest.state_tensors()["p0"])


def test_a_non_finite_micro_batch_is_dropped_and_leaves_the_momentum_alone():
    honest = HonestContribution(clip_grad_norm=1.0, worker_momentum=0.9)
    honest.prepare(params_with_grads([1.0, 0.0]), torch.tensor(1.0), 8, 2)
    before = honest.state_tensors()["p0"].clone()
    assert honest.prepare(params_with_grads([math.nan, 0.0]), torch.tensor(1.0), 8, 2) is None
    assert honest.prepare(params_with_grads([1.0, 0.0]), torch.tensor(math.inf), 8, 2) is None
    assert torch.equal(honest.state_tensors()["p0"], before)


def test_an_injected_attack_replaces_the_gradient_and_claims_its_weight():
    attacker = ByzantineContribution(Attack.SIGN_FLIP, seed=0)
    named = params_with_grads([1.0, 2.0], [3.0])
    assert attacker.prepare(named, torch.tensor(1.0), batch_size=8, num_peers=4) == 8
    assert torch.allclose(named[0][1].grad, -SIGN_FLIP_SCALE * torch.tensor([1.0, 2.0]))
    assert torch.allclose(named[1][1].grad, -SIGN_FLIP_SCALE * torch.tensor([3.0]))
    liar = ByzantineContribution("inflated_weight", seed=0)
    assert liar.prepare(params_with_grads([1.0]), torch.tensor(1.0), batch_size=8, num_peers=4) > 8
    shuffler = ByzantineContribution("label_shuffle", seed=0)
    targets = torch.arange(16).reshape(2, 8)
    assert not torch.equal(shuffler.targets(targets), targets)


def test_trainer_checkpoint_round_trip_and_poisoned_trunk_is_not_saved(tmp_path):
    path = tmp_path / "trainer.safetensors"
    model = torch.nn.Linear(2, 2)
    optimizer = torch.optim.AdamW(model.parameters())
    model(torch.ones(1, 2)).sum().backward()
    optimizer.step()
    state = TrainerState(dict(model.state_dict()), optimizer.state_dict(), {"weight": torch.ones(2, 2)}, 7, 700, 3)
    assert save_trainer_state(path, state, "swarm-abc", "QmPeer")
    back = read_trainer_state(path, "swarm-abc")
    assert (back.micro_batches, back.tokens, back.local_epoch) == (7, 700, 3)
    assert torch.equal(back.trunk["weight"], model.weight.detach())
    assert torch.equal(back.momentum["weight"], torch.ones(2, 2))
    assert read_trainer_state(path, "another-swarm") is None
    poisoned = TrainerState({"weight": torch.full((2, 2), math.nan)}, optimizer.state_dict(), {}, 8, 800, 3)
    assert not save_trainer_state(path, poisoned, "swarm-abc", "QmPeer")
    assert read_trainer_state(path, "swarm-abc").micro_batches == 7  # the last good checkpoint is kept


def test_stats_file_has_one_json_line_per_report(tmp_path):
    writer = StatsWriter(tmp_path / "stats" / "s.jsonl")
    report = StepReport(
        micro_batches=3, epoch=1, loss=4.5, aux_loss=0.0, tokens=768, batch_tokens=256, samples_per_second=2.0,
        tokens_per_second=512.0, peers=2, experts_online=8, expert_failures=0, banned_peers=("QmBad",),
        rejected_parts=1, global_epoch=1, samples_accumulated=16, target_batch_size=32,
    )  # fmt: skip
    writer.write(report)
    writer.write(report)
    lines = (tmp_path / "stats" / "s.jsonl").read_text().splitlines()
    assert len(lines) == 2
    record = json.loads(lines[0])
    assert record["micro_batches"] == 3 and record["epoch"] == 1 and record["banned_peers"] == ["QmBad"]
