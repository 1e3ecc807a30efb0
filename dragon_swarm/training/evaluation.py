"""Held-out loss: the model's cross-entropy on a fixed set of windows of the validation stream.

The validation stream holds whole documents that no trainer ever samples (`data.dataset.build_token_stream` splits
by document), so this loss measures what the swarm learned rather than what it memorised. The windows are a pure
function of the swarm seed and the config (`eval_windows`), never of the peer id or the peer-local batch size, so
every trainer scores the same text and their numbers can be compared (and a median taken) per model version.

Cheap by design: a few batches, forward only (`torch.no_grad`, so a remote dispatcher records no autograd graph
and no backward ever reaches an expert host), the model in eval mode, every `training.eval_every` model versions.
"""

from __future__ import annotations

import hashlib
import json

import numpy as np
import torch
from torch import nn

EVAL_BATCH_SIZE = 8  # sequences per evaluation batch: fixed, so peers with different micro-batch sizes agree
# sequences per forward: with remote experts a forward costs a round of expert calls per MoE layer and cycle whatever
# its size, so the whole set goes in few forwards (measured on swarm-test: 4 forwards of 8 ~ 1 micro-batch's time)
EVAL_FORWARD_SEQUENCES = 32
_EVAL_DOMAIN = "dragon_swarm.eval_windows.v1"


def eval_windows(num_tokens: int, seq_len: int, num_windows: int, swarm_seed: int) -> np.ndarray:
    """Sorted starts (int64) of `num_windows` distinct, non-overlapping windows of `seq_len` + 1 tokens.

    Windows sit on the grid of `sharding.sequential_offsets` (start = k * seq_len), drawn without replacement by a
    generator seeded from the swarm seed alone; fewer windows come back when the stream holds fewer.
    """
    if seq_len < 1 or num_windows < 1:
        raise ValueError(f"seq_len and num_windows must be >= 1, got {seq_len} and {num_windows}")
    grid = (num_tokens - 1) // seq_len
    if grid < 1:
        raise ValueError(f"a held-out stream of {num_tokens} tokens is too short for windows of {seq_len} + 1 tokens")
    payload = json.dumps([_EVAL_DOMAIN, int(swarm_seed), int(num_tokens), int(seq_len)], separators=(",", ":"))
    seed = int.from_bytes(hashlib.blake2b(payload.encode("ascii"), digest_size=16).digest(), "little")
    chosen = np.random.default_rng(seed).choice(grid, size=min(num_windows, grid), replace=False)
    return np.sort(chosen).astype(np.int64) * seq_len


def eval_batches(
    val_tokens: np.ndarray, seq_len: int, num_batches: int, swarm_seed: int, chunk_size: int = EVAL_BATCH_SIZE
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """The fixed evaluation set, `num_batches` * EVAL_BATCH_SIZE windows (fewer on a short stream), as (inputs,
    targets) pairs of int64 [<= chunk_size, seq_len]; the chunking changes how many forwards score it, not what."""
    starts = eval_windows(int(val_tokens.size), seq_len, num_batches * EVAL_BATCH_SIZE, swarm_seed)
    index = starts[:, None] + np.arange(seq_len + 1, dtype=np.int64)[None, :]
    windows = torch.from_numpy(np.asarray(val_tokens)[index].astype(np.int64))
    return [
        (chunk[:, :-1].contiguous(), chunk[:, 1:].contiguous()) for chunk in torch.split(windows, chunk_size) if len(chunk)
    ]


def evaluate_loss(model: nn.Module, batches: list[tuple[torch.Tensor, torch.Tensor]], device: str | torch.device = "cpu") -> float:
    """Mean cross-entropy (nats/token) of `model.compute_loss` over `batches`, weighted by tokens.

    Forward only: no autograd graph is built, so nothing is sent backward (to remote experts or anywhere else);
    the model's train/eval mode is restored afterwards.
    """
    if not batches:
        raise ValueError("no evaluation batches")
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    try:
        with torch.no_grad():
            for inputs, targets in batches:
                _, ce, _ = model.compute_loss(inputs.to(device), targets.to(device))
                total += float(ce.item()) * targets.numel()
                count += targets.numel()
    finally:
        model.train(was_training)
    return total / count
