"""An expert host does not step on a backward request whose gradient is far above the recent ones (a caller sending
x1000 gradients): clipping bounds the norm, but AdamW would still move every weight a full learning rate its way."""

from __future__ import annotations

import torch

from dragon_swarm.config import load_config
from dragon_swarm.moe.backend import GRAD_NORM_OUTLIER, GRAD_NORM_WARMUP, build_expert_backends, grad_norm_reference, is_grad_norm_outlier
from tests.swarm.paths import TEST_CONFIG

CONFIG = load_config(str(TEST_CONFIG))


def test_the_rule_waits_for_a_history_then_refuses_only_far_outliers():
    assert not is_grad_norm_outlier(1e6, [1.0] * (GRAD_NORM_WARMUP - 1))
    recent = [0.5, 1.0, 2.0] * 4
    assert not is_grad_norm_outlier(0.9 * GRAD_NORM_OUTLIER, recent)
    assert is_grad_norm_outlier(1.1 * GRAD_NORM_OUTLIER, recent)
    assert not is_grad_norm_outlier(0.0, [0.0] * 10)  # all-zero history: nothing to compare with but zero


def test_own_requests_are_the_reference_before_remote_ones_are_enough():
    assert is_grad_norm_outlier(1e6, [], trusted=[1.0])  # the first remote request is judged already
    assert not is_grad_norm_outlier(0.9 * GRAD_NORM_OUTLIER, [1e6] * (GRAD_NORM_WARMUP - 1), trusted=[1.0])
    # once enough remote requests were accepted, both count: a few of either kind cannot move the median
    assert grad_norm_reference([1.0] * GRAD_NORM_WARMUP, [100.0] * 3) == 1.0
    assert grad_norm_reference([1.0] * (GRAD_NORM_WARMUP - 1), []) is None


def one_backend(own_trainer: bool = False):
    m = CONFIG.model
    backends = build_expert_backends([f"{CONFIG.expert_prefix}.0.0"], m.d_model, m.expert_hidden, CONFIG.training, 1024, 0, own_trainer=own_trainer)
    return next(iter(backends.values()))


def test_a_scaled_request_is_not_stepped_and_honest_ones_still_are():
    m = CONFIG.model
    backend = one_backend()
    torch.manual_seed(0)

    def request(scale: float, tokens: int = 16, trusted: bool = False) -> None:
        x = torch.randn(tokens, m.d_model)
        out = backend.module(x)
        (out * torch.randn_like(out) * scale / 1024).sum().backward()  # output grads of a mean loss: small
        backend.on_backward(tokens, caller_trusted=trusted)

    for _ in range(GRAD_NORM_WARMUP + 2):
        request(1.0)
    assert backend.version == GRAD_NORM_WARMUP + 2 and backend.refused_updates == 0
    before = {k: v.clone() for k, v in backend.module.state_dict().items()}
    request(1000.0)  # what the scale_grads attack sends
    assert backend.refused_updates == 1 and backend.version == GRAD_NORM_WARMUP + 2
    assert all(torch.equal(v, before[k]) for k, v in backend.module.state_dict().items())
    assert all(p.grad is None for p in backend.module.parameters())  # nothing left to leak into the next step
    request(1.0)
    assert backend.version == GRAD_NORM_WARMUP + 3
    for tokens in (1, 2048):  # honest requests of very different sizes are stepped
        request(1.0, tokens)
    assert backend.refused_updates == 1 and backend.version == GRAD_NORM_WARMUP + 5
    request(1000.0, trusted=True)  # this peer's own local-expert update is not a caller to distrust
    assert backend.refused_updates == 1 and backend.version == GRAD_NORM_WARMUP + 6


def test_a_scaled_first_request_is_refused_where_the_host_trains_too():
    """A host that also trains calls its own copy through `trusted_backward` (the router does): those calls give
    the reference from the start, so an x1000 caller gets no unchecked step among the first requests."""
    m = CONFIG.model
    backend = one_backend()
    torch.manual_seed(0)

    def backward_inputs(scale: float, tokens: int = 16) -> tuple[torch.Tensor, torch.Tensor]:
        return torch.randn(tokens, m.d_model), torch.randn(tokens, m.d_model) * scale / 1024

    backend.trusted_backward(*backward_inputs(1.0))  # what the router runs for this peer's own call
    assert backend.version == 1 and backend.refused_updates == 0
    backend.backward(*backward_inputs(1000.0))  # the first remote request, scaled
    assert backend.refused_updates == 1 and backend.version == 1
    backend.backward(*backward_inputs(1.0))  # an honest remote one
    assert backend.refused_updates == 1 and backend.version == 2


def test_a_host_that_trains_steps_no_remote_request_before_its_own_trainer_gave_a_reference():
    """In a CI run an x1000 caller's requests reached a training host before that host's own trainer had made its
    first call (it was evaluating): with nothing to judge by they were stepped, AdamW's moments carried them for
    tens of steps, and an honest replica drifted until it was banned as Byzantine."""
    m = CONFIG.model
    torch.manual_seed(0)

    def backward_inputs(scale: float, tokens: int = 16) -> tuple[torch.Tensor, torch.Tensor]:
        return torch.randn(tokens, m.d_model), torch.randn(tokens, m.d_model) * scale / 1024

    backend = one_backend(own_trainer=True)
    before = {k: v.clone() for k, v in backend.module.state_dict().items()}
    backend.backward(*backward_inputs(1000.0))  # remote, before any own call: not stepped, whatever its size
    backend.backward(*backward_inputs(1.0))
    assert backend.version == 0 and backend.unreferenced_refusals == 2
    assert all(torch.equal(v, before[k]) for k, v in backend.module.state_dict().items())
    backend.trusted_backward(*backward_inputs(1.0))  # the host's own trainer: from now on remote requests are judged
    backend.backward(*backward_inputs(1.0))
    backend.backward(*backward_inputs(1000.0))
    assert backend.version == 2 and backend.refused_updates == 1 and backend.unreferenced_refusals == 2

    pure_host = one_backend(own_trainer=False)  # nobody to wait for: its first requests are stepped (documented)
    pure_host.backward(*backward_inputs(1.0))
    assert pure_host.version == 1 and pure_host.unreferenced_refusals == 0
