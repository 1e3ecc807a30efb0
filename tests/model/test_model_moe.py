"""MoE routing math and the MoEFeedForward <-> dispatcher contract, without the HRM trunk."""

import math

import pytest
import torch

from dragon_swarm.model import (
    ExpertFFN,
    LocalExperts,
    ModelConfig,
    MoEFeedForward,
    load_balancing_loss,
    route,
)

D = 16


def make_config(num_experts=4, top_k=2):
    return ModelConfig(
        vocab_size=64, seq_len=8, d_model=D, n_heads=2, h_layers=1, l_layers=1, h_cycles=1, l_cycles=1,
        num_experts=num_experts, top_k=top_k, expert_hidden=24, aux_loss_weight=0.01,
    )


class RecordingExperts:
    """LocalExperts wrapper: records every call, can mark experts dead or failing."""

    def __init__(self, local: LocalExperts, dead=(), failing=()):
        self.local = local
        self.num_layers, self.num_experts = local.num_layers, local.num_experts
        self.dead, self.failing = set(dead), set(failing)
        self.calls = []  # (layer, {expert: inputs}, grad_enabled)

    def alive_mask(self, layer):
        return torch.tensor([e not in self.dead for e in range(self.num_experts)])

    def dispatch(self, layer, inputs):
        self.calls.append((layer, {e: t.detach().clone() for e, t in inputs.items()}, torch.is_grad_enabled()))
        answered = {e: t for e, t in inputs.items() if e not in self.failing}
        return self.local.dispatch(layer, answered)


def moe_and_experts(num_experts=4, top_k=2, seed=0, **faults):
    torch.manual_seed(seed)
    cfg = make_config(num_experts, top_k)
    moe = MoEFeedForward(cfg, moe_layer=0)
    torch.nn.init.normal_(moe.gate.weight, std=1.0)  # decisive routing, so ties never matter
    local = LocalExperts(1, num_experts, D, 24)
    return moe, RecordingExperts(local, **faults), local


def dense_reference(moe, local, x, alive, answered=None):
    """What the MoE output must be, computed token by token."""
    flat = x.reshape(-1, D)
    r = route(moe.gate(flat), alive, moe.top_k)
    out = torch.zeros_like(flat)
    for n in range(flat.shape[0]):
        pairs = [(e.item(), w) for e, w in zip(r.experts[n], r.weights[n]) if answered is None or e.item() in answered]
        total = sum(w for _, w in pairs)
        for e, w in pairs:
            out[n] += (w / total) * local.experts[0][e](flat[n : n + 1])[0]
    return out.view_as(x)


# --- route() and load_balancing_loss(): pure functions ---


def test_route_picks_top_k_alive_and_softmaxes_over_them():
    logits = torch.tensor([[3.0, 2.0, 1.0, 0.0], [0.0, 5.0, 4.0, 1.0]])
    alive = torch.tensor([False, True, True, True])

    r = route(logits, alive, top_k=2)

    assert r.experts.tolist() == [[1, 2], [1, 2]]
    expected = torch.softmax(torch.tensor([2.0, 1.0]), 0)
    torch.testing.assert_close(r.weights[0], expected)
    assert r.probs[:, 0].eq(0).all()  # dead expert has no probability
    torch.testing.assert_close(r.probs.sum(-1), torch.ones(2))


def test_route_uses_what_is_alive_when_fewer_than_k():
    r = route(torch.randn(5, 4), torch.tensor([False, False, True, False]), top_k=2)

    assert r.experts.shape == (5, 1)
    assert r.experts.eq(2).all()
    assert r.weights.eq(1).all()


def test_load_balancing_loss_matches_hand_computation():
    # 3 experts, expert 2 dead (its huge logit must be ignored), k = 1, four tokens.
    l2, l3 = math.log(2), math.log(3)
    logits = torch.tensor([[l2, 0.0, 9.0], [l3, 0.0, 9.0], [l3, 0.0, 9.0], [0.0, l3, 9.0]])
    alive = torch.tensor([True, True, False])
    r = route(logits, alive, top_k=1)
    # Choices 0, 0, 0, 1 -> f = [3/4, 1/4].
    # Probabilities over the alive pair: [2/3,1/3], [3/4,1/4], [3/4,1/4], [1/4,3/4]
    # -> P = [(2/3 + 3/4 + 3/4 + 1/4)/4, (1/3 + 1/4 + 1/4 + 3/4)/4] = [29/48, 19/48].
    expected = 2 * (3 / 4 * 29 / 48 + 1 / 4 * 19 / 48)  # = 106/96

    assert r.experts.flatten().tolist() == [0, 0, 0, 1]
    assert load_balancing_loss(r, alive).item() == pytest.approx(expected)


def test_load_balancing_loss_top2_collapsed_routing():
    # Every token prefers experts 0 then 1 of 4: f = [1/2, 1/2, 0, 0].
    logits = torch.tensor([[2.0, 1.0, 0.0, 0.0]]).repeat(6, 1)
    alive = torch.ones(4, dtype=torch.bool)
    p = torch.softmax(logits[0], 0)

    loss = load_balancing_loss(route(logits, alive, top_k=2), alive)

    assert loss.item() == pytest.approx(4 * (0.5 * p[0] + 0.5 * p[1]).item())


# --- MoEFeedForward with a dispatcher ---


def test_groups_hold_exactly_the_chosen_tokens_in_one_call():
    moe, disp, _ = moe_and_experts()
    x = torch.randn(2, 5, D)
    flat = x.reshape(-1, D)

    moe(x, disp)

    assert len(disp.calls) == 1
    layer, inputs, _ = disp.calls[0]
    assert layer == 0
    chosen = route(moe.gate(flat), torch.ones(4, dtype=torch.bool), 2).experts
    for e in range(4):
        rows = [n for n in range(flat.shape[0]) if e in chosen[n].tolist()]
        if rows:
            torch.testing.assert_close(inputs[e], flat[rows])
        else:
            assert e not in inputs  # experts without tokens are not called
    assert sum(len(t) for t in inputs.values()) == flat.shape[0] * 2


def test_output_matches_dense_reference():
    moe, disp, local = moe_and_experts()
    x = torch.randn(3, 4, D)

    y, aux = moe(x, disp)

    torch.testing.assert_close(y, dense_reference(moe, local, x, torch.ones(4, dtype=torch.bool)))
    assert aux.ndim == 0 and aux.item() >= 1.0 - 1e-6  # 1 is the balanced minimum


def test_dead_experts_are_never_dispatched_to():
    moe, disp, local = moe_and_experts(dead={0, 3})
    x = torch.randn(4, 6, D)

    y, _ = moe(x, disp)

    assert set(disp.calls[0][1]) <= {1, 2}
    alive = torch.tensor([False, True, True, False])
    torch.testing.assert_close(y, dense_reference(moe, local, x, alive))


def test_single_alive_expert_serves_everyone_with_weight_one():
    moe, disp, local = moe_and_experts(dead={0, 1, 3})
    x = torch.randn(2, 3, D)

    y, _ = moe(x, disp)

    torch.testing.assert_close(y, local.experts[0][2](x.reshape(-1, D)).view_as(x))


def test_no_alive_expert_gives_zero_output_and_no_call():
    moe, disp, _ = moe_and_experts(dead={0, 1, 2, 3})

    y, aux = moe(torch.randn(2, 3, D), disp)

    assert disp.calls == []
    assert y.eq(0).all() and aux.item() == 0.0


def test_failed_experts_are_renormalised_away():
    moe, disp, local = moe_and_experts(failing={1})
    x = torch.randn(4, 5, D, requires_grad=True)

    y, aux = moe(x, disp)
    (y.square().sum() + aux).backward()

    alive = torch.ones(4, dtype=torch.bool)
    torch.testing.assert_close(y, dense_reference(moe, local, x, alive, answered={0, 2, 3}))
    assert torch.isfinite(x.grad).all() and torch.isfinite(moe.gate.weight.grad).all()


def test_tokens_with_no_answering_expert_get_zero():
    moe, disp, _ = moe_and_experts(num_experts=2, top_k=1, failing={0})
    x = torch.randn(3, 4, D, requires_grad=True)

    y, _ = moe(x, disp)
    y.sum().backward()

    sent_to_0 = route(moe.gate(x.reshape(-1, D)), torch.ones(2, dtype=torch.bool), 1).experts[:, 0].eq(0)
    assert sent_to_0.any() and (~sent_to_0).any()  # the seed gives both kinds of token
    assert y.reshape(-1, D)[sent_to_0].eq(0).all()
    assert y.reshape(-1, D)[~sent_to_0].ne(0).any()
    assert torch.isfinite(x.grad).all()


def test_all_experts_failing_gives_zero_output():
    moe, disp, _ = moe_and_experts(failing={0, 1, 2, 3})

    y, aux = moe(torch.randn(2, 3, D), disp)

    assert y.eq(0).all() and torch.isfinite(aux)


def test_dispatcher_contract_violations_raise():
    moe, _, local = moe_and_experts()
    x = torch.randn(2, 3, D)

    class Extra(RecordingExperts):
        def dispatch(self, layer, inputs):
            out = super().dispatch(layer, inputs)
            return {**out, 99: torch.zeros(1, D)}

    class WrongShape(RecordingExperts):
        def dispatch(self, layer, inputs):
            return {e: t[:, :-1] for e, t in super().dispatch(layer, inputs).items()}

    class BadMask(RecordingExperts):
        def alive_mask(self, layer):
            return torch.ones(3, dtype=torch.bool)

    with pytest.raises(ValueError, match="not asked"):
        moe(x, Extra(local))
    with pytest.raises(ValueError, match="returned shape"):
        moe(x, WrongShape(local))
    with pytest.raises(ValueError, match="alive_mask"):
        moe(x, BadMask(local))


def test_expert_ffn_is_one_tensor_in_one_out():
    expert = ExpertFFN(D, 24)

    out = expert(torch.randn(7, D))

    assert out.shape == (7, D)
    assert sum(p.numel() for p in expert.parameters()) == 3 * D * 24
