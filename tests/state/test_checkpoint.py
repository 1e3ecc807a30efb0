import pytest
import torch

from dragon_swarm.state.checkpoint import (
    CheckpointError,
    load_module_checkpoint,
    save_module_checkpoint,
)


def trained_linear():
    torch.manual_seed(0)
    module = torch.nn.Linear(4, 3)
    optimizer = torch.optim.AdamW(module.parameters(), lr=0.1)
    module(torch.randn(5, 4)).sum().backward()
    optimizer.step()
    return module, optimizer


def test_module_and_optimizer_round_trip(tmp_path):
    module, optimizer = trained_linear()
    path = tmp_path / "expert.safetensors"
    save_module_checkpoint(path, module.state_dict(), optimizer.state_dict(), {"version": 7})

    state, optimizer_state, info = load_module_checkpoint(path)
    restored = torch.nn.Linear(4, 3)
    restored.load_state_dict(state)
    restored_optimizer = torch.optim.AdamW(restored.parameters(), lr=0.5)
    restored_optimizer.load_state_dict(optimizer_state)

    assert info == {"version": 7}
    assert torch.equal(restored.weight, module.weight)
    assert restored_optimizer.param_groups[0]["lr"] == 0.1
    original = optimizer.state_dict()["state"][0]
    for key in ("exp_avg", "exp_avg_sq", "step"):
        assert torch.equal(restored_optimizer.state_dict()["state"][0][key], original[key])


def test_write_is_atomic_and_leaves_no_temp_files(tmp_path):
    module, optimizer = trained_linear()
    path = tmp_path / "x.safetensors"
    save_module_checkpoint(path, module.state_dict(), None, {})
    save_module_checkpoint(path, module.state_dict(), None, {"again": True})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["x.safetensors"]
    assert load_module_checkpoint(path)[2] == {"again": True}


def test_corrupt_checkpoint_raises_a_clear_error(tmp_path):
    module, _ = trained_linear()
    path = tmp_path / "x.safetensors"
    save_module_checkpoint(path, module.state_dict(), None, {})
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="cannot read checkpoint"):
        load_module_checkpoint(path)
    path.write_bytes(b"\x00" * 64)
    with pytest.raises(CheckpointError):
        load_module_checkpoint(path)
