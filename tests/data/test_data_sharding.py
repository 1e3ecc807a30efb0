"""Batch sharding and the train/validation split: pure functions, checked exhaustively on small inputs."""

from __future__ import annotations

import numpy as np
import pytest

from dragon_swarm.data.sharding import (
    batch_offsets,
    num_sequential_batches,
    sequential_offsets,
    split_train_validation,
)


def test_batch_offsets_are_deterministic_int64() -> None:
    # Prepare
    args = dict(swarm_seed=7, peer_id="QmPeerA", step=3, num_tokens=1_000_000, seq_len=128, batch_size=6)

    # Execute
    first = batch_offsets(**args)
    second = batch_offsets(**args)

    # Assert
    assert first.dtype == np.int64 and first.shape == (6,)
    np.testing.assert_array_equal(first, second)


def test_batch_offsets_known_answer() -> None:
    # Prepare: values any peer, in any process or on any host, must reproduce. If a numpy upgrade changes
    # Generator.integers, this fails, and peers on mixed numpy versions would train on different batches.
    expected = [386835, 389886, 538803, 106601, 792160, 925799]

    # Execute
    offsets = batch_offsets(7, "QmPeerA", 3, num_tokens=1_000_000, seq_len=128, batch_size=6)

    # Assert
    assert offsets.tolist() == expected


def test_batch_offsets_cover_exactly_the_valid_range() -> None:
    # Prepare: a stream so short that 2,000 draws must hit both ends of [0, num_tokens - seq_len - 1]
    num_tokens, seq_len = 20, 15

    # Execute
    offsets = np.concatenate(
        [batch_offsets(0, "peer", step, num_tokens, seq_len, batch_size=10) for step in range(200)]
    )

    # Assert
    assert set(offsets.tolist()) == set(range(num_tokens - seq_len))


def test_batch_offsets_differ_across_peers_steps_and_seeds() -> None:
    # Prepare
    def draw(seed: int, peer: str, step: int) -> tuple[int, ...]:
        return tuple(batch_offsets(seed, peer, step, num_tokens=10**9, seq_len=256, batch_size=4).tolist())

    # Execute
    draws = [draw(seed, peer, step) for seed in (0, 1) for peer in ("QmA", "QmB", "QmA:1") for step in range(50)]

    # Assert: 300 distinct (seed, peer, step) triples give 300 distinct batches
    assert len(set(draws)) == len(draws)


def test_batch_offsets_encode_peer_and_step_unambiguously() -> None:
    # Prepare: naive "seed:peer:step" string joining would make these two collide
    a = batch_offsets(1, "x:2", 3, num_tokens=10**9, seq_len=8, batch_size=4)

    # Execute
    b = batch_offsets(1, "x", 23, num_tokens=10**9, seq_len=8, batch_size=4)

    # Assert
    assert a.tolist() != b.tolist()


@pytest.mark.parametrize(
    "num_tokens, seq_len, batch_size, step",
    [(10, 10, 1, 0), (100, 0, 1, 0), (100, 10, 0, 0), (100, 10, 1, -1)],
)
def test_batch_offsets_reject_impossible_requests(num_tokens: int, seq_len: int, batch_size: int, step: int) -> None:
    # Execute / Assert
    with pytest.raises(ValueError):
        batch_offsets(0, "peer", step, num_tokens, seq_len, batch_size)


def test_sequential_offsets_cover_each_window_once_then_wrap() -> None:
    # Prepare: 101 tokens hold 10 windows of 10 + 1 tokens
    num_tokens, seq_len, batch_size = 101, 10, 4

    # Execute
    batches = [sequential_offsets(i, num_tokens, seq_len, batch_size) for i in range(4)]
    count = num_sequential_batches(num_tokens, seq_len, batch_size)

    # Assert
    assert count == 3
    assert np.concatenate(batches[:count]).tolist() == [0, 10, 20, 30, 40, 50, 60, 70, 80, 90, 0, 10]
    assert batches[3].tolist() == [20, 30, 40, 50]
    assert max(np.concatenate(batches)) + seq_len + 1 <= num_tokens


def test_split_is_deterministic_disjoint_and_complete() -> None:
    # Execute
    train, val = split_train_validation(100, 0.1, seed=3)
    train_again, val_again = split_train_validation(100, 0.1, seed=3)
    _, val_other_seed = split_train_validation(100, 0.1, seed=4)

    # Assert
    np.testing.assert_array_equal(train, train_again)
    np.testing.assert_array_equal(val, val_again)
    assert len(val) == 10 and train.dtype == val.dtype == np.int64
    assert sorted(train.tolist() + val.tolist()) == list(range(100))
    assert val.tolist() != val_other_seed.tolist()


@pytest.mark.parametrize("num_docs, fraction, expected_val", [(2, 0.01, 1), (42, 0.02, 1), (5, 0.99, 4)])
def test_split_keeps_at_least_one_document_on_each_side(num_docs: int, fraction: float, expected_val: int) -> None:
    # Execute
    train, val = split_train_validation(num_docs, fraction, seed=0)

    # Assert
    assert len(val) == expected_val and len(train) == num_docs - expected_val


def test_split_by_size_reaches_the_fraction_of_the_corpus() -> None:
    # Prepare: one tiny document among large ones, so a count-based split could hold out almost nothing
    sizes = [2_000] + [100_000] * 41

    # Execute
    splits = [split_train_validation(42, 0.05, seed, doc_sizes=sizes) for seed in range(20)]

    # Assert: 5% of 4.1 M needs exactly 3 large documents; the tiny one joins only when drawn before them
    for train, val in splits:
        assert sum(1 for i in val if sizes[i] == 100_000) == 3
        assert sorted(train.tolist() + val.tolist()) == list(range(42))
    assert len({len(val) for _, val in splits}) == 2


@pytest.mark.parametrize("num_docs, fraction", [(1, 0.5), (10, 0.0), (10, 1.0)])
def test_split_rejects_impossible_requests(num_docs: int, fraction: float) -> None:
    # Execute / Assert
    with pytest.raises(ValueError):
        split_train_validation(num_docs, fraction, seed=0)
