"""The original plan's 125M HRM-sMoE builds and takes one training step on CPU."""

import torch

from dragon_swarm.config import load_config
from dragon_swarm.model.dispatch import LocalExperts
from dragon_swarm.model.hrm_smoe import HRMSMoE, count_parameters


def test_hrm_smoe_125m_builds_and_steps_once():
    config = load_config("hrm-smoe-125m").model
    counts = count_parameters(config)
    assert 115e6 < counts["total"] < 135e6

    torch.manual_seed(0)
    model = HRMSMoE(config, LocalExperts.from_config(config))
    assert sum(p.numel() for p in model.parameters()) == counts["total"]
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    tokens = torch.randint(0, config.vocab_size, (1, 128))
    loss, ce, _ = model.compute_loss(tokens[:, :-1], tokens[:, 1:])
    loss.backward()
    before = model.tok_emb.weight.detach().clone()
    optimizer.step()
    assert torch.isfinite(loss)
    assert not torch.equal(before, model.tok_emb.weight)
