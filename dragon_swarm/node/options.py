"""The peer's options: one schema for its flags, the command line derived from it, and where each value comes from.

`PeerFlags` declares every flag once (type, constraints, help text); `build_parser` turns it into a
configargparse parser, so every flag can also come from an environment variable ``DRAGON_<FLAG>`` (e.g.
``DRAGON_MAX_MEMORY=6GiB``, ``DRAGON_INITIAL_PEERS='[/ip4/..., /ip4/...]'``; listed in ``--help``).
`parse_peer_options` then merges, highest first:

    flags  >  DRAGON_* environment variables  >  --profile (peers/*.yaml)  >  the swarm config (-c)  >  defaults

Bad input ends the program with one line: ``dragon_swarm.peer: error: ... (see --help)`` (exit 2) for flags and
profiles, ``dragon_swarm.peer: error: <file>: ...`` for configs. Parsing starts nothing (no DHT, no threads).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Mapping, Sequence

import configargparse
from pydantic import BaseModel, ConfigDict, field_validator, model_validator

from dragon_swarm.config import DEFAULT_CONFIG_NAME, ConfigError, SwarmConfig, load_config
from dragon_swarm.node import flags as flags_cli
from dragon_swarm.node.cli import fail
from dragon_swarm.node.flags import ListenAddress, flag

PROG = "dragon_swarm.peer"
# flags that exclude each other; the first group is required
GROUPS = {"join": ("initial_peers", "new_swarm"), "role": ("no_train", "no_host")}

__all__ = ["PROG", "PeerFlags", "PeerOptions", "build_parser", "default_host_maddrs", "parse_peer_options", "resolve"]


class PeerFlags(BaseModel):
    """What the command line and the environment say, validated; None: not given (the profile or config decides)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    initial_peers: tuple[str, ...] | None = flag(None, "multiaddrs of any peers of the swarm (e.g. a bootstrap)", metavar="MADDR")
    new_swarm: bool = flag(False, "start a fresh swarm on this machine")
    config: str | None = flag(None, f"swarm config: a YAML path or a name in configs/ (default: {DEFAULT_CONFIG_NAME})", short="-c")
    experts: str | None = flag(
        None, "host these experts: comma list of LAYER.INDEX, ffn.LAYER.[a:b] grid patterns, 'all', or 'auto' (the "
        "default: placement takes the least replicated first, up to --max-experts, and follows the swarm: takeover, "
        "rebalancing)")  # fmt: skip
    max_experts: int | None = flag(None, "with placement (no --experts, or --experts auto): host at most this many experts (default: what a quarter of the memory cap holds)", ge=1)
    no_train: bool = flag(False, "only host experts")
    no_host: bool = flag(False, "only train")
    client_mode: bool = flag(
        False, "behind a NAT or firewall that others cannot dial: train without accepting connections (implies "
        "--no-host; averaging and expert calls only go out)")  # fmt: skip
    auto_relay: bool = flag(
        False, "behind a NAT: keep a slot on a relay (by default the bootstraps, which relay for others) so that "
        "peers reach this one through it; slower than a direct connection, but it can host experts and lead rounds")  # fmt: skip
    max_steps: int | None = flag(
        None, "stop once this peer has trained this many micro-batches, counted across restarts (the state dir "
        "keeps the count)", ge=0)  # fmt: skip
    keep_versions: int | None = flag(
        None, "keep the trunk of the last K model versions in <state-dir>/versions for rollback (default: 3; 0: none)", ge=0)
    init_from: Path | None = flag(
        None, "with --new-swarm: start from a model file written by python -m dragon_swarm.export (rollback): its trunk, "
        "experts and model version", metavar="MODEL")  # fmt: skip
    stats_file: Path | None = flag(
        None, "append one JSON object per micro-batch of this peer here (its 'micro_batches' counts across restarts)")
    state_dir: Path | None = flag(None, "identity, checkpoints and counters (default: ./dragon-state/<swarm>)")
    identity: Path | None = flag(None, "private key file; the peer id is stable across restarts")
    swarm_key: Path | None = flag(
        None, "a private swarm's key file (python -m dragon_swarm.keys swarm-key FILE): peers without it can neither "
        "read its DHT, call its experts, download its state nor average with it", metavar="FILE")  # fmt: skip
    name: str | None = flag(None, "public name on the swarm's leaderboard (default: volunteer-<end of peer id>)")
    dashboard: ListenAddress = flag(
        None, "serve a web dashboard with Start/Stop here (e.g. 8080; loopback unless HOST is given)", metavar="[HOST:]PORT")
    # DRAGON_NO_PANEL is read by the panel itself (set at all: no panel), so it is not this flag's env var
    no_panel: bool = flag(False, "plain log lines even in a terminal (also: DRAGON_NO_PANEL set)", env=False)
    profile: str | None = flag(None, "resource profile from peers/*.yaml (e.g. cpu-laptop, gpu-8gb, gpu-24gb) or a YAML path")
    device: str | None = flag(None, "torch device: cpu, cuda, cuda:N or auto (default: cpu)")
    max_memory: str | None = flag(None, "memory cap for training: a fraction (0.5, 50%%) or a size (6GiB, 800MiB)")
    threads: int | None = flag(None, "torch CPU threads", ge=1)
    batch_size: int | Literal["auto"] | None = flag(None, "micro-batch size, or 'auto': the largest that fits --max-memory, measured")
    in_flight: int | None = flag(
        None, "micro-batches computed at once in remote-expert mode, so that one's waits for expert answers overlap "
        "another's compute (training.micro_batches_in_flight; 2-4 over a home link)", ge=1)  # fmt: skip
    host_maddrs: tuple[str, ...] | None = flag(
        None, "listen addresses (default: a free port on all interfaces when joining peers on other machines, "
        "loopback otherwise; e.g. /ip4/0.0.0.0/tcp/31338 for a fixed port)")  # fmt: skip
    announce_maddrs: tuple[str, ...] = flag((), "public addresses others should dial")
    data_dir: Path | None = flag(None, "where corpora live (default: $DRAGON_DATA_DIR, the checkout's data/, or ~/.local/share/dragon_swarm)")
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = flag("INFO", "log level")
    # TEST/BENCHMARK ONLY: makes this trainer Byzantine (see dragon_swarm.attacks); hidden, never from the environment
    attack: str | None = flag(None, "", env=False, hidden=True)
    # TEST/BENCHMARK ONLY: makes this peer's expert path Byzantine (dragon_swarm.attacks.ExpertAttack); hidden too
    expert_attack: str | None = flag(None, "", env=False, hidden=True)

    @field_validator("batch_size", mode="before")
    @classmethod
    def _batch_size(cls, value: Any) -> Any:
        if value is None or value == "auto":
            return value
        try:
            number = int(value)
        except (TypeError, ValueError):
            raise ValueError(f"must be a positive integer or 'auto', got {value!r}") from None
        if number <= 0:
            raise ValueError(f"must be positive, got {number}")
        return number

    @field_validator("max_memory")
    @classmethod
    def _memory_syntax(cls, value: str | None) -> str | None:
        if value is not None:
            from dragon_swarm.resources.memory import parse_memory_limit

            parse_memory_limit(value, 1 << 40)  # syntax only; the real total is read at start
        return value

    @field_validator("name")
    @classmethod
    def _public_name(cls, value: str | None) -> str | None:
        if value is not None and not (1 <= len(value.strip()) <= 40 and value.isprintable()):
            raise ValueError("must be 1-40 printable characters")
        return None if value is None else value.strip()

    @field_validator("attack")
    @classmethod
    def _known_attack(cls, value: str | None) -> str | None:
        if value is not None:
            from dragon_swarm.attacks import parse_attack

            parse_attack(value)
        return value

    @field_validator("expert_attack")
    @classmethod
    def _known_expert_attack(cls, value: str | None) -> str | None:
        if value is not None:
            from dragon_swarm.attacks import parse_expert_attack

            parse_expert_attack(value)
        return value

    @field_validator("data_dir", mode="before")
    @classmethod
    def _empty_is_unset(cls, value: Any) -> Any:
        return None if value == "" else value  # DRAGON_DATA_DIR= (empty) means unset, as for the corpus

    @model_validator(mode="after")
    def _no_contradiction(self) -> "PeerFlags":
        if self.no_host and self.experts:
            raise ValueError("--experts and --no-host contradict each other")
        if self.client_mode and (self.experts or self.no_train):
            raise ValueError("--client-mode only trains: nobody can call experts on a peer that accepts no connections")
        if self.client_mode and self.auto_relay:
            raise ValueError("--auto-relay makes a peer behind a NAT reachable; --client-mode gives that up: pick one")
        if self.init_from is not None and not self.new_swarm:
            raise ValueError("--init-from starts a new swarm: add --new-swarm (joining peers download the swarm's state)")
        return self


@dataclass(frozen=True)
class PeerOptions:
    """Everything the peer runs with, each value resolved from its sources (see the module docstring)."""

    config: SwarmConfig
    config_name: str
    initial_peers: tuple[str, ...]
    train: bool
    host_spec: str | None  # None: choose automatically; "" : host nothing
    max_steps: int | None
    stats_file: Path | None
    state_dir: Path
    identity: Path
    device: str
    batch_size: int
    host_maddrs: tuple[str, ...]
    announce_maddrs: tuple[str, ...]
    data_dir: Path | None
    attack: str | None
    name: str | None = None
    expert_attack: str | None = None  # TEST/BENCHMARK ONLY
    dashboard: tuple[str, int] | None = None
    panel: bool = True
    threads: int | None = None
    max_memory: str | None = None
    batch_size_auto: bool = False
    log_level: str = "INFO"
    max_experts: int | None = None  # with host_spec "auto"
    keep_versions: int = 3
    init_from: Path | None = None  # with --new-swarm: a model file to start from (`node.init_from`)
    client_mode: bool = False  # accept no connections (behind NAT): only trains, dials out
    auto_relay: bool = False  # behind NAT: reachable through a relay
    swarm_key: bytes | None = None  # a private swarm's shared key (`swarm.admission`)


def build_parser() -> configargparse.ArgParser:
    """The peer's command line, derived from `PeerFlags`: one flag per field, env var ``DRAGON_<FIELD>``."""
    return flags_cli.build_parser(
        PeerFlags, PROG, "Join a dragon_swarm swarm: train, host experts, or both.", GROUPS, required=("join",)
    )


def default_host_maddrs(initial_peers: Sequence[str]) -> list[str]:
    """Loopback for a one-machine swarm; all interfaces when any initial peer is elsewhere, since peers on other
    machines must be able to dial back (averaging and expert calls go both ways)."""
    loopback = ("/ip4/127.", "/ip6/::1/", "/dns/localhost/", "/dns4/localhost/")
    if any(not maddr.startswith(loopback) for maddr in initial_peers):
        return ["/ip4/0.0.0.0/tcp/0"]
    return ["/ip4/127.0.0.1/tcp/0"]


def parse_peer_options(argv: Sequence[str] | None = None, env: Mapping[str, str] | None = None) -> PeerOptions:
    """The peer's options from `argv` (default: sys.argv[1:]) and `env` (default: os.environ); on bad input,
    exits with one line (SystemExit 2)."""
    parser = build_parser()
    flags = flags_cli.parse_flags(parser, PeerFlags, argv, env)
    profile = None
    if flags.profile is not None:
        from dragon_swarm.resources.profiles import load_profile

        try:
            profile = load_profile(flags.profile)
        except ValueError as e:
            parser.error(f"--profile: {e}")
    return resolve(flags, profile)


def resolve(flags: PeerFlags, profile=None) -> PeerOptions:
    """Merge validated flags (and env vars) with a resource profile and the swarm config into `PeerOptions`."""

    def pick(name: str, default: Any = None) -> Any:  # the flag, else the profile's value, else the default
        value = getattr(flags, name)
        if value is None and profile is not None:
            value = getattr(profile, name)
        return default if value is None else value

    no_train = flags.no_train or (profile is not None and not profile.train and not flags.no_host)
    no_host = flags.no_host or flags.client_mode or (
        profile is not None and not profile.host_experts and not no_train and not flags.experts
    )
    batch_size = pick("batch_size")
    overrides = {"training.batch_size": batch_size} if isinstance(batch_size, int) else {}
    if flags.in_flight is not None:
        overrides["training.micro_batches_in_flight"] = flags.in_flight
    config = _load_config(flags.config, overrides)
    host_spec = "" if no_host else flags.experts
    if host_spec and host_spec != "auto":
        _check_expert_spec(host_spec, config)
    if flags.max_experts is not None and host_spec not in (None, "auto"):
        fail(PROG, "--max-experts goes with --experts auto (or no --experts): it is placement's budget")
    state_dir = flags.state_dir or Path("dragon-state") / config.swarm.name
    return PeerOptions(
        config=config,
        config_name=flags.config or DEFAULT_CONFIG_NAME,
        initial_peers=tuple(flags.initial_peers or ()),
        train=not no_train,
        host_spec=host_spec,
        max_steps=flags.max_steps,
        stats_file=flags.stats_file,
        state_dir=state_dir,
        identity=flags.identity or state_dir / "identity.key",
        device=pick("device", "cpu"),
        batch_size=config.training.batch_size,
        host_maddrs=tuple(flags.host_maddrs or default_host_maddrs(flags.initial_peers or ())),
        announce_maddrs=tuple(flags.announce_maddrs),
        data_dir=flags.data_dir,
        attack=flags.attack,
        expert_attack=flags.expert_attack,
        name=flags.name,
        dashboard=flags.dashboard,
        panel=not flags.no_panel,
        threads=pick("threads"),
        max_memory=pick("max_memory"),
        batch_size_auto=batch_size == "auto",
        log_level=flags.log_level,
        max_experts=flags.max_experts,
        keep_versions=3 if flags.keep_versions is None else flags.keep_versions,
        init_from=flags.init_from,
        client_mode=flags.client_mode,
        auto_relay=flags.auto_relay,
        swarm_key=swarm_key_from_flag(flags.swarm_key),
    )


def _load_config(name_or_path: str | None, overrides: dict[str, Any]) -> SwarmConfig:
    try:
        return load_config(name_or_path, overrides)
    except ConfigError as e:
        fail(PROG, str(e))


def _check_expert_spec(spec: str, config: SwarmConfig) -> None:
    from dragon_swarm.moe.expert_uids import ExpertSpecError, expand_expert_spec

    try:
        expand_expert_spec(spec, config.expert_prefix, config.model.num_moe_layers, config.model.num_experts)
    except ExpertSpecError as e:
        fail(PROG, f"--experts: {e}")


def swarm_key_from_flag(path: Path | None, prog: str = PROG) -> bytes | None:
    """The key of `--swarm-key FILE` (None without it); a bad file ends the program with one line."""
    if path is None:
        return None
    from dragon_swarm.swarm.admission import read_swarm_key

    try:
        return read_swarm_key(path)
    except ValueError as e:
        fail(prog, f"--swarm-key: {e}")
