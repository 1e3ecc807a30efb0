"""Start a hivemind DHT node with a stable identity and print the line others join with."""

from __future__ import annotations

import logging
import multiprocessing as mp
from functools import partial
from pathlib import Path
from typing import Sequence

import hivemind
from hivemind.dht.crypto import RSASignatureValidator

from dragon_swarm.swarm.admission import AdmissionPolicy, check_peers, install, peer_ids_of, register_daemon

logger = logging.getLogger(__name__)

LOOPBACK_MADDR = "/ip4/127.0.0.1/tcp/0"


def use_fork_start_method() -> None:
    """hivemind's background processes (DHT, connection handlers) share pipes created before start: needs fork."""
    if mp.get_start_method(allow_none=True) != "fork":
        mp.set_start_method("fork", force=True)


# hivemind gives the p2p daemon 15 s to come up; a loaded machine (CI, 2 cores, a swarm stopping) took longer
P2PD_STARTUP_TIMEOUT_S = 60.0


def start_dht(
    *,
    initial_peers: Sequence[str] = (),
    host_maddrs: Sequence[str] = (LOOPBACK_MADDR,),
    announce_maddrs: Sequence[str] = (),
    identity_path: Path | None = None,
    client_mode: bool = False,
    admission: AdmissionPolicy | None = None,
    auto_relay: bool = False,
) -> hivemind.DHT:
    """Start a DHT node. With identity_path the peer id is the same across restarts (the key is created once).
    With `admission`, every RPC this peer serves (from this and forked processes) goes through the admission gate
    (`swarm.admission`), and the initial peers are checked against it (one warning line each that fails)."""
    use_fork_start_method()
    if identity_path is not None:
        identity_path.parent.mkdir(parents=True, exist_ok=True)
    extra = {}
    if admission is not None:
        install()
        extra["admission"] = admission
    dht = hivemind.DHT(
        initial_peers=list(initial_peers),
        host_maddrs=list(host_maddrs),
        announce_maddrs=list(announce_maddrs) or None,
        identity_path=str(identity_path) if identity_path is not None else None,
        client_mode=client_mode,
        use_auto_relay=auto_relay,
        record_validators=[RSASignatureValidator()],
        startup_timeout=P2PD_STARTUP_TIMEOUT_S,
        start=True,
        **extra,
    )
    from dragon_swarm.swarm.reachability import serve_in_dht

    dht.run_coroutine(serve_in_dht)  # answer other peers' "can you dial me?" (swarm.reachability)
    if admission is not None:
        register_daemon(dht.run_coroutine(_daemon_listen_maddr), admission)
        if admission.challenges:
            _warn_about_initial_peers(dht, admission, initial_peers)
    return dht


async def _daemon_listen_maddr(_dht: hivemind.DHT, node) -> str:
    return str(node.p2p.daemon_listen_maddr)


async def _check_peers(peer_ids: list[str], policy: AdmissionPolicy, _dht: hivemind.DHT, node) -> dict[str, str]:
    return await check_peers(node.p2p, policy, peer_ids)


def _warn_about_initial_peers(dht: hivemind.DHT, admission: AdmissionPolicy, initial_peers: Sequence[str]) -> None:
    peers = peer_ids_of(initial_peers)
    if not peers:
        return
    problems = dht.run_coroutine(partial(_check_peers, peers, admission))
    for peer, why in problems.items():
        logger.warning(
            f"Initial peer {peer[-12:]} would not be admitted by this swarm's peers ({why}): start it with the same "
            f"--swarm-key and --identity-bits {admission.identity_bits}, or the swarm splits around it"
        )


def visible_maddrs(dht: hivemind.DHT) -> list[str]:
    return [str(addr) for addr in dht.get_visible_maddrs()]


def initial_peers_line(dht: hivemind.DHT) -> str:
    """The exact flag another peer passes to join through this node."""
    return "--initial-peers " + " ".join(visible_maddrs(dht))


def join_error(error: BaseException) -> str:
    """One line for a DHT that could not start; a refused bootstrap looks like an unreachable one, so say both."""
    first = str(error).splitlines()[0] if str(error) else type(error).__name__
    if "none of the initial_peers responded" in first:
        return (
            "could not join the swarm: none of the initial peers answered (are the addresses right and the peers "
            "up? a private swarm also refuses peers without its --swarm-key)"
        )
    return f"could not join the swarm: {first}"
