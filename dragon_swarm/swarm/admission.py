"""Who may talk to this peer: an admission gate in front of every RPC it serves (issue 12: private swarms, Sybil
cost, rate limits).

hivemind has no hook for this (its DHT can sign requests, but averaging and the MoE RPC cannot), so this module
wraps `hivemind.p2p.P2P.add_protobuf_handler`: every handler registered through a daemon that was started with an
`AdmissionPolicy` (DHT matchmaking, all-reduce parts, state downloads, expert forward/backward/info, our expert state
service, the DHT's own ping/store/find) first admits its caller:

- **Membership** (`swarm_key`, private swarms): on first contact the gate calls the caller back
  (`dragon_swarm.Admission.prove`, over the connection the caller opened, so it works for clients behind NAT too)
  with a fresh nonce; the caller answers HMAC-SHA256(key, nonce, both peer ids). libp2p has already authenticated
  the caller's peer id, so a proof cannot be replayed by another peer. Without the key there is nothing to read,
  write or call.
- **Identity work** (`identity_bits`, Sybil cost): the same answer carries the caller's identity work
  (`identity_work`): a peer id without N bits of memory-hard work is refused. Peers given on the command line
  (the bootstraps one chose to trust) are exempt from the work, not from the key.
- **Rate limits**: per caller and handler, token buckets for matchmaking joins and state downloads.

A verdict is cached per peer (admitted for 30 min, refused for 30 s), so the callback costs one round trip per pair
of peers. Refusals raise `AdmissionRefused` to the caller and are logged once per peer per minute.

The gate is per daemon, not per process: a daemon's policy is recorded by its listen address, so replicas of it
(hivemind's `P2P.replicate`, in this or a forked process) gate the same way, and a test may run a member and a
stranger in one process.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import hmac
import logging
import os
import secrets
import time
from collections.abc import AsyncIterable
from dataclasses import dataclass, field
from functools import wraps
from pathlib import Path
from typing import Any, Awaitable, Callable, Sequence

from hivemind.p2p import P2P, P2PContext, PeerID
from hivemind.utils.multiaddr import Multiaddr

from dragon_swarm.rate_limit import RateLimiter
from dragon_swarm.swarm.identity_work import IdentityWork, ensure_work, work_bits
from dragon_swarm.swarm.messages import build_messages

logger = logging.getLogger(__name__)

PROVE_HANDLE = "dragon_swarm.Admission.prove"
ADMITTED_TTL_S = 1800.0
REFUSED_TTL_S = 30.0
UNREACHABLE_TTL_S = 5.0  # a callback that timed out or could not connect: try again soon, it may be transient
PROVE_TIMEOUT_S = 10.0
REFUSAL_LOG_PERIOD_S = 60.0
DRAIN_TIMEOUT_S = 5.0
MIN_KEY_BYTES = 16
_MAC_DOMAIN = b"dragon-swarm admission v1:"


class AdmissionRefused(PermissionError):
    """The caller is not admitted: not a member, not enough identity work, or over a rate limit."""


@dataclass(frozen=True)
class RateLimit:
    per_second: float
    burst: float


# per caller: a follower asks a few leaders per matchmaking attempt; a joiner downloads the state once or twice
DEFAULT_RATE_LIMITS: tuple[tuple[str, RateLimit], ...] = (
    ("rpc_join_group", RateLimit(per_second=2.0, burst=20.0)),
    ("rpc_download_state", RateLimit(per_second=0.2, burst=4.0)),
    ("rpc_check_reachability", RateLimit(per_second=0.05, burst=3.0)),  # each one makes us dial out
)


@dataclass(frozen=True)
class AdmissionPolicy:
    """What this daemon asks of callers. The default (no key, no work) only rate-limits."""

    swarm_key: bytes | None = None
    identity_bits: int = 0
    trusted_peers: frozenset[str] = frozenset()  # base58 peer ids exempt from identity work (the initial peers)
    rate_limits: tuple[tuple[str, RateLimit], ...] = DEFAULT_RATE_LIMITS

    def __post_init__(self) -> None:
        if self.swarm_key is not None and len(self.swarm_key) < MIN_KEY_BYTES:
            raise ValueError(f"a swarm key needs at least {MIN_KEY_BYTES} bytes, got {len(self.swarm_key)}")
        if not 0 <= self.identity_bits <= 32:
            raise ValueError(f"identity_bits must be in [0, 32], got {self.identity_bits}")

    @property
    def challenges(self) -> bool:
        return self.swarm_key is not None or self.identity_bits > 0

    def rate_limit_for(self, handle_name: str) -> RateLimit | None:
        method = handle_name.rsplit(".", 1)[-1]
        return next((limit for name, limit in self.rate_limits if name == method), None)


def admission_policy(identity_bits: int, swarm_key: bytes | None, initial_peers: Sequence[str] = ()) -> AdmissionPolicy:
    """A peer's policy: the swarm's identity work and key; the initial peers it was given are exempt from the work."""
    return AdmissionPolicy(swarm_key=swarm_key, identity_bits=identity_bits, trusted_peers=frozenset(peer_ids_of(initial_peers)))


def peer_ids_of(maddrs: Sequence[str]) -> list[str]:
    """The peer ids in multiaddrs (their /p2p/ part), each once, in order."""
    ids: list[str] = []
    for maddr in maddrs:
        try:
            peer = Multiaddr(maddr).value_for_protocol("p2p")
        except Exception:  # no /p2p/ part, or not a multiaddr (hivemind already refused those)
            continue
        if peer and peer not in ids:
            ids.append(peer)
    return ids


def read_swarm_key(path: Path) -> bytes:
    """A swarm key file: hex text (as `python -m dragon_swarm.keys swarm-key` writes it). ValueError says what is wrong."""
    try:
        text = Path(path).read_text().strip()
    except OSError as e:
        raise ValueError(f"{path}: cannot read the swarm key: {e.strerror or e}") from None
    try:
        key = bytes.fromhex(text)
    except ValueError:
        raise ValueError(f"{path}: a swarm key file holds hex digits (python -m dragon_swarm.keys swarm-key FILE)") from None
    if len(key) < MIN_KEY_BYTES:
        raise ValueError(f"{path}: a swarm key needs at least {MIN_KEY_BYTES} bytes, got {len(key)}")
    return key


def new_swarm_key() -> str:
    return secrets.token_hex(32)


def membership_mac(key: bytes, nonce: bytes, challenger: bytes, prover: bytes) -> bytes:
    return hmac.new(key, _MAC_DOMAIN + nonce + b"|" + challenger + b"|" + prover, hashlib.sha256).digest()


def check_proof(policy: AdmissionPolicy, nonce: bytes, challenger: bytes, prover: PeerID, mac: bytes, work_nonce: bytes) -> str | None:
    """Why the proof does not admit `prover`, or None when it does. Pure."""
    if policy.swarm_key is not None:
        expected = membership_mac(policy.swarm_key, nonce, challenger, prover.to_bytes())
        if not hmac.compare_digest(expected, mac):
            return "no proof of the swarm key"
    if policy.identity_bits > 0 and prover.to_base58() not in policy.trusted_peers:
        bits = work_bits(prover.to_bytes(), work_nonce)
        if bits < policy.identity_bits:
            return f"identity work of {bits} bit(s), the swarm asks {policy.identity_bits}"
    return None


_MESSAGES = build_messages("dragon_swarm_admission", {"Challenge": (("nonce", "bytes"),), "Proof": (("mac", "bytes"), ("work_nonce", "bytes"))})
Challenge, Proof = _MESSAGES["Challenge"], _MESSAGES["Proof"]


@dataclass
class _Verdict:
    admitted: bool
    until: float
    why: str = ""


@dataclass
class AdmissionGate:
    """One daemon's gate in one process: verdict cache, callbacks in flight, rate limiters."""

    policy: AdmissionPolicy
    verdicts: dict[PeerID, _Verdict] = field(default_factory=dict)
    pending: dict[PeerID, asyncio.Future] = field(default_factory=dict)
    limiters: dict[str, RateLimiter] = field(default_factory=dict)
    logged: dict[PeerID, float] = field(default_factory=dict)

    async def admit(self, p2p: P2P, context: P2PContext) -> None:
        """Return when `context.remote_id` may use `context.handle_name`; raise `AdmissionRefused` otherwise."""
        peer = context.remote_id
        if peer == p2p.peer_id:
            return
        if self.policy.challenges:
            verdict = await self._verdict(p2p, peer)
            if not verdict.admitted:
                self._log_refusal(peer, verdict.why)
                raise AdmissionRefused(f"not admitted to this swarm: {verdict.why}")
        limit = self.policy.rate_limit_for(context.handle_name)
        if limit is not None:
            limiter = self.limiters.setdefault(context.handle_name, RateLimiter(limit.per_second, limit.burst))
            if not limiter.take(peer, time.monotonic()):
                method = context.handle_name.rsplit(".", 1)[-1]
                why = f"over the rate limit of {method} ({limit.per_second:g}/s, burst {limit.burst:g})"
                self._log_refusal(peer, why)
                raise AdmissionRefused(why)

    async def _verdict(self, p2p: P2P, peer: PeerID) -> _Verdict:
        now = time.monotonic()
        cached = self.verdicts.get(peer)
        if cached is not None and cached.until > now:
            return cached
        if peer not in self.pending:  # one callback per peer, however many of its requests wait on it
            self.pending[peer] = asyncio.ensure_future(self.challenge(p2p, peer))
            self.pending[peer].add_done_callback(lambda _, peer=peer: self.pending.pop(peer, None))
        return await asyncio.shield(self.pending[peer])

    async def challenge(self, p2p: P2P, peer: PeerID) -> _Verdict:
        """Call `peer` back with a fresh nonce and judge its proof; the verdict is cached."""
        nonce = os.urandom(16)
        try:
            proof = await asyncio.wait_for(p2p.call_protobuf_handler(peer, PROVE_HANDLE, Challenge(nonce=nonce), Proof), PROVE_TIMEOUT_S)
        except Exception as e:  # no handler (not one of ours), unreachable, timed out
            first = str(e).splitlines()[0][:120] if str(e) else type(e).__name__
            verdict = _Verdict(False, time.monotonic() + UNREACHABLE_TTL_S, f"did not answer the admission challenge ({first})")
        else:
            why = await asyncio.to_thread(check_proof, self.policy, nonce, p2p.peer_id.to_bytes(), peer, proof.mac, proof.work_nonce)
            if why is None:
                verdict = _Verdict(True, time.monotonic() + ADMITTED_TTL_S)
            else:
                verdict = _Verdict(False, time.monotonic() + REFUSED_TTL_S, why)
        self.verdicts[peer] = verdict
        if len(self.verdicts) > 8192:  # a flood of fresh ids must not grow this without bound
            now = time.monotonic()
            for stale in [p for p, v in self.verdicts.items() if v.until <= now]:
                del self.verdicts[stale]
        return verdict

    def _log_refusal(self, peer: PeerID, why: str) -> None:
        now = time.monotonic()
        if now - self.logged.get(peer, -1e9) >= REFUSAL_LOG_PERIOD_S:
            if len(self.logged) > 8192:
                self.logged.clear()
            self.logged[peer] = now
            logger.warning(f"Refused requests from peer {peer.to_base58()[-12:]}: {why}")


@dataclass(frozen=True)
class _Daemon:
    policy: AdmissionPolicy
    work: IdentityWork | None  # set in the process that started the daemon (which answers challenges)


_DAEMONS: dict[str, _Daemon] = {}  # daemon listen address -> its policy; inherited by forked processes
# (pid, event loop, daemon): a forked child, or another thread's loop, builds its own (futures belong to one loop)
_GATES: dict[tuple[int, int, str], AdmissionGate] = {}
_ORIGINAL: dict[str, Any] = {}


def register_daemon(daemon_listen_maddr: Any, policy: AdmissionPolicy, work: IdentityWork | None = None) -> None:
    """Gate the handlers registered from now on through `daemon_listen_maddr`'s replicas in this process (and in
    processes forked from it). `start_dht` calls this for its DHT's daemon."""
    install()
    _DAEMONS[str(daemon_listen_maddr)] = _Daemon(policy, work)


def _gate_of(p2p: P2P) -> AdmissionGate | None:
    key = str(getattr(p2p, "_daemon_listen_maddr", None))
    daemon = _DAEMONS.get(key)
    if daemon is None:
        return None
    where = (os.getpid(), id(asyncio.get_running_loop()), key)
    gate = _GATES.get(where)
    if gate is None:
        gate = _GATES[where] = AdmissionGate(daemon.policy)
    return gate


async def _drain(requests: AsyncIterable) -> None:
    async for _ in requests:
        pass


def gated(p2p: P2P, handler: Callable, stream: bool) -> Callable:
    """`handler` behind the gate: unary handlers raise before running, stream handlers before their first item."""
    if stream:

        @wraps(handler)
        async def gated_stream(request: Any, context: P2PContext):
            gate = _gate_of(p2p)
            if gate is not None:
                try:
                    await gate.admit(p2p, context)
                except AdmissionRefused:
                    # closing a stream the caller is still writing resets it, and the reset drops our answer:
                    # read (and discard) what it sends first, for a few seconds at most
                    if isinstance(request, AsyncIterable):
                        with contextlib.suppress(Exception):
                            await asyncio.wait_for(_drain(request), DRAIN_TIMEOUT_S)
                    raise
            output = handler(request, context)
            if isinstance(output, AsyncIterable):
                async for item in output:
                    yield item
            else:
                yield await output

        return gated_stream

    @wraps(handler)
    async def gated_unary(request: Any, context: P2PContext):
        gate = _gate_of(p2p)
        if gate is not None:
            await gate.admit(p2p, context)
        return await handler(request, context)

    return gated_unary


def install() -> None:
    """Wrap hivemind's P2P once per process: handler registration goes through the gate, and a daemon created with
    `admission=policy` answers challenges and records its policy. Idempotent; a daemon without a policy is untouched."""
    if _ORIGINAL:
        return
    _ORIGINAL["add"] = P2P.add_protobuf_handler
    _ORIGINAL["create"] = P2P.create.__func__

    async def add_protobuf_handler(self: P2P, name: str, handler: Callable, input_protobuf_type: type, *,
                                   stream_input: bool = False, stream_output: bool = False, balanced: bool = False) -> None:  # fmt: skip
        if name != PROVE_HANDLE and _DAEMONS.get(str(getattr(self, "_daemon_listen_maddr", None))) is not None:
            handler = gated(self, handler, stream=stream_input or stream_output)
        await _ORIGINAL["add"](self, name, handler, input_protobuf_type, stream_input=stream_input,
                               stream_output=stream_output, balanced=balanced)  # fmt: skip

    async def create(cls: type[P2P], *args: Any, admission: AdmissionPolicy | None = None, **kwargs: Any) -> P2P:
        p2p = await _ORIGINAL["create"](cls, *args, **kwargs)
        if admission is not None:
            work = None
            if admission.identity_bits > 0:
                path = Path(kwargs["identity_path"]) if kwargs.get("identity_path") else None
                work = await asyncio.to_thread(ensure_work, p2p.peer_id.to_bytes(), admission.identity_bits, path)
            register_daemon(p2p.daemon_listen_maddr, admission, work)
            await _ORIGINAL["add"](p2p, PROVE_HANDLE, _prover(p2p, admission, work), Challenge)
        return p2p

    P2P.add_protobuf_handler = add_protobuf_handler
    P2P.create = classmethod(create)
    _quiet_refusals()


async def check_peers(p2p: P2P, policy: AdmissionPolicy, peer_ids: list[str]) -> dict[str, str]:
    """Challenge `peer_ids` as their own gates would challenge us; what is wrong with each that fails (a bootstrap
    started without the swarm key, or without identity work that is not on our trusted list)."""
    gate = AdmissionGate(policy)
    verdicts = await asyncio.gather(*(gate.challenge(p2p, PeerID.from_base58(peer)) for peer in peer_ids))
    return {peer: verdict.why for peer, verdict in zip(peer_ids, verdicts) if not verdict.admitted}


def _prover(p2p: P2P, policy: AdmissionPolicy, work: IdentityWork | None) -> Callable[[Any, P2PContext], Awaitable[Any]]:
    async def prove(challenge: Any, context: P2PContext) -> Any:
        mac = b""
        if policy.swarm_key is not None:
            mac = membership_mac(policy.swarm_key, challenge.nonce, context.remote_id.to_bytes(), p2p.peer_id.to_bytes())
        return Proof(mac=mac, work_nonce=work.nonce if work is not None else b"")

    return prove


class _DropRefusalTracebacks(logging.Filter):
    """hivemind logs a stream handler's exception with its traceback; a refused caller is already logged by the
    gate in one line, so its traceback is dropped."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not (record.exc_info and isinstance(record.exc_info[1], AdmissionRefused))


def _quiet_refusals() -> None:
    logging.getLogger("hivemind.p2p.p2p_daemon").addFilter(_DropRefusalTracebacks())
