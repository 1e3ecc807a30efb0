"""Swarm-wide configuration: one strict schema per YAML section, built from one file plus overrides.

Every peer of one swarm loads the same YAML. The parts that must agree across peers (model shape, data,
optimizer, averaging and its ban policy, expert timeouts) are hashed into the swarm's DHT prefix, so peers
started with incompatible configs never mix. Peer-local knobs (micro-batch size) are excluded from the hash.

Each section is a frozen pydantic model (`dragon_swarm.schema.Schema`): unknown keys are errors, `true` is not an
int, `'3'` is not a number, ints given for floats are stored as floats (so `lr: 1` and `lr: 1.0` hash alike).
A config that cannot be used raises `ConfigError`, one line naming the file and the key path:

    configs/mine.yaml: training.lr must be a number, got 'fast'
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Annotated, Any, ClassVar, Literal, Mapping

from pydantic import Field, ValidationError, field_validator, model_validator

from dragon_swarm import paths
from dragon_swarm.model.config import ModelConfig
from dragon_swarm.schema import Schema, interval, load_yaml_mapping, one_line

DEFAULT_CONFIG_NAME = "dragon-tiny"

Positive = Annotated[float, Field(gt=0)]
PositiveInt = Annotated[int, Field(gt=0)]


class ConfigError(ValueError):
    """A config that cannot be used; the message is one line meant for the user."""


class SwarmSection(Schema):
    name: str = "dragon"  # letters, digits, '-' and '_': it starts the swarm's DHT prefix
    seed: int = 0
    # Sybil cost: a peer id must carry this many bits of memory-hard work (about 2**bits x 10 ms of one CPU core,
    # once per identity; dragon_swarm.swarm.identity_work); peers refuse every request from ids without it. 0: off
    identity_bits: Annotated[int, Field(ge=0, le=32)] = 0

    @field_validator("name")
    @classmethod
    def _valid_name(cls, name: str) -> str:
        if not (name and all(c.isalnum() or c in "-_" for c in name)):
            raise ValueError(f"must contain only letters, digits, '-' and '_', got {name!r}")
        return name


class DataSection(Schema):
    source: str = "shakespeare"
    tokenizer: str = "dragon-bpe-8k"
    val_fraction: Annotated[float, interval(0.0, 0.5, "()")] = 0.02


class TrainingSection(Schema):
    batch_size: PositiveInt = 16  # per-peer micro-batch; not part of the swarm hash
    target_batch_size: int = 64  # samples the whole swarm accumulates per global optimizer step
    lr: Positive = 3e-3
    weight_decay: float = 0.01
    betas: tuple[float, float] = Field((0.9, 0.95), strict=False)  # a YAML list; items stay strict numbers
    warmup_steps: int = 20
    clip_grad_norm: float = 1.0
    # each trainer sends m <- b*m + (1-b)*g instead of its raw gradient g (Karimireddy, He, Jaggi 2021): honest
    # vectors get b-times less noisy, so colluders can no longer hide inside the honest spread (ipm, -g attacks)
    worker_momentum: Annotated[float, interval(0.0, 1.0, "[)")] = 0.0
    expert_lr: float = 1e-3
    expert_clip_grad_norm: float = 1.0
    # held-out loss every eval_every model versions (0: never) on eval_batches fixed batches of 8 validation sequences
    eval_every: Annotated[int, Field(ge=0)] = 10
    eval_batches: PositiveInt = 4
    # remote_experts: experts are called over the network at every MoE layer (hivemind.Optimizer on the trunk);
    # local_experts: a trainer trains the trunk and the experts it holds locally and, every sync_every micro-batches,
    # makes an outer step (DiLoCo): the trunk's pseudo-gradient robustly all-reduced, Nesterov SGD with outer_lr and
    # outer_momentum; the experts it holds are merged with their other holders (replica sync)
    mode: Literal["remote_experts", "local_experts"] = "remote_experts"
    sync_every: PositiveInt = 50
    outer_lr: Positive = 0.7
    outer_momentum: Annotated[float, interval(0.0, 1.0, "[)")] = 0.9
    # local_experts: rounds over which the outer step ramps linearly from plain averaging (lr 1, momentum 0) to
    # outer_lr and outer_momentum; full Nesterov on the first, large pseudo-gradients overshoots (0: no ramp)
    outer_warmup_rounds: Annotated[int, Field(ge=0)] = 0
    # local_experts: the codec of the pseudo-gradient in the outer all-reduce (8-bit blockwise: ~1 byte per value;
    # every trainer ends the round with the same bytes, so the trunks stay bit-identical whatever the codec)
    outer_compression: str = "blockwise8bit"
    # local_experts: a round's all-reduce and expert merge run in the background while the next round trains, and
    # apply at the next boundary (one round late); the trainer goes on from the new start plus its own progress made
    # meanwhile, so the round starts stay bit-identical across trainers. Off: training waits for every round.
    outer_overlap: bool = False
    # remote_experts: micro-batches computed at once, so that one's waits for expert answers overlap another's
    # compute (`training.pipeline`); 1 on one machine (nothing to wait for), 2-4 over a home link. Peer-local.
    micro_batches_in_flight: PositiveInt = 1

    @model_validator(mode="after")
    def _target_holds_a_batch(self) -> "TrainingSection":
        if self.target_batch_size < self.batch_size:
            raise ValueError(f"target_batch_size ({self.target_batch_size}) must be >= batch_size ({self.batch_size})")
        if self.mode == "local_experts" and self.micro_batches_in_flight > 1:
            raise ValueError(
                f"micro_batches_in_flight ({self.micro_batches_in_flight}) is for remote_experts mode: a local_experts "
                "trainer calls no expert over the network, it has no waits to overlap"
            )
        return self

    @field_validator("outer_compression")
    @classmethod
    def _known_outer_codec(cls, name: str) -> str:
        return _known_codec_name(name)


class AveragingSection(Schema):
    """How trainers average and whom they ban (`RobustAveragingSettings.from_config` turns this into the
    averagers' settings; the ban policy is explained in `dragon_swarm.averaging.reputation`)."""

    matchmaking_time: Positive = 3.0
    averaging_timeout: float = 30.0
    load_state_timeout: float = 120.0
    compression: str = "none"  # a codec of dragon_swarm.averaging.compression.CODECS
    aggregator: str = "centered_clip"  # per-partition reducer of dragon_swarm.averaging.aggregators.AGGREGATORS
    tau: Positive = 1.0  # centered_clip's radius; with relative_tau, in units of each part's median distance
    relative_tau: bool = True  # read tau as a multiple of the median distance (scale-free), not in gradient units
    trim_ratio: Annotated[float, interval(0.0, 0.5, "[)")] = 0.2  # trimmed_mean drops this fraction at each end
    # ban policy: a sender ban_distance_ratio times farther from the robust result than this peer (over a whole
    # round's partition) for ban_rounds rounds in a row, or with ban_strikes impossible weight claims, is banned
    # for ban_seconds; one malformed part (NaN/Inf, wrong size) bans at once
    ban_distance_ratio: Positive = 5.0
    ban_rounds: PositiveInt = 3
    ban_strikes: PositiveInt = 2
    ban_seconds: Annotated[float, Field(ge=0)] = 300.0
    # a peer banned again after its ban ran out serves twice the last ban, up to this; clean for this long, it starts
    # over at ban_seconds
    max_ban_seconds: Annotated[float, Field(ge=0)] = 86400.0
    # a sender claiming more than this many times training.target_batch_size samples in one round is lying (an
    # honest peer holds the target plus a few micro-batches of overshoot); null turns the check off
    weight_claim_factor: Positive | None = 4.0
    # every all-reduce part is signed by its sender's identity key; a signed NaN/Inf part is published as proof that
    # bans its sender on every trainer (dragon_swarm.averaging.accusations)
    signed_parts: bool = True

    @model_validator(mode="after")
    def _longest_ban_holds_the_first(self) -> "AveragingSection":
        if self.max_ban_seconds < self.ban_seconds:
            raise ValueError(f"max_ban_seconds ({self.max_ban_seconds:g}) must be >= ban_seconds ({self.ban_seconds:g})")
        return self

    @field_validator("compression")
    @classmethod
    def _known_codec(cls, name: str) -> str:
        return _known_codec_name(name)

    @field_validator("aggregator")
    @classmethod
    def _known_aggregator(cls, name: str) -> str:
        from dragon_swarm.averaging.aggregators import AGGREGATORS

        return _registered(name, AGGREGATORS)


class VerificationSection(Schema):
    """Verification by recomputation (`dragon_swarm.verification`): each round, trainers drawn at random recompute
    other trainers' sent gradients from their committed inputs; a liar is published with evidence and banned by every
    peer that confirms it (for averaging.ban_seconds). Costs each checker about one sender's round of training per check (remote-expert mode)."""

    enabled: bool = False
    checks_per_round: PositiveInt = 1  # senders checked per round, each by one other trainer
    tolerance: Positive = 1e-2  # relative L2 distance between sent and recomputed vectors an honest sender stays under
    keep_versions: PositiveInt = 3  # trunk versions a trainer keeps to check rounds (and evidence) with
    trunk_tolerance: Positive = 1e-2  # a round is recomputed only if the sender's weights are this close to the checker's
    max_strikes: PositiveInt = 3  # rounds in a row a trainer averaged without a commitment or withheld its record: ban


def _known_codec_name(name: str) -> str:
    """`name` if it is a codec of `averaging.compression.CODECS` (imported late: that module imports hivemind)."""
    from dragon_swarm.averaging.compression import CODECS

    return _registered(name, CODECS)


def _registered(name: str, registry: Mapping[str, Any]) -> str:
    if name not in registry:
        raise ValueError(f"must be one of {', '.join(registry)}, got {name!r}")
    return name


class ExpertsSection(Schema):
    forward_timeout: Positive = 10.0
    backward_timeout: Positive = 10.0
    update_period: float = 5.0  # how often hosts re-announce their experts, seconds
    expiration: float = 20.0  # announcements vanish this long after a host stops refreshing them
    max_batch_size: int = 16384  # tokens per expert request; larger requests are rejected
    checkpoint_period: Positive = 60.0  # hosts save their experts this often, seconds
    placement_period: Positive = 10.0  # hosts re-check placement (takeover, rebalancing, standby copies), jittered
    sync_period: Positive = 60.0  # replicas of one expert average their state this often, jittered
    rebalance_margin: float = Field(1.15, gt=1.0)  # move only if the swarm's balance improves by this factor
    # an expert output this many times the input's RMS is refused as Byzantine; honest experts measured up to ~90x
    # (dragon-tiny, 300 steps) and ~17x (swarm-test, 200 steps): a gross bound, subtler lies are for cross-checks
    max_output_ratio: Positive = 1000.0
    cross_check_fraction: float = Field(0.05, ge=0.0, le=1.0)  # expert calls a trainer repeats on a second replica
    # relative output difference above which two replicas disagree: honest replicas drifting between syncs were
    # measured up to 0.94 apart; a sign flip is ~2, random outputs of honest size ~1.4 (scale lies: a norm check)
    cross_check_tolerance: Positive = 1.2
    max_requests_per_s: Positive = 200.0  # expert requests one peer may send one host per second
    # expert activations and gradients on the wire: float16 (scaled per tensor, half the bytes) or float32
    wire_dtype: Literal["float16", "float32"] = "float16"

    @model_validator(mode="after")
    def _expire_after_refresh(self) -> "ExpertsSection":
        if not self.expiration > self.update_period:
            raise ValueError(f"expiration ({self.expiration:g}) must exceed update_period ({self.update_period:g})")
        return self


class SwarmConfig(Schema):
    swarm: SwarmSection = SwarmSection()
    model: ModelConfig
    data: DataSection = DataSection()
    training: TrainingSection = TrainingSection()
    averaging: AveragingSection = AveragingSection()
    experts: ExpertsSection = ExpertsSection()
    verification: VerificationSection = VerificationSection()

    # keys that each peer may choose for itself; everything else must match swarm-wide
    PEER_LOCAL_KEYS: ClassVar[tuple[tuple[str, str], ...]] = (
        ("training", "batch_size"),
        ("training", "micro_batches_in_flight"),
        ("training", "outer_overlap"),  # the round starts follow the same arithmetic either way
    )

    @classmethod
    def from_dict(cls, raw: Mapping[str, Any]) -> "SwarmConfig":
        """Validate a mapping of sections; ConfigError (one line) for anything unusable."""
        if not isinstance(raw, Mapping):
            raise ConfigError(f"config must be a mapping of sections ({', '.join(cls.model_fields)})")
        if "model" not in raw:
            raise ConfigError("config has no 'model' section")
        unknown = sorted(map(str, set(raw) - set(cls.model_fields)))
        if unknown:
            raise ConfigError(f"unknown config section(s): {', '.join(unknown)}; known: {', '.join(cls.model_fields)}")
        try:
            return cls.model_validate(dict(raw))
        except ValidationError as e:
            raise ConfigError(one_line(e, cls)) from None

    def to_dict(self) -> dict[str, Any]:
        return self.model_dump()

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
        """A validated copy with whole sections replaced (section objects or plain mappings)."""
        current = {name: getattr(self, name) for name in type(self).model_fields}
        try:
            return type(self).model_validate({**current, **sections})
        except ValidationError as e:
            raise ConfigError(one_line(e, type(self))) from None


def resolve_config_path(name_or_path: str | None) -> Path:
    """A config is a YAML path or the name of one shipped in configs/ (e.g. 'dragon-tiny')."""
    try:
        return paths.resolve_name_or_path(name_or_path or DEFAULT_CONFIG_NAME, paths.config_dir(), "config")
    except ValueError as e:
        raise ConfigError(str(e)) from None


def load_config(name_or_path: str | None = None, overrides: Mapping[str, Any] | None = None) -> SwarmConfig:
    """Load YAML, apply dotted overrides such as {'training.batch_size': 8}, validate."""
    path = resolve_config_path(name_or_path)
    try:
        raw = load_yaml_mapping(path, "config")
    except ValueError as e:
        raise ConfigError(str(e)) from None
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
