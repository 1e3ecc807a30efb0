"""Can other peers dial this one? Checked at start-up, answered in one line (issue 12, item 3).

A peer that others cannot dial still trains through the connections it opens, but nobody can average with it when
it would lead a group, call the experts it hosts, or download its state. So at start-up a peer that announces an
address asks up to three of its initial peers to dial it back (`rpc_check_reachability`). The asked peer dials
with a *probe*: a second p2p daemon of its own that listens nowhere and is connected to nobody, so its dial is a
fresh connection to the announced addresses, not the connection the question came in on. It dials only addresses
on the IP the question came from (loopback counts as loopback), so nobody can use the swarm to dial third
parties, and the admission gate rate-limits the question per caller.

The verdict is one log line: reachable, or what to do (forward the port and announce it, or `--client-mode`).
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import threading
from functools import partial
from typing import Sequence

from hivemind.p2p import P2P, P2PContext, PeerID
from hivemind.utils.multiaddr import Multiaddr

from dragon_swarm.swarm.messages import build_messages

logger = logging.getLogger(__name__)

CHECK_HANDLE = "dragon_swarm.Reachability.rpc_check_reachability"
DIAL_TIMEOUT_S = 10.0
_MESSAGES = build_messages(
    "dragon_swarm_reachability",
    {"DialRequest": (("maddrs", "string*"),), "DialResult": (("ok", "bool"), ("detail", "string"))},
)
DialRequest, DialResult = _MESSAGES["DialRequest"], _MESSAGES["DialResult"]


def _host_of(maddr: Multiaddr) -> str | None:
    for proto in ("ip4", "ip6"):
        try:
            return maddr.value_for_protocol(proto)
        except Exception:
            continue
    return None


def dialable_maddrs(requested: Sequence[str], observed_hosts: set[str]) -> list[Multiaddr]:
    """The requested addresses the probe may dial: well-formed TCP multiaddrs (their /p2p/ part dropped) on an IP
    the request came from, or loopback when it came over loopback. Pure."""
    loopback_seen = any(ipaddress.ip_address(h).is_loopback for h in observed_hosts if _is_ip(h))
    chosen = []
    for text in requested[:8]:
        try:
            maddr = Multiaddr(text.split("/p2p/")[0])
        except Exception:
            continue
        host = _host_of(maddr)
        if host is None or not _is_ip(host) or not _has_tcp(maddr):
            continue
        same_host = host in observed_hosts or (loopback_seen and ipaddress.ip_address(host).is_loopback)
        if same_host:
            chosen.append(maddr)
    return chosen


def _has_tcp(maddr: Multiaddr) -> bool:
    try:
        return bool(maddr.value_for_protocol("tcp"))
    except Exception:
        return False


def _is_ip(text: str) -> bool:
    try:
        ipaddress.ip_address(text)
        return True
    except ValueError:
        return False


class ReachabilityService:
    """Answers 'dial me back' questions on a DHT's daemon (through the admission gate), with a probe daemon
    started at the first question and kept for as long as the DHT's process lives."""

    def __init__(self, p2p: P2P):
        self.p2p = p2p
        self._probe: P2P | None = None
        self._probe_lock = asyncio.Lock()

    async def start(self) -> None:
        await self.p2p.add_protobuf_handler(CHECK_HANDLE, self.rpc_check_reachability, DialRequest)

    async def _get_probe(self) -> P2P:
        async with self._probe_lock:
            if self._probe is None:
                self._probe = await P2P.create(host_maddrs=None, no_listen=True, auto_nat=False, nat_port_map=False, use_relay=False)
            return self._probe

    async def rpc_check_reachability(self, request, context: P2PContext):
        observed = set()
        for info in await self.p2p.list_peers():
            if info.peer_id == context.remote_id:
                observed.update(h for h in (_host_of(a) for a in info.addrs) if h)
        maddrs = dialable_maddrs(list(request.maddrs), observed)
        if not maddrs:
            return DialResult(ok=False, detail="no announced TCP address on the IP this question came from")
        probe = await self._get_probe()
        try:
            await asyncio.wait_for(probe._client.connect(context.remote_id, maddrs), DIAL_TIMEOUT_S)
        except Exception as e:
            first = str(e).splitlines()[0][:160] if str(e) else type(e).__name__
            return DialResult(ok=False, detail=f"dialing {', '.join(map(str, maddrs))} failed: {first}")
        finally:
            try:
                await probe._client.disconnect(context.remote_id)
            except Exception:
                pass
        return DialResult(ok=True, detail=", ".join(map(str, maddrs)))


async def ask_to_dial_back(p2p: P2P, helpers: Sequence[PeerID], maddrs: Sequence[str], timeout: float = 30.0) -> dict[str, tuple[bool, str]]:
    """Ask each helper to dial `maddrs`; {helper: (ok, detail)} for those that answered."""

    async def ask(helper: PeerID):
        request = DialRequest(maddrs=list(maddrs))
        return await asyncio.wait_for(p2p.call_protobuf_handler(helper, CHECK_HANDLE, request, DialResult), timeout)

    answers = await asyncio.gather(*(ask(h) for h in helpers), return_exceptions=True)
    return {h.to_base58(): (a.ok, a.detail) for h, a in zip(helpers, answers) if not isinstance(a, BaseException)}


def verdict_line(answers: dict[str, tuple[bool, str]], maddrs: Sequence[str]) -> tuple[int, str] | None:
    """(log level, line) for what the helpers said; None when nobody answered (nothing to tell). Pure."""
    if not answers:
        return None
    reachable = [peer for peer, (ok, _) in answers.items() if ok]
    if reachable:
        return logging.INFO, f"Reachable: {len(reachable)} of {len(answers)} peer(s) dialed this peer at {', '.join(maddrs)}"
    port = _port_of(maddrs)
    detail = next(iter(answers.values()))[1]
    return logging.WARNING, (
        f"Other peers cannot dial this peer ({detail}). Forward TCP port {port} on your router to this machine and "
        f"pass --announce-maddrs /ip4/<your public IP>/tcp/{port}; or run with --auto-relay (reachable through a "
        "relay, slower) or --client-mode (train only, accept no connections)"
    )


def _port_of(maddrs: Sequence[str]) -> str:
    for text in maddrs:
        try:
            return Multiaddr(text.split("/p2p/")[0]).value_for_protocol("tcp")
        except Exception:
            continue
    return "<port>"


async def serve_in_dht(_dht, node) -> None:
    """Run in the DHT's process (`dht.run_coroutine`): answer dial-back questions for as long as the DHT lives."""
    await ReachabilityService(node.p2p).start()


async def _ask_in_dht(helpers: list[str], maddrs: list[str], _dht, node) -> dict[str, tuple[bool, str]]:
    return await ask_to_dial_back(node.p2p, [PeerID.from_base58(h) for h in helpers], maddrs)


def check_reachability(dht, helpers: Sequence[str], maddrs: Sequence[str]) -> dict[str, tuple[bool, str]]:
    """Ask `helpers` (base58 peer ids, up to 3) to dial `maddrs`, log the verdict in one line, return the answers."""
    maddrs = [m.split("/p2p/")[0] for m in maddrs]
    answers = dht.run_coroutine(partial(_ask_in_dht, list(helpers)[:3], maddrs))
    verdict = verdict_line(answers, maddrs)
    if verdict is not None:
        logger.log(*verdict)
    return answers


def check_reachability_in_background(dht, helpers: Sequence[str], maddrs: Sequence[str]) -> threading.Thread:
    """`check_reachability` without holding up start-up (the helpers may take a dial timeout to answer)."""

    def run() -> None:
        try:
            check_reachability(dht, helpers, maddrs)
        except Exception as e:  # the DHT shut down meanwhile, or the helpers went away: nothing to tell
            logger.debug(f"Reachability check did not finish: {e}")

    thread = threading.Thread(target=run, name="reachability-check", daemon=True)
    thread.start()
    return thread
