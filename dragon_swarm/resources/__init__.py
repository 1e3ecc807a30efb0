"""What this machine can give the swarm: memory cap, threads, micro-batch size, resource profiles.

* :mod:`.memory` — reading a memory limit (``'50%'``, ``'6GiB'``), the device's total, applying caps and threads;
* :mod:`.probe` — measured training steps and the ``--batch-size auto`` search (imports torch);
* :mod:`.profiles` — ``ResourceProfile`` and ``load_profile`` (the shipped ``peers/*.yaml``).

Decisions are pure functions over plain numbers (``parse_memory_limit``, ``choose_batch_size``) and are tested
exhaustively; the probes that feed them (``total_memory_bytes``, ``measure_step_memory``) measure the real
machine. Typical use by a peer, before it starts any DHT or averager threads::

    profile = load_profile("cpu-laptop")
    device = resolve_device(profile.device)
    cap = parse_memory_limit(profile.max_memory, total_memory_bytes(device))
    apply_threads(profile.threads)
    apply_memory_cap(device, cap)
    batch, measured = auto_batch_size(config, cap, device)

Importing this package does not import torch; the probe's names load on first use.
"""

from __future__ import annotations

import importlib
from typing import Any

from dragon_swarm.resources.memory import (
    CGROUP_MEMORY_FILES,
    apply_memory_cap,
    apply_threads,
    format_bytes,
    parse_memory_limit,
    resolve_device,
    total_memory_bytes,
)
from dragon_swarm.resources.profiles import ResourceProfile, available_profiles, load_profile

_PROBE_NAMES = ("StepDidNotFit", "StepTimedOut", "auto_batch_size", "choose_batch_size", "measure_step_memory")

__all__ = [
    "CGROUP_MEMORY_FILES",
    "ResourceProfile",
    "apply_memory_cap",
    "apply_threads",
    "available_profiles",
    "format_bytes",
    "load_profile",
    "parse_memory_limit",
    "resolve_device",
    "total_memory_bytes",
    *_PROBE_NAMES,
]


def __getattr__(name: str) -> Any:
    if name in _PROBE_NAMES:
        return getattr(importlib.import_module("dragon_swarm.resources.probe"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
