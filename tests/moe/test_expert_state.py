"""An expert's state as a value: bytes round trip, validation of what a peer sends, the robust choice among several
hosts' answers, and the robust merge of replica sync. Pure: real expert backends, no network."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from safetensors.torch import save as safetensors_save

from dragon_swarm.config import load_config
from dragon_swarm.moe import expert_state, round_delta
from dragon_swarm.moe.backend import build_expert_backends
from dragon_swarm.moe.expert_state import ExpertStateError
from dragon_swarm.moe.replica_sync import apply_delta
from tests.swarm.paths import TEST_CONFIG

CONFIG = load_config(str(TEST_CONFIG))
UID = "dragon-test_ffn.0.1"


def backend(uid: str = UID):
    m = CONFIG.model
    return build_expert_backends([uid], m.d_model, m.expert_hidden, CONFIG.training, 1024, CONFIG.swarm.seed)[uid]


def trained(steps: int, seed: int):
    b = backend()
    g = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        x = torch.randn(16, CONFIG.model.d_model, generator=g)
        b.forward(x)
        b.backward(x, torch.randn(16, CONFIG.model.d_model, generator=g))
    return b


def test_bytes_round_trip_keeps_weights_moments_and_counters():
    source = trained(3, seed=0)
    state = expert_state.capture(source)
    back = expert_state.from_bytes(expert_state.to_bytes(state), "test")
    expert_state.validate(back, backend(), UID)
    target = backend()
    expert_state.apply(back, target)
    assert (target.version, target.tokens_processed) == (3, source.tokens_processed)
    for a, b in zip(source.module.state_dict().values(), target.module.state_dict().values()):
        assert torch.equal(a, b)
    for p, q in zip(source.module.parameters(), target.module.parameters()):
        assert torch.equal(source.optimizer.state[p]["exp_avg_sq"], target.optimizer.state[q]["exp_avg_sq"])


def test_garbage_and_pickles_are_refused_without_being_executed():
    for data in (b"", b"\x00" * 7, b"not safetensors at all", b"\x80\x04\x95" + b"x" * 40):
        with pytest.raises(ExpertStateError):
            expert_state.from_bytes(data, "peer X")
    no_uid = safetensors_save({"module.w": torch.zeros(2)}, metadata={"info": '{"version": 1}'})
    with pytest.raises(ExpertStateError, match="names no uid"):
        expert_state.from_bytes(no_uid, "peer X")


@pytest.mark.parametrize(
    "corrupt, message",
    [
        (lambda s: dataclasses.replace(s, uid="other"), "expected"),
        (lambda s: dataclasses.replace(s, module={k: v[..., :-1] for k, v in s.module.items()}), "expected"),
        (lambda s: dataclasses.replace(s, module={k: v.double() for k, v in s.module.items()}), "expected"),
        (lambda s: dataclasses.replace(s, module={**s.module, "extra": torch.zeros(1)}), "tensor names"),
        (lambda s: dataclasses.replace(s, module={k: v * float("nan") for k, v in s.module.items()}), "non-finite"),
    ],
)
def test_a_state_that_is_not_this_expert_is_refused(corrupt, message):
    state = expert_state.capture(trained(1, seed=0))
    with pytest.raises(ExpertStateError, match=message):
        expert_state.validate(corrupt(state), backend(), UID)


def test_moments_of_the_wrong_shape_are_refused():
    state = expert_state.capture(trained(1, seed=0))
    bad = {"state": {0: {**state.optimizer["state"][0], "exp_avg": torch.zeros(3)}}, "param_groups": state.optimizer["param_groups"]}
    with pytest.raises(ExpertStateError, match="optimizer 0.exp_avg"):
        expert_state.validate(dataclasses.replace(state, optimizer=bad), backend(), UID)


def test_robust_choice_is_an_honest_answer_when_honest_hosts_are_the_majority():
    honest = [expert_state.capture(trained(3, seed=s)) for s in (0, 1)]
    liar = expert_state.capture(trained(3, seed=2))
    liar = dataclasses.replace(liar, module={k: v * 100 for k, v in liar.module.items()}, version=10**9)
    chosen = expert_state.robust_choice([liar, *honest])
    assert chosen in honest
    # with two answers that disagree, our own copy is the tie-breaking voter
    assert expert_state.robust_choice([liar, honest[0]], reference=honest[1]) is honest[0]


def test_merge_of_two_replicas_is_their_mean_and_keeps_our_counters():
    a, b = (expert_state.capture(trained(3, seed=s)) for s in (0, 1))
    merged = expert_state.robust_merge(a, [b])
    for name in a.module:
        assert torch.allclose(merged.state.module[name], (a.module[name] + b.module[name]) / 2, atol=1e-6)
    assert merged.state.version == a.version
    assert merged.distances[0] == pytest.approx(merged.distances[1], rel=1e-4)


def test_merge_resists_one_byzantine_replica_of_four():
    honest = [expert_state.capture(trained(3, seed=s)) for s in range(3)]
    liar = dataclasses.replace(honest[0], module={k: v * 0 + 50.0 for k, v in honest[0].module.items()})
    merged = expert_state.robust_merge(honest[0], [honest[1], liar, honest[2]])
    mean = {k: sum(h.module[k] for h in honest) / 3 for k in honest[0].module}
    spread = max(float((h.parameter_vector() - expert_state.ExpertState(UID, mean, None, 0).parameter_vector()).norm()) for h in honest)
    moved = float((merged.state.parameter_vector() - expert_state.ExpertState(UID, mean, None, 0).parameter_vector()).norm())
    assert moved < 2 * spread  # the liar is 50 per coordinate away; its pull is clipped to the honest spread
    assert merged.distances[2] > 5 * merged.spread


def test_apply_delta_keeps_updates_made_after_the_capture():
    b = trained(2, seed=0)
    before = expert_state.capture(b)
    other = expert_state.capture(trained(2, seed=1))
    merged = expert_state.robust_merge(before, [other]).state
    x = torch.randn(16, CONFIG.model.d_model)
    b.forward(x)
    b.backward(x, torch.randn(16, CONFIG.model.d_model))  # the runtime trains while the sync downloads
    after_update = expert_state.capture(b)
    apply_delta(b, before, merged)
    for name, tensor in b.module.state_dict().items():
        expected = after_update.module[name] + merged.module[name] - before.module[name]
        assert torch.allclose(tensor, expected, atol=1e-6)


def test_holders_that_merge_the_same_round_weights_in_peer_order_get_the_same_bits():
    states = {peer: expert_state.capture(trained(3, seed=s)) for s, peer in enumerate(["peer-c", "peer-a", "peer-b"])}
    start = expert_state.capture(backend()).module  # all three started the round from the seeded init
    wire = {peer: round_delta.snapshot(s, start).state() for peer, s in states.items()}
    ordered = [wire[peer] for peer in sorted(wire)]
    first, second = expert_state.merge_weights(ordered), expert_state.merge_weights(list(ordered))
    for name in first.state.module:
        assert torch.equal(first.state.module[name], second.state.module[name])
    assert first.state.optimizer is None  # moments stay each holder's own
    mean = {k: sum(s.module[k] for s in ordered) / 3 for k in ordered[0].module}
    for name in mean:  # three honest replicas: CenteredClip with a relative radius keeps (nearly) their mean
        assert torch.allclose(first.state.module[name], mean[name], atol=1e-3)
