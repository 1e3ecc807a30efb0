"""Which tokens each peer trains on: pure functions of public values, so any peer can recompute any batch.

There is no coordinator handing out shards. A peer's batch at a step is drawn from the whole token stream
by a generator seeded with blake2b(swarm seed, peer id, step): peers and steps get independent windows,
and a verifier that knows the three values gets exactly the same windows. Python's `hash()` is salted per
process, so it is never used here.

numpy does not promise that `Generator.integers` keeps its stream across numpy releases; the known-answer
test in `tests/data/test_data_sharding.py` fails loudly if an upgrade changes it, since peers on different
numpy versions would then disagree.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence

import numpy as np

_BATCH_DOMAIN = "dragon_swarm.batch_offsets.v1"
_SPLIT_DOMAIN = "dragon_swarm.split_train_validation.v1"


def _rng(domain: str, *values: int | str) -> np.random.Generator:
    # JSON of the tuple is an unambiguous encoding: peer ids may contain any character.
    payload = json.dumps([domain, *values], ensure_ascii=True, separators=(",", ":")).encode("ascii")
    seed = int.from_bytes(hashlib.blake2b(payload, digest_size=16).digest(), "little")
    return np.random.default_rng(seed)


def batch_offsets(
    swarm_seed: int, peer_id: str, step: int, num_tokens: int, seq_len: int, batch_size: int
) -> np.ndarray:
    """`batch_size` window starts in [0, num_tokens - seq_len - 1], as int64.

    A window at start `s` reads tokens[s : s + seq_len + 1]: `seq_len` inputs plus one more for the last
    target, hence the upper bound. Draws are with replacement; on a stream of millions of tokens two
    windows of one batch rarely overlap, and drawing without replacement would cost O(num_tokens).
    """
    if seq_len < 1 or batch_size < 1:
        raise ValueError(f"seq_len and batch_size must be >= 1, got {seq_len} and {batch_size}")
    if num_tokens < seq_len + 1:
        raise ValueError(f"a stream of {num_tokens} tokens is too short for windows of {seq_len} + 1 tokens")
    if step < 0:
        raise ValueError(f"step must be >= 0, got {step}")
    rng = _rng(_BATCH_DOMAIN, int(swarm_seed), str(peer_id), int(step))
    return rng.integers(0, num_tokens - seq_len, size=batch_size, dtype=np.int64)


def sequential_offsets(batch_index: int, num_tokens: int, seq_len: int, batch_size: int) -> np.ndarray:
    """Starts of non-overlapping windows, in stream order, for evaluation that every peer does alike.

    Batches 0, 1, ... cover the stream's `(num_tokens - 1) // seq_len` windows once, then wrap around.
    """
    if seq_len < 1 or batch_size < 1:
        raise ValueError(f"seq_len and batch_size must be >= 1, got {seq_len} and {batch_size}")
    num_windows = (num_tokens - 1) // seq_len
    if num_windows < 1:
        raise ValueError(f"a stream of {num_tokens} tokens is too short for windows of {seq_len} + 1 tokens")
    if batch_index < 0:
        raise ValueError(f"batch_index must be >= 0, got {batch_index}")
    windows = (batch_index * batch_size + np.arange(batch_size, dtype=np.int64)) % num_windows
    return windows * seq_len


def num_sequential_batches(num_tokens: int, seq_len: int, batch_size: int) -> int:
    """How many `sequential_offsets` batches cover every window once (the last one wraps around)."""
    num_windows = max((num_tokens - 1) // seq_len, 0)
    return -(-num_windows // batch_size)


def split_train_validation(
    num_docs: int, val_fraction: float, seed: int, doc_sizes: Sequence[int] | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Deterministic split of document indices into sorted (train, validation) int64 arrays.

    Documents are taken for validation in a seeded random order. Without `doc_sizes`, validation gets
    round(num_docs * val_fraction) documents; with them (e.g. characters per document), it gets documents
    until their total size reaches `val_fraction` of the corpus, so one tiny document (a 2 kB poem among
    42 plays) does not become the whole validation set. Either way validation holds at least 1 document
    and training keeps at least 1. Splitting by document, not by token, keeps held-out text unseen rather
    than neighbouring seen text.
    """
    if num_docs < 2:
        raise ValueError(f"need at least 2 documents to hold one out, got {num_docs}")
    if not 0.0 < val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in (0, 1), got {val_fraction}")
    order = _rng(_SPLIT_DOMAIN, int(seed), int(num_docs)).permutation(num_docs)
    if doc_sizes is None:
        num_val = round(num_docs * val_fraction)
    else:
        if len(doc_sizes) != num_docs:
            raise ValueError(f"doc_sizes has {len(doc_sizes)} entries for {num_docs} documents")
        sizes = np.asarray(doc_sizes, dtype=np.int64)[order]
        if (sizes < 0).any():
            raise ValueError("doc_sizes must be >= 0")
        # Smallest prefix of the shuffled order whose size reaches the target.
        num_val = int(np.searchsorted(np.cumsum(sizes), val_fraction * sizes.sum(), side="left")) + 1
    num_val = min(max(1, num_val), num_docs - 1)
    return np.sort(order[num_val:]).astype(np.int64), np.sort(order[:num_val]).astype(np.int64)
