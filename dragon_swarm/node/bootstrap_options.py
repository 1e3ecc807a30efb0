"""The bootstrap node's options: flags derived from `BootstrapFlags`, each also read from
``DRAGON_BOOTSTRAP_<FLAG>`` (flags win). Bad input ends with one line, as for the peer (see `.options`)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Literal, Mapping, Sequence

import configargparse
from pydantic import BaseModel, ConfigDict, model_validator

from dragon_swarm.config import ConfigError, SwarmConfig, load_config
from dragon_swarm.node import flags as flags_cli
from dragon_swarm.node.cli import fail
from dragon_swarm.node.flags import ListenAddress, flag
from dragon_swarm.node.options import swarm_key_from_flag

PROG = "dragon_swarm.bootstrap"
ENV_PREFIX = "DRAGON_BOOTSTRAP_"

__all__ = ["BootstrapFlags", "BootstrapOptions", "build_parser", "parse_bootstrap_options"]


class BootstrapFlags(BaseModel):
    """What the bootstrap's command line and environment say, validated."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    host_maddrs: tuple[str, ...] = flag(("/ip4/127.0.0.1/tcp/0",), "listen addresses, e.g. /ip4/0.0.0.0/tcp/31337")
    announce_maddrs: tuple[str, ...] = flag((), "public addresses others should dial")
    identity: Path | None = flag(None, "private key file; same peer id across restarts (created if missing)")
    initial_peers: tuple[str, ...] = flag((), "other bootstrap nodes to link with")
    swarm_key: Path | None = flag(None, "a private swarm's key file: only peers holding it are served", metavar="FILE")
    identity_bits: int = flag(
        0, "refuse peer ids without this many bits of identity work (the swarm config's swarm.identity_bits); this "
        "node's own identity gets the work too", ge=0, le=32)  # fmt: skip
    monitor: bool = flag(False, "also watch the swarm of -c CONFIG: read-only dashboard and /metrics")
    config: str | None = flag(None, "the swarm's config (YAML path or name in configs/), needed by --monitor", short="-c")
    dashboard: ListenAddress = flag(
        None, "where --monitor serves its dashboard (default: a free loopback port)", metavar="[HOST:]PORT")
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = flag("INFO", "log level")

    @model_validator(mode="after")
    def _monitor_options(self) -> "BootstrapFlags":
        if (self.dashboard is not None or self.config is not None) and not self.monitor:
            raise ValueError("--dashboard and -c go with --monitor")
        return self


@dataclass(frozen=True)
class BootstrapOptions:
    host_maddrs: tuple[str, ...]
    announce_maddrs: tuple[str, ...]
    identity: Path | None
    initial_peers: tuple[str, ...]
    config: SwarmConfig | None  # set with --monitor
    dashboard: tuple[str, int] | None  # set with --monitor
    log_level: str = "INFO"
    swarm_key: bytes | None = None
    identity_bits: int = 0


def build_parser() -> configargparse.ArgParser:
    return flags_cli.build_parser(BootstrapFlags, PROG, "Run a fixed bootstrap node of a dragon_swarm swarm.", env_prefix=ENV_PREFIX)


def parse_bootstrap_options(argv: Sequence[str] | None = None, env: Mapping[str, str] | None = None) -> BootstrapOptions:
    """The bootstrap's options; on bad input, exits with one line (SystemExit 2)."""
    flags = flags_cli.parse_flags(build_parser(), BootstrapFlags, argv, env)
    config = dashboard = None
    if flags.monitor:
        try:
            config = load_config(flags.config)
        except ConfigError as e:
            fail(PROG, str(e))
        dashboard = flags.dashboard or ("127.0.0.1", 0)
    return BootstrapOptions(
        host_maddrs=flags.host_maddrs,
        announce_maddrs=flags.announce_maddrs,
        identity=flags.identity,
        initial_peers=flags.initial_peers,
        config=config,
        dashboard=dashboard,
        log_level=flags.log_level,
        swarm_key=swarm_key_from_flag(flags.swarm_key, PROG),
        identity_bits=flags.identity_bits,
    )

