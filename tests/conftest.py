from __future__ import annotations

from pathlib import Path

import pytest
import torch

from benchmarks.local_peers import PeerLauncher


@pytest.fixture
def one_torch_thread():
    """Toy-sized models: one thread is as fast as two and does not stall when other test processes share the
    cores (OpenMP barriers do). Modules that need it: ``pytestmark = pytest.mark.usefixtures("one_torch_thread")``."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture
def launcher(tmp_path: Path):
    peers = PeerLauncher(tmp_path)
    try:
        yield peers
    finally:
        peers.stop_all()


@pytest.fixture(scope="module")
def module_launcher(tmp_path_factory):
    peers = PeerLauncher(tmp_path_factory.mktemp("swarm"))
    try:
        yield peers
    finally:
        peers.stop_all()
