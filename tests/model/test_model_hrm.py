"""HRMSMoE end to end: shapes, causality, faults, one-step gradient, trunk/expert split, learning."""

import pytest
import torch

from dragon_swarm.model import HRMSMoE, LocalExperts, ModelConfig, count_parameters


def make_config(**overrides):
    d = dict(
        vocab_size=97, seq_len=12, d_model=32, n_heads=4, h_layers=1, l_layers=2, h_cycles=2, l_cycles=3,
        num_experts=4, top_k=2, expert_hidden=40, aux_loss_weight=0.01,
    )
    return ModelConfig.from_dict({**d, **overrides})


def make_model(cfg=None, dispatcher=None, seed=0):
    torch.manual_seed(seed)
    cfg = cfg or make_config()
    return HRMSMoE(cfg, dispatcher or LocalExperts.from_config(cfg))


class RecordingExperts:
    """Not an nn.Module, like a remote dispatcher: records calls, can kill or fail experts."""

    def __init__(self, local, dead=(), failing=()):
        self.local = local
        self.num_layers, self.num_experts = local.num_layers, local.num_experts
        self.dead, self.failing = set(dead), set(failing)  # sets of (layer, expert)
        self.calls = []  # (layer, experts asked, grad enabled)

    def alive_mask(self, layer):
        return torch.tensor([(layer, e) not in self.dead for e in range(self.num_experts)])

    def dispatch(self, layer, inputs):
        self.calls.append((layer, sorted(inputs), torch.is_grad_enabled()))
        return self.local.dispatch(layer, {e: t for e, t in inputs.items() if (layer, e) not in self.failing})


def tokens(cfg, B=3, seed=1):
    return torch.randint(0, cfg.vocab_size, (B, cfg.seq_len), generator=torch.Generator().manual_seed(seed))


def test_shapes_and_losses():
    cfg = make_config()
    model = make_model(cfg)
    x = tokens(cfg)

    logits, aux = model(x)
    total, ce, aux2 = model.compute_loss(x, x.roll(-1, dims=1))

    assert logits.shape == (3, cfg.seq_len, cfg.vocab_size)
    assert aux.ndim == 0 and torch.isfinite(aux)
    assert total.item() == pytest.approx(ce.item() + cfg.aux_loss_weight * aux2.item(), rel=1e-6)
    assert model(x[:, :5])[0].shape == (3, 5, cfg.vocab_size)  # shorter sequences are fine
    with pytest.raises(ValueError, match="seq_len"):
        model(torch.zeros(1, cfg.seq_len + 1, dtype=torch.long))


def test_dispatcher_shape_must_match_config():
    cfg = make_config()
    with pytest.raises(ValueError, match="dispatcher serves"):
        HRMSMoE(cfg, LocalExperts(cfg.num_moe_layers, cfg.num_experts + 1, cfg.d_model, 8))


def test_causal_future_tokens_do_not_change_the_past():
    cfg = make_config()
    model = make_model(cfg).eval()
    x = tokens(cfg, B=2)
    t = 7
    y = x.clone()
    y[:, t:] = (y[:, t:] + 1) % cfg.vocab_size

    with torch.no_grad():
        a, _ = model(x)
        b, _ = model(y)

    torch.testing.assert_close(a[:, :t], b[:, :t], atol=1e-5, rtol=1e-5)
    assert not torch.allclose(a[:, t:], b[:, t:])


def test_moe_layers_are_numbered_high_first_and_called_once_per_invocation():
    cfg = make_config()  # h_layers 1, l_layers 2, h_cycles 2, l_cycles 3
    disp = RecordingExperts(LocalExperts.from_config(cfg))
    model = make_model(cfg, disp)

    model(tokens(cfg))

    low_step, high_step = [1, 2], [0]
    expected = (low_step * 3 + high_step) * 2
    assert [layer for layer, _, _ in disp.calls] == expected


def test_failing_experts_still_give_finite_output_and_gradients():
    cfg = make_config()
    local = LocalExperts.from_config(cfg)
    failing = {(layer, e) for layer in range(cfg.num_moe_layers) for e in (0, 1)}
    failing |= {(2, 2), (2, 3)}  # layer 2 answers nobody at all
    model = make_model(cfg, RecordingExperts(local, failing=failing))
    x = tokens(cfg)

    total, ce, aux = model.compute_loss(x, x.roll(-1, dims=1))
    total.backward()

    assert torch.isfinite(total)
    for name, p in model.named_trunk_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
    assert all(p.grad is None for p in local.experts[0][0].parameters())  # never answered
    assert local.experts[0][2].w_down.weight.grad is not None


def test_dead_experts_are_never_dispatched_to():
    cfg = make_config()
    dead = {(0, 1), (1, 0), (1, 2), (2, 0), (2, 1), (2, 2)}  # layer 2: one survivor < top_k
    disp = RecordingExperts(LocalExperts.from_config(cfg), dead=dead)
    model = make_model(cfg, disp)

    loss = model.compute_loss(tokens(cfg), tokens(cfg, seed=2))[0]
    loss.backward()

    assert torch.isfinite(loss)
    for layer, asked, _ in disp.calls:
        assert not {(layer, e) for e in asked} & dead
    assert {tuple(asked) for layer, asked, _ in disp.calls if layer == 2} == {(3,)}


def test_everything_dead_degrades_to_attention_only():
    cfg = make_config()
    dead = {(layer, e) for layer in range(cfg.num_moe_layers) for e in range(cfg.num_experts)}
    disp = RecordingExperts(LocalExperts.from_config(cfg), dead=dead)
    model = make_model(cfg, disp)

    total, _, aux = model.compute_loss(tokens(cfg), tokens(cfg, seed=2))
    total.backward()

    assert disp.calls == [] and aux.item() == 0.0 and torch.isfinite(total)


@pytest.mark.parametrize("one_step_grad", [False, True])
def test_one_step_grad_keeps_only_the_last_two_steps_in_the_graph(one_step_grad):
    cfg = make_config(one_step_grad=one_step_grad)  # 2 x 3 low steps of 2 layers, 2 high steps of 1
    disp = RecordingExperts(LocalExperts.from_config(cfg))
    model = make_model(cfg, disp)

    total, _, _ = model.compute_loss(tokens(cfg), tokens(cfg, seed=2))
    total.backward()

    grad_flags = [grad for _, _, grad in disp.calls]
    if one_step_grad:
        # Only the final low step (layers 1, 2) and the final high step (layer 0).
        # Per high cycle: 3 low steps x layers (1, 2), then layer 0; 7 calls.
        assert grad_flags == [False] * 7 + [False] * 4 + [True, True] + [True]
        # The initial states only feed the early (no-grad) steps.
        assert model.z_l_init.grad is None and model.z_h_init.grad is None
    else:
        assert all(grad_flags) and len(grad_flags) == 14
        assert model.z_l_init.grad is not None and model.z_h_init.grad is not None
    assert model.tok_emb.weight.grad is not None


def test_trunk_excludes_expert_weights():
    cfg = make_config()
    model = make_model(cfg)

    names = [n for n, _ in model.named_trunk_parameters()]
    state = model.trunk_state_dict()

    assert names and not any(n.startswith("dispatcher") for n in names)
    assert not any(k.startswith("dispatcher") for k in state)
    assert any(k.startswith("dispatcher.") for k in model.state_dict())  # LocalExperts is a submodule
    assert "h_module.blocks.0.moe.gate.weight" in state  # gates are trunk
    counts = count_parameters(cfg)
    assert sum(p.numel() for _, p in model.named_trunk_parameters()) == counts["trunk"]
    assert sum(p.numel() for p in model.parameters()) == counts["total"]
    # No tensor is stored twice (the tied head has no key), so safetensors accepts it.
    ptrs = [t.data_ptr() for t in state.values()]
    assert len(ptrs) == len(set(ptrs))


def test_trunk_state_round_trip():
    cfg = make_config()
    src, dst = make_model(cfg, seed=0), make_model(cfg, seed=1)
    dst.dispatcher.load_state_dict(src.dispatcher.state_dict())
    x = tokens(cfg)

    dst.load_trunk_state_dict(src.trunk_state_dict())

    torch.testing.assert_close(dst(x)[0], src(x)[0])
    with pytest.raises(ValueError, match="missing"):
        dst.load_trunk_state_dict({k: v for k, v in src.trunk_state_dict().items() if k != "norm_f.weight"})


def test_remote_style_dispatcher_holds_no_parameters():
    cfg = make_config()
    model = make_model(cfg, RecordingExperts(LocalExperts.from_config(cfg)))

    assert [n for n, _ in model.named_parameters()] == [n for n, _ in model.named_trunk_parameters()]


def test_loss_falls_when_overfitting_one_batch():
    cfg = make_config(h_cycles=2, l_cycles=2, l_layers=1)
    model = make_model(cfg)
    x = tokens(cfg, B=4)
    y = x.roll(-1, dims=1)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)

    losses = []
    for _ in range(30):
        total, ce, _ = model.compute_loss(x, y)
        opt.zero_grad()
        total.backward()
        opt.step()
        losses.append(ce.item())

    assert losses[-1] < 0.5 * losses[0], losses
