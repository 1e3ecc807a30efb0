"""Start a hivemind DHT node with a stable identity and print the line others join with."""

from __future__ import annotations

import logging
import multiprocessing as mp
from pathlib import Path
from typing import Sequence

import hivemind
from hivemind.dht.crypto import RSASignatureValidator

logger = logging.getLogger(__name__)

LOOPBACK_MADDR = "/ip4/127.0.0.1/tcp/0"


def use_fork_start_method() -> None:
    """hivemind's background processes (DHT, connection handlers) share pipes created before start: needs fork."""
    if mp.get_start_method(allow_none=True) != "fork":
        mp.set_start_method("fork", force=True)


def start_dht(
    *,
    initial_peers: Sequence[str] = (),
    host_maddrs: Sequence[str] = (LOOPBACK_MADDR,),
    announce_maddrs: Sequence[str] = (),
    identity_path: Path | None = None,
    client_mode: bool = False,
) -> hivemind.DHT:
    """Start a DHT node. With identity_path the peer id is the same across restarts (the key is created once)."""
    use_fork_start_method()
    if identity_path is not None:
        identity_path.parent.mkdir(parents=True, exist_ok=True)
    dht = hivemind.DHT(
        initial_peers=list(initial_peers),
        host_maddrs=list(host_maddrs),
        announce_maddrs=list(announce_maddrs) or None,
        identity_path=str(identity_path) if identity_path is not None else None,
        client_mode=client_mode,
        record_validators=[RSASignatureValidator()],
        start=True,
    )
    return dht


def visible_maddrs(dht: hivemind.DHT) -> list[str]:
    return [str(addr) for addr in dht.get_visible_maddrs()]


def initial_peers_line(dht: hivemind.DHT) -> str:
    """The exact flag another peer passes to join through this node."""
    return "--initial-peers " + " ".join(visible_maddrs(dht))
