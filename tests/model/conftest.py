import pytest
import torch


@pytest.fixture(autouse=True)
def one_torch_thread():
    """The model tests use toy sizes: one thread is as fast as two and does not
    stall when other test processes share the cores (OpenMP barriers do)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
