"""Peers of one swarm name publish the hash of their config, so a peer with a different config is told at once
instead of silently training alone under another DHT prefix."""

from __future__ import annotations

import hivemind
from hivemind.utils import get_dht_time

from dragon_swarm.background import PeriodicThread
from dragon_swarm.config import SwarmConfig

ANNOUNCE_SECONDS = 60.0


def configs_key(swarm_name: str) -> str:
    return f"dragon_swarm.{swarm_name}.configs"


def announce_config(dht: hivemind.DHT, config: SwarmConfig) -> None:
    dht.store(
        configs_key(config.swarm.name),
        subkey=config.swarm_hash(),
        value=config.run_prefix,
        expiration_time=get_dht_time() + ANNOUNCE_SECONDS,
    )


def other_config_hashes(dht: hivemind.DHT, config: SwarmConfig) -> list[str]:
    """Hashes other live peers of this swarm name use, if none of them uses ours."""
    found = dht.get(configs_key(config.swarm.name), latest=True)
    if found is None or not isinstance(found.value, dict):
        return []
    hashes = sorted(str(h) for h in found.value if isinstance(h, str))
    return [] if config.swarm_hash() in hashes or not hashes else hashes


def mismatch_message(config: SwarmConfig, others: list[str], config_path: str) -> str:
    return (
        f"config mismatch: swarm '{config.swarm.name}' runs config {', '.join(others)}, yours ({config_path}) is "
        f"{config.swarm_hash()}; start with the swarm's config file (every peer of one swarm shares one)"
    )


class ConfigAnnouncer(PeriodicThread):
    """Keeps this peer's config hash announced (every third of its lifetime), so newcomers with another config
    are told at once."""

    def __init__(self, dht: hivemind.DHT, config: SwarmConfig):
        super().__init__("config-announcer", ANNOUNCE_SECONDS / 3, first_tick_now=True)
        self.dht, self.config = dht, config

    def tick(self) -> None:
        if self.dht.is_alive():
            announce_config(self.dht, self.config)
