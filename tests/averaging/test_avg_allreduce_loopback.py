"""Three real hivemind averagers on loopback run one all-reduce round with our 8-bit blockwise codec."""

import multiprocessing

import pytest
import torch
from hivemind.averaging import DecentralizedAverager

from dragon_swarm.averaging.compression import install_codecs, make_compression
from tests.averaging.loopback import shut_down, start_loopback_dhts

NUM_PEERS = 3
# the big tensor spans several 5000-value parts (part_size_bytes=5000 at 1 byte per value), none a multiple
# of the 4096-value quantization block; the small one is a single odd-shaped part
SHAPES = [(10_007,), (3, 5)]
BLOCKWISE_RELATIVE_ERROR = 0.0071  # see test_avg_compression.py


@pytest.fixture
def averagers():
    """Yield NUM_PEERS started averagers (one DHT each, all on 127.0.0.1) with random tensors; always reap them."""
    # DHT and averager are forked processes that must inherit our codec table; fork is the Linux default on
    # Python 3.11, but pin it in case something in the test session changed it
    if multiprocessing.get_start_method(allow_none=True) != "fork":
        multiprocessing.set_start_method("fork", force=True)
    install_codecs()
    torch.manual_seed(42)

    dhts, started = [], []
    try:
        start_loopback_dhts(NUM_PEERS, into=dhts)

        for dht in dhts:
            tensors = [torch.randn(shape) * 2 for shape in SHAPES]
            started.append(
                DecentralizedAverager(
                    tensors,
                    dht,
                    prefix="dragon_avg_test",
                    target_group_size=NUM_PEERS,
                    min_group_size=NUM_PEERS,
                    min_matchmaking_time=2.0,
                    request_timeout=1.0,
                    part_size_bytes=5000,
                    compression=make_compression("blockwise8bit"),
                    start=True,
                )
            )
        yield started
    finally:
        shut_down(started, dhts)


def test_three_averagers_reach_the_mean_with_blockwise8bit(averagers):
    """Error bound for one peer's result: the reducer averages parts others sent quantized (≤ ε·M each), the
    peer's own part was quantized on the way out (≤ ε·M), and the delta sent back, of size ≤ ~2M, is quantized
    again (≤ 2ε·M): at most 4ε·M in total, with ε = 0.0071 and M the largest |value| of any peer.
    We allow 5ε·M."""
    # Prepare
    before = []
    for averager in averagers:
        with averager.get_tensors() as tensors:
            before.append([tensor.clone() for tensor in tensors])
    true_means = [torch.stack([peer[i] for peer in before]).mean(dim=0) for i in range(len(SHAPES))]
    largest_value = max(tensor.abs().max().item() for peer in before for tensor in peer)
    bound = 5 * BLOCKWISE_RELATIVE_ERROR * largest_value
    # every peer starts far from the mean, so "close to the mean" also means "has moved"
    assert all((mean - tensor).abs().max() > 2 * bound for peer in before for tensor, mean in zip(peer, true_means))

    # Execute: all three steps run concurrently in the averager processes
    controls = [averager.step(wait=False, timeout=30) for averager in averagers]
    gathered = [control.result(timeout=60) for control in controls]

    # Assert
    assert all(group is not None and len(group) == NUM_PEERS for group in gathered), gathered
    for peer_index, averager in enumerate(averagers):
        with averager.get_tensors() as tensors:
            for tensor, mean, original in zip(tensors, true_means, before[peer_index]):
                error = (tensor - mean).abs().max().item()
                moved = (tensor - original).abs().max().item()
                assert error <= bound, f"peer {peer_index}: max error {error:.4f} > bound {bound:.4f}"
                assert moved > bound, f"peer {peer_index}: tensor moved by only {moved:.4f}, the round did not average"
