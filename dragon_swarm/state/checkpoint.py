"""Safetensors checkpoints, written atomically (temp file + rename), never pickle.

A checkpoint is a flat dict of tensors plus string metadata. Optimizer state is flattened into tensors
(`optimizer.state.<param index>.<name>`) with the JSON-able rest (param groups, scalars) in metadata.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from dragon_swarm.state.atomic import atomic_write

OPTIMIZER_PREFIX = "optimizer.state."


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be read; the file on disk is left untouched for inspection."""


def save_tensors_atomic(path: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> None:
    """Write atomically (`state.atomic`: temp file, fsync, rename): a crash leaves the old file or the new one."""
    contiguous = {name: t.detach().cpu().contiguous() for name, t in tensors.items()}
    atomic_write(Path(path), lambda tmp: save_file(contiguous, str(tmp), metadata=metadata))


def safetensors_metadata(data: bytes) -> dict[str, str]:
    """The `__metadata__` of safetensors bytes (u64 header length, JSON header). Raises ValueError, KeyError or
    struct.error on bytes that are not safetensors."""
    (header_len,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8 : 8 + header_len])
    metadata = header.get("__metadata__") or {}
    if not all(isinstance(k, str) and isinstance(v, str) for k, v in metadata.items()):
        raise ValueError("metadata must map strings to strings")
    return metadata


def load_tensors(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Read a checkpoint; a truncated or garbled file raises CheckpointError instead of crashing the peer."""
    try:
        tensors = load_file(str(path))
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as f:
            metadata = dict(f.metadata() or {})
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        raise CheckpointError(f"cannot read checkpoint {path}: {e}") from None
    return tensors, metadata


def optimizer_state_to_tensors(state_dict: dict[str, Any]) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Split a torch optimizer state_dict into tensors and a JSON-able remainder."""
    tensors: dict[str, torch.Tensor] = {}
    scalars: dict[str, dict[str, Any]] = {}
    for param_index, param_state in state_dict["state"].items():
        for name, value in param_state.items():
            if isinstance(value, torch.Tensor):
                tensors[f"{OPTIMIZER_PREFIX}{param_index}.{name}"] = value
            else:
                scalars.setdefault(str(param_index), {})[name] = value
    return tensors, {"param_groups": state_dict["param_groups"], "scalars": scalars}


def optimizer_state_from_tensors(tensors: dict[str, torch.Tensor], rest: dict[str, Any]) -> dict[str, Any]:
    state: dict[int, dict[str, Any]] = {}
    for full_name, value in tensors.items():
        if not full_name.startswith(OPTIMIZER_PREFIX):
            continue
        param_index, _, name = full_name[len(OPTIMIZER_PREFIX) :].partition(".")
        state.setdefault(int(param_index), {})[name] = value
    for param_index, values in rest.get("scalars", {}).items():
        state.setdefault(int(param_index), {}).update(values)
    return {"state": state, "param_groups": rest["param_groups"]}


def pack_module_checkpoint(
    module_state: dict[str, torch.Tensor], optimizer_state: dict[str, Any] | None, info: dict[str, Any]
) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Module weights as `module.<name>`, optimizer state flattened, `info` (counters) as JSON metadata: the layout of
    a checkpoint file and of an expert's state sent over the network."""
    tensors = {f"module.{name}": t for name, t in module_state.items()}
    metadata = {"info": json.dumps(info)}
    if optimizer_state is not None:
        optim_tensors, optim_rest = optimizer_state_to_tensors(optimizer_state)
        tensors.update(optim_tensors)
        metadata["optimizer"] = json.dumps(optim_rest)
    return tensors, metadata


def unpack_module_checkpoint(
    tensors: dict[str, torch.Tensor], metadata: dict[str, str], source: str
) -> tuple[dict[str, torch.Tensor], dict[str, Any] | None, dict[str, Any]]:
    """The inverse of `pack_module_checkpoint`; CheckpointError names `source` when the metadata is unusable."""
    try:
        info = json.loads(metadata.get("info", "{}"))
        optimizer_rest = json.loads(metadata["optimizer"]) if "optimizer" in metadata else None
        if not isinstance(info, dict) or not (optimizer_rest is None or isinstance(optimizer_rest, dict)):
            raise ValueError("info and optimizer metadata must be JSON objects")
        module_state = {name[len("module.") :]: t for name, t in tensors.items() if name.startswith("module.")}
        optimizer_state = optimizer_state_from_tensors(tensors, optimizer_rest) if optimizer_rest is not None else None
    except (ValueError, KeyError, TypeError, AttributeError) as e:  # JSONDecodeError is a ValueError
        raise CheckpointError(f"{source} has corrupt metadata: {e}") from None
    return module_state, optimizer_state, info


def save_module_checkpoint(
    path: Path,
    module_state: dict[str, torch.Tensor],
    optimizer_state: dict[str, Any] | None,
    info: dict[str, Any],
) -> None:
    tensors, metadata = pack_module_checkpoint(module_state, optimizer_state, info)
    save_tensors_atomic(path, tensors, metadata)


def load_module_checkpoint(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, Any] | None, dict[str, Any]]:
    tensors, metadata = load_tensors(path)
    return unpack_module_checkpoint(tensors, metadata, f"checkpoint {path}")
