"""Swarm-wide configuration: typed sections built from one YAML file plus overrides.

Every peer of one swarm loads the same YAML. The parts that must agree across peers (model shape, data,
optimizer, averaging, expert timeouts) are hashed into the swarm's DHT prefix, so peers started with
incompatible configs never mix. Peer-local knobs (micro-batch size) are excluded from the hash.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

import yaml

from dragon_swarm.model.config import ModelConfig

REPO_ROOT = Path(__file__).resolve().parent.parent
CONFIG_DIR = REPO_ROOT / "configs"
DEFAULT_CONFIG_NAME = "dragon-tiny"


class ConfigError(ValueError):
    """A config that cannot be used; the message is one line meant for the user."""


@dataclass(frozen=True)
class SwarmSection:
    name: str = "dragon"
    seed: int = 0


@dataclass(frozen=True)
class DataSection:
    source: str = "shakespeare"
    tokenizer: str = "dragon-bpe-8k"
    val_fraction: float = 0.02


@dataclass(frozen=True)
class TrainingSection:
    batch_size: int = 16  # per-peer micro-batch; not part of the swarm hash
    target_batch_size: int = 64  # samples the whole swarm accumulates per global optimizer step
    lr: float = 3e-3
    weight_decay: float = 0.01
    betas: tuple[float, float] = (0.9, 0.95)
    warmup_steps: int = 20
    clip_grad_norm: float = 1.0
    # each trainer sends m <- b*m + (1-b)*g instead of its raw gradient g (Karimireddy, He, Jaggi 2021): honest
    # vectors get b-times less noisy, so colluders can no longer hide inside the honest spread (ipm, -g attacks)
    worker_momentum: float = 0.0
    expert_lr: float = 1e-3
    expert_clip_grad_norm: float = 1.0


@dataclass(frozen=True)
class AveragingSection:
    matchmaking_time: float = 3.0
    averaging_timeout: float = 30.0
    load_state_timeout: float = 120.0
    compression: str = "none"
    aggregator: str = "centered_clip"  # per-partition reducer: mean | median | trimmed_mean | centered_clip
    tau: float = 1.0  # centered_clip's radius, in units of each part's median distance to the median (scale-free)
    trim_ratio: float = 0.2  # trimmed_mean drops this fraction at each end


@dataclass(frozen=True)
class ExpertsSection:
    forward_timeout: float = 10.0
    backward_timeout: float = 10.0
    update_period: float = 5.0  # how often hosts re-announce their experts, seconds
    expiration: float = 20.0  # announcements vanish this long after a host stops refreshing them
    max_batch_size: int = 16384  # tokens per expert request; larger requests are rejected


@dataclass(frozen=True)
class SwarmConfig:
    swarm: SwarmSection = field(default_factory=SwarmSection)
    model: ModelConfig = None  # type: ignore[assignment]  # always set by from_dict
    data: DataSection = field(default_factory=DataSection)
    training: TrainingSection = field(default_factory=TrainingSection)
    averaging: AveragingSection = field(default_factory=AveragingSection)
    experts: ExpertsSection = field(default_factory=ExpertsSection)

    # keys that each peer may choose for itself; everything else must match swarm-wide
    PEER_LOCAL_KEYS = (("training", "batch_size"),)

    @classmethod
    def from_dict(cls, raw: Mapping[str, Any]) -> "SwarmConfig":
        if not isinstance(raw, Mapping):
            raise ConfigError("config must be a mapping of sections (swarm, model, data, training, ...)")
        sections = {f.name: f for f in dataclasses.fields(cls)}
        unknown = sorted(set(raw) - set(sections))
        if unknown:
            raise ConfigError(f"unknown config section(s): {', '.join(unknown)}; known: {', '.join(sections)}")
        if "model" not in raw:
            raise ConfigError("config has no 'model' section")
        built: dict[str, Any] = {}
        for name, value in raw.items():
            if not isinstance(value, Mapping):
                raise ConfigError(f"config section '{name}' must be a mapping, got {type(value).__name__}")
            if name == "model":
                try:
                    built[name] = ModelConfig.from_dict(dict(value))
                except (ValueError, TypeError) as e:
                    raise ConfigError(f"model: {e}") from None
            else:
                section_cls = {
                    "swarm": SwarmSection,
                    "data": DataSection,
                    "training": TrainingSection,
                    "averaging": AveragingSection,
                    "experts": ExpertsSection,
                }[name]
                built[name] = _build_section(name, section_cls, value)
        config = cls(**built)
        config.validate()
        return config

    def validate(self) -> None:
        t, a, e = self.training, self.averaging, self.experts
        checks = [
            (t.batch_size > 0, "training.batch_size must be positive"),
            (t.target_batch_size >= t.batch_size, "training.target_batch_size must be >= training.batch_size"),
            (t.lr > 0, "training.lr must be positive"),
            (0 <= t.worker_momentum < 1, "training.worker_momentum must be in [0, 1)"),
            (a.matchmaking_time > 0, "averaging.matchmaking_time must be positive"),
            (a.compression in ("none", "fp16", "blockwise8bit"), "averaging.compression must be none|fp16|blockwise8bit"),
            (
                a.aggregator in ("mean", "median", "trimmed_mean", "centered_clip"),
                "averaging.aggregator must be mean|median|trimmed_mean|centered_clip",
            ),
            (a.tau > 0, "averaging.tau must be positive"),
            (0 <= a.trim_ratio < 0.5, "averaging.trim_ratio must be in [0, 0.5)"),
            (e.forward_timeout > 0 and e.backward_timeout > 0, "experts timeouts must be positive"),
            (e.expiration > e.update_period, "experts.expiration must exceed experts.update_period"),
            (0 < self.data.val_fraction < 0.5, "data.val_fraction must be in (0, 0.5)"),
            (_valid_swarm_name(self.swarm.name), "swarm.name may contain only letters, digits, '-' and '_'"),
        ]
        for ok, message in checks:
            if not ok:
                raise ConfigError(message)

    def to_dict(self) -> dict[str, Any]:
        return {
            f.name: (getattr(self, f.name).to_dict() if f.name == "model" else dataclasses.asdict(getattr(self, f.name)))
            for f in dataclasses.fields(self)
        }

    def swarm_hash(self) -> str:
        """Hash of everything peers must agree on (8 hex chars)."""
        shared = self.to_dict()
        for section, key in self.PEER_LOCAL_KEYS:
            shared[section].pop(key, None)
        blob = json.dumps(shared, sort_keys=True, default=list).encode()
        return hashlib.sha256(blob).hexdigest()[:8]

    @property
    def run_prefix(self) -> str:
        """DHT prefix of this swarm: incompatible configs get different prefixes and never mix."""
        return f"{self.swarm.name}-{self.swarm_hash()}"

    @property
    def expert_prefix(self) -> str:
        # hivemind expert uids may not contain '.' before the grid coordinates
        return f"{self.run_prefix}_ffn"

    def replace(self, **sections: Any) -> "SwarmConfig":
        return dataclasses.replace(self, **sections)


def _valid_swarm_name(name: str) -> bool:
    return bool(name) and all(c.isalnum() or c in "-_" for c in name)


def _build_section(name: str, section_cls: type, values: Mapping[str, Any]) -> Any:
    fields = {f.name: f for f in dataclasses.fields(section_cls)}
    unknown = sorted(set(values) - set(fields))
    if unknown:
        raise ConfigError(f"unknown key(s) in '{name}': {', '.join(unknown)}; known: {', '.join(fields)}")
    defaults = section_cls()
    kwargs = {}
    for key, value in values.items():
        expected = type(getattr(defaults, key))
        kwargs[key] = _coerce(f"{name}.{key}", value, expected)
    return section_cls(**kwargs)


def _coerce(path: str, value: Any, expected: type) -> Any:
    if expected is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{path} must be true or false, got {value!r}")
        return value
    if expected is float and isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    if expected is tuple and isinstance(value, (list, tuple)):
        return tuple(float(v) for v in value)
    if expected is int and isinstance(value, int) and not isinstance(value, bool):
        return value
    if expected is str and isinstance(value, str):
        return value
    raise ConfigError(f"{path} must be {expected.__name__}, got {value!r}")


def resolve_config_path(name_or_path: str | None) -> Path:
    """A config is a YAML path or the name of one in configs/ (e.g. 'dragon-tiny')."""
    if name_or_path is None:
        name_or_path = DEFAULT_CONFIG_NAME
    path = Path(name_or_path)
    if path.suffix in (".yaml", ".yml") or path.exists():
        if not path.is_file():
            raise ConfigError(f"config file not found: {path}")
        return path
    candidate = CONFIG_DIR / f"{name_or_path}.yaml"
    if not candidate.is_file():
        known = ", ".join(sorted(p.stem for p in CONFIG_DIR.glob("*.yaml")))
        raise ConfigError(f"no config named '{name_or_path}' (known: {known}) and no such file")
    return candidate


def load_config(name_or_path: str | None = None, overrides: Mapping[str, Any] | None = None) -> SwarmConfig:
    """Load YAML, apply dotted overrides such as {'training.batch_size': 8}, validate."""
    path = resolve_config_path(name_or_path)
    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark is not None else ""
        raise ConfigError(f"{path}: not valid YAML{where}") from None
    if raw is None:
        raise ConfigError(f"{path}: config is empty")
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: config must be a mapping of sections")
    for dotted, value in (overrides or {}).items():
        section, _, key = dotted.partition(".")
        raw.setdefault(section, {})
        if not isinstance(raw[section], dict):
            raise ConfigError(f"{path}: section '{section}' must be a mapping")
        raw[section][key] = value
    try:
        return SwarmConfig.from_dict(raw)
    except ConfigError as e:
        raise ConfigError(f"{path}: {e}") from None
