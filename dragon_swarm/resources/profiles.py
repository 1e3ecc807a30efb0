"""Resource profiles: what one kind of machine offers the swarm, shipped as ``peers/*.yaml``.

A profile names a device, a memory cap, threads and a micro-batch size (or 'auto'), and whether the machine
trains and hosts experts. The peer's options take a profile's values below its own flags (see
`dragon_swarm.node.options`). Unknown keys and wrong types are errors, one line naming the file.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Literal

from pydantic import Field, ValidationError, field_validator

from dragon_swarm import paths
from dragon_swarm.resources.memory import parse_memory_limit
from dragon_swarm.schema import Schema, load_yaml_mapping, one_line

__all__ = ["ResourceProfile", "available_profiles", "load_profile"]


class ResourceProfile(Schema):
    """What one kind of machine offers the swarm; loaded from peers/<name>.yaml. Unknown keys are errors."""

    description: str = Field(min_length=1)
    device: str = "auto"  # cpu | cuda | cuda:N | auto (cuda when a GPU is visible)
    max_memory: str | None = None  # see parse_memory_limit; None: no cap, the configured batch size
    threads: int | None = Field(default=None, ge=1)  # torch intra-op threads; None: torch's default
    batch_size: int | Literal["auto"] | None = None  # None: the swarm config's training.batch_size
    host_experts: bool = True  # host the experts placement chooses
    train: bool = True  # train the trunk; false: an expert host only

    @field_validator("device")
    @classmethod
    def _known_device(cls, value: str) -> str:
        if not re.fullmatch(r"cpu|auto|cuda(:\d+)?", value):
            raise ValueError(f"must be cpu, cuda, cuda:N or auto, got {value!r}")
        return value

    @field_validator("max_memory", mode="before")
    @classmethod
    def _memory_spelling(cls, value: object) -> object:
        # YAML reads `max_memory: 0.5` as a float; accept it as the fraction it plainly is
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            value = str(value)
        if isinstance(value, str):
            parse_memory_limit(value, total_bytes=2**40)  # syntax check only; the real total is the device's
        return value

    @field_validator("batch_size", mode="before")
    @classmethod
    def _positive_batch(cls, value: object) -> object:
        if value is None or value == "auto":
            return value
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"must be >= 1 or 'auto', got {value!r}")
        return value


def available_profiles() -> list[str]:
    """Names of the shipped profiles (stems of peers/*.yaml), sorted."""
    return paths.shipped_names(paths.profile_dir())


def load_profile(name_or_path: str) -> ResourceProfile:
    """Load a profile by name ('cpu-laptop' -> the shipped peers/cpu-laptop.yaml) or from a YAML path.

    Raises ValueError (one line naming the file) for unknown names, missing files, invalid YAML,
    unknown keys and invalid values.
    """
    path: Path = paths.resolve_name_or_path(name_or_path, paths.profile_dir(), "peer profile")
    raw = load_yaml_mapping(path, "peer profile")
    try:
        return ResourceProfile.model_validate(raw)
    except ValidationError as e:
        raise ValueError(f"{path}: {one_line(e, ResourceProfile)}") from None
