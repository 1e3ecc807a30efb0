"""An expert's weights, optimizer state and update count survive a save and a load, and its optimizer state follows
the module to its device. Pure: real expert backends, no network."""

import pytest
import torch

from dragon_swarm.config import load_config
from dragon_swarm.moe.backend import build_expert_backends, load_expert, move_optimizer_state_to_parameters, save_expert
from tests.swarm.paths import TEST_CONFIG

UID = "dragon-test_ffn.0.1"


def expert():
    config = load_config(str(TEST_CONFIG))
    m = config.model
    return build_expert_backends([UID], m.d_model, m.expert_hidden, config.training, 1024, config.swarm.seed)[UID], m.d_model


def train(backend, d_model: int, steps: int) -> None:
    for _ in range(steps):
        x = torch.randn(16, d_model)
        backend.forward(x)
        backend.backward(x, torch.randn(16, d_model))


def test_weights_moments_and_update_count_come_back(tmp_path):
    trained, d_model = expert()
    train(trained, d_model, steps=3)
    assert trained.version == 3
    save_expert(tmp_path / f"{UID}.safetensors", trained)

    restored, _ = expert()
    assert restored.version == 0 and not restored.optimizer.state  # a fresh replica starts from the seeded init
    load_expert(tmp_path / f"{UID}.safetensors", restored)
    assert (restored.version, restored.tokens_processed) == (3, trained.tokens_processed)
    for a, b in zip(trained.module.state_dict().values(), restored.module.state_dict().values()):
        assert torch.equal(a, b)
    for p_trained, p_restored in zip(trained.module.parameters(), restored.module.parameters()):
        saved, loaded = trained.optimizer.state[p_trained], restored.optimizer.state[p_restored]
        assert torch.equal(saved["exp_avg"], loaded["exp_avg"]) and torch.equal(saved["exp_avg_sq"], loaded["exp_avg_sq"])
        assert float(saved["step"]) == float(loaded["step"]) == 3.0
    # the next step continues from the restored moments: both replicas end up identical
    torch.manual_seed(0)
    train(trained, d_model, steps=1)
    torch.manual_seed(0)
    train(restored, d_model, steps=1)
    for a, b in zip(trained.module.parameters(), restored.module.parameters()):
        assert torch.allclose(a, b)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU: the state must follow the module to it")
def test_optimizer_state_follows_the_module_to_the_gpu(tmp_path):
    backend, d_model = expert()
    train(backend, d_model, steps=1)
    save_expert(tmp_path / "e.safetensors", backend)
    restored, _ = expert()
    load_expert(tmp_path / "e.safetensors", restored)  # read on the CPU, as a host reads its checkpoints
    restored.module.to("cuda")  # what hivemind's Runtime does when it starts
    move_optimizer_state_to_parameters(restored.optimizer)  # what ExpertHost.start does once the runtime is ready
    for p in restored.module.parameters():
        state = restored.optimizer.state[p]
        assert state["exp_avg"].device == p.device and state["exp_avg_sq"].device == p.device
    x = torch.randn(16, d_model, device="cuda")
    restored.forward(x)
    restored.backward(x, torch.randn(16, d_model, device="cuda"))  # AdamW's step fails on mixed devices
    assert restored.version == 2
