from __future__ import annotations

from pathlib import Path

import pytest

from benchmarks.local_peers import PeerLauncher


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
