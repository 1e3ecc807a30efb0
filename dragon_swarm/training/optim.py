"""Optimizer construction shared by the trainer, the expert hosts and the batch-size probe."""

from __future__ import annotations

from typing import Iterable

import torch


def decay_param_groups(named_params: Iterable[tuple[str, torch.nn.Parameter]], weight_decay: float) -> list[dict]:
    """AdamW param groups that decay only matrices (2+ dimensions), as nanoGPT and torchtitan do: decaying
    norms' gains, biases and HRM's initial states pulls them toward zero for no benefit.
    Empty groups are left out (torch refuses none, but hivemind's state averager counts them)."""
    decay, no_decay = [], []
    for _, p in named_params:
        (decay if p.ndim >= 2 else no_decay).append(p)
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return [g for g in groups if g["params"]]


def make_adamw(
    named_params: Iterable[tuple[str, torch.nn.Parameter]], lr: float, betas: tuple[float, float], weight_decay: float
) -> torch.optim.AdamW:
    return torch.optim.AdamW(decay_param_groups(named_params, weight_decay), lr=lr, betas=tuple(betas))
