"""Routes MoE tokens to experts found in the DHT, one replica per expert, never waiting past a deadline.

The model asks two things (see `dragon_swarm.model.dispatch.ExpertDispatcher`): which experts are alive, and
"run these token groups through these experts". Experts that fail, answer late or answer garbage are skipped
(the model renormalizes over the experts that answered) and their host is banned for a while.

Byzantine hosts: an output that is non-finite, misshapen or far larger than its input (`max_output_ratio` times the
input's RMS) is refused and its host banned from that expert for `BYZANTINE_BAN_FACTOR` x `expiration`. Subtler lies
(sign flips, random outputs of honest size) are caught by cross-checks: the first `VERIFY_FIRST_CALLS` calls to every
(host, expert) pair and a `cross_check_fraction` of the others run on a second replica too, and two outputs whose
relative difference exceeds `cross_check_tolerance` disagree. The trainer's own copy of an expert is trusted; with
three or more replicas a third one decides by majority; between two remote replicas nobody can tell who lied, so the
disagreement is logged and counted and that output dropped, but nobody is banned.

Traffic (`experts.wire_dtype`): tensors travel in fp16 (scaled per tensor, see `dragon_swarm.moe.handler`) or
float32, and arrive as float32. A forward that will get a backward carries a fresh request id; the host keeps its
inputs, and the backward sends only the output gradients and that id. A host that no longer has them (expired,
evicted, restarted) answers `UNKNOWN_REQUEST` and the call is repeated with the inputs, within the same deadline.
"""

from __future__ import annotations

import asyncio
import logging
import os
import random
import threading
import time
from dataclasses import dataclass, field
from enum import Enum
from typing import Mapping, Sequence

import hivemind
import torch
from hivemind.moe.client.expert import get_server_stub
from hivemind.moe.client.remote_expert_worker import RemoteExpertWorker
from hivemind.moe.server.module_backend import ModuleBackend
from hivemind.p2p import P2PHandlerError, PeerID
from hivemind.utils import MSGPackSerializer
from hivemind.proto import runtime_pb2
from torch.autograd.function import once_differentiable

from dragon_swarm.background import PeriodicThread
from dragon_swarm.config import ExpertsSection
from dragon_swarm.events import EventBus, ExpertBanReport
from dragon_swarm.moe.backend import ExpertTamper
from dragon_swarm.moe.expert_uids import all_expert_uids, expert_uid
from dragon_swarm.moe.handler import FLOAT16, UNKNOWN_REQUEST, decode_tensors, encode_tensors, parse_metadata
from dragon_swarm.moe.registry import Replica, find_replicas

logger = logging.getLogger(__name__)

NO_COMPRESSION = runtime_pb2.CompressionType.NONE
WIRE_COMPRESSION = {"float16": FLOAT16, "float32": NO_COMPRESSION}
REQUEST_ID_BYTES = 16  # random: a restarted trainer (same peer id) must never reuse an id a host still keeps

# A host caught lying about an expert is refused that expert this many times `expiration` (the time a dead host's
# record lingers, which is what an unreachable host is banned for): long enough that a host lying on every call costs
# a trainer one dropped expert output per ban period per expert (~1 in 10^3 calls at a few calls per second), short
# enough that an honest host with a one-off fault (an overflow, a bad restart) is tried again within minutes.
BYZANTINE_BAN_FACTOR = 10.0
# Every (host, expert) pair's first calls are cross-checked when a second replica exists: a host that lies from the
# start is caught on its first answers instead of after ~1/cross_check_fraction calls, while replicas are still close.
VERIFY_FIRST_CALLS = 3
# Inputs at or below this RMS are compared as if they had it: an all-zero input would make any output "infinitely"
# large (the trunk RMS-normalises expert inputs, so honest inputs have RMS ~1).
MIN_INPUT_RMS = 1e-3
# Cross-checks compare outputs relative to at least this fraction of the input's norm. Fresh experts answer ~0.003 x
# their input and every early update moves them by a large share of that, so honest replicas trained by different
# trainers were measured 0.73-0.80 apart (relative to their outputs) after 3-4 calls: without a floor they "disagree".
# A difference under tolerance x this floor x the input is too small to hurt the residual stream it is added to,
# while a x100 liar at that stage (0.3 x the input) stands out.
CROSS_CHECK_INPUT_FLOOR = 0.1
# Two replicas' outputs also disagree when one's norm is this many times the other's. ‖a − b‖ / max(‖a‖, ‖b‖) cannot
# exceed 0.99 for a x100 liar, and honest replicas that have drifted apart were measured up to 0.94: the norms tell
# them apart. Norms are floored at SCALE_FLOOR x the input's norm, so an output still near zero (a fresh expert answers
# ~0.003 x its input) never makes an honest replica look far away: a CI run of tests/swarm/test_byzantine_experts.py
# saw one replica answer ~0.1 x the input while the other was still at ~0.0026 x (38x apart at the former floor of
# 0.001, 20x at 0.005). Honest pairs early in training (each trainer trains its own copy between replica syncs, which
# were measured 35-70% of the weights' norm apart after one 3 s sync period) were seen up to 26x apart at this floor
# (two runs of that test on a loaded machine), a x100 liar 56-102x: the limit sits between. A liar is >= 60x the floor
# from its first call (x100 a fresh expert's output), so it is caught before anyone's copy has grown.
CROSS_CHECK_SCALE_LIMIT = 40.0
SCALE_FLOOR = 5e-3


@dataclass
class ReplicaTable:
    """Pure bookkeeping of replicas, latency EMAs and bans; no network here.

    `latency` is each replica's own answer time (one RPC, measured by the router per call), so replicas called
    together in one layer round can still be told apart. Two kinds of bans: a host that did not answer (timeout,
    error) is skipped for every expert for `ban_seconds`; a host that answered wrongly for one expert (a refused or
    outvoted output) is skipped for that expert only, for `byzantine_ban_seconds`.
    """

    ban_seconds: float
    latency_alpha: float = 0.3
    byzantine_ban_seconds: float | None = None  # default: BYZANTINE_BAN_FACTOR x ban_seconds
    replicas: dict[str, list[str]] = field(default_factory=dict)  # uid -> peer ids (base58)
    latency: dict[str, float] = field(default_factory=dict)  # peer id -> EMA seconds
    banned_until: dict[str, float] = field(default_factory=dict)
    expert_banned_until: dict[tuple[str, str], float] = field(default_factory=dict)  # (peer, uid) -> time
    verified_calls: dict[tuple[str, str], int] = field(default_factory=dict)  # (peer, uid) -> cross-checked calls
    byzantine_bans: int = 0
    byzantine_peers: set[str] = field(default_factory=set)

    def __post_init__(self) -> None:
        if self.byzantine_ban_seconds is None:
            self.byzantine_ban_seconds = BYZANTINE_BAN_FACTOR * self.ban_seconds

    def update(self, found: dict[str, list[Replica]]) -> None:
        self.replicas = {uid: [r.record.peer_id for r in reps] for uid, reps in found.items()}

    def usable(self, uid: str, now: float) -> list[str]:
        return [
            p for p in self.replicas.get(uid, ())
            if self.banned_until.get(p, 0.0) <= now and self.expert_banned_until.get((p, uid), 0.0) <= now
        ]  # fmt: skip

    def choose(self, uid: str, now: float, rng: random.Random, exclude: Sequence[str] = ()) -> str | None:
        """Lowest latency EMA first; replicas never measured go first so every replica gets tried."""
        candidates = [p for p in self.usable(uid, now) if p not in exclude]
        if not candidates:
            return None
        best = min(self.latency.get(p, 0.0) for p in candidates)
        return rng.choice([p for p in candidates if self.latency.get(p, 0.0) == best])

    def record_success(self, peer_id: str, seconds: float) -> None:
        old = self.latency.get(peer_id)
        self.latency[peer_id] = seconds if old is None else (1 - self.latency_alpha) * old + self.latency_alpha * seconds

    def record_failure(self, peer_id: str, now: float) -> None:
        self.banned_until[peer_id] = now + self.ban_seconds

    def record_byzantine(self, peer_id: str, uid: str, now: float) -> float:
        """`peer_id` answered wrongly for `uid`: refuse it that expert for a while. Returns the ban's seconds."""
        self.expert_banned_until[(peer_id, uid)] = now + self.byzantine_ban_seconds
        self.byzantine_bans += 1
        self.byzantine_peers.add(peer_id)
        return self.byzantine_ban_seconds

    def wants_cross_check(self, peer_id: str, uid: str, draw: float, fraction: float) -> bool:
        """A pair's first VERIFY_FIRST_CALLS calls are always checked, later ones with probability `fraction`
        (`draw` is uniform in [0, 1)); a fraction of 0 turns cross-checks off altogether."""
        if fraction <= 0.0:
            return False
        return self.verified_calls.get((peer_id, uid), 0) < VERIFY_FIRST_CALLS or draw < fraction

    def record_cross_check(self, peer_id: str, uid: str) -> None:
        self.verified_calls[(peer_id, uid)] = self.verified_calls.get((peer_id, uid), 0) + 1


class Verdict(str, Enum):
    """The outcome of a cross-check between the replica that served a call and a reference replica."""

    AGREE = "agree"
    PRIMARY_WRONG = "primary wrong"
    REFERENCE_WRONG = "reference wrong"
    UNRESOLVED = "unresolved"


def relative_difference(a: torch.Tensor, b: torch.Tensor, floor: float = 0.0) -> float:
    """‖a − b‖ / max(‖a‖, ‖b‖, floor), in [0, 2]; 0 for two all-zero tensors (with no floor)."""
    a, b = a.detach().float(), b.detach().float()
    scale = max(float(torch.linalg.vector_norm(a)), float(torch.linalg.vector_norm(b)), floor)
    return 0.0 if scale == 0.0 else float(torch.linalg.vector_norm(a - b)) / scale


def scale_ratio(a: torch.Tensor, b: torch.Tensor, floor: float = 0.0) -> float:
    """max(‖a‖, ‖b‖) / max(min(‖a‖, ‖b‖), floor), >= 1; 1 for two all-zero tensors (with no floor)."""
    na, nb = float(torch.linalg.vector_norm(a.detach().float())), float(torch.linalg.vector_norm(b.detach().float()))
    low = max(min(na, nb), floor)
    return 1.0 if low == 0.0 else max(na, nb, low) / low


def outputs_disagree(a: torch.Tensor, b: torch.Tensor, tolerance: float, input_norm: float = 0.0) -> bool:
    """Two replicas' outputs for one input (of norm `input_norm`) differ in direction beyond `tolerance` (relative
    to at least CROSS_CHECK_INPUT_FLOOR x the input) or in scale beyond CROSS_CHECK_SCALE_LIMIT."""
    return (
        relative_difference(a, b, CROSS_CHECK_INPUT_FLOOR * input_norm) > tolerance
        or scale_ratio(a, b, SCALE_FLOOR * input_norm) > CROSS_CHECK_SCALE_LIMIT
    )


def judge_cross_check(
    primary: torch.Tensor,
    reference: torch.Tensor,
    tolerance: float,
    reference_trusted: bool,
    third: torch.Tensor | None = None,
    input_norm: float = 0.0,
) -> Verdict:
    """Who is wrong when the replica that served a call (`primary`) is checked against another (`reference`).

    Two outputs disagree as `outputs_disagree` says. A trusted reference (this trainer's own copy) decides alone.
    Otherwise a `third` replica's output decides by majority; without one (only two replicas), or when the third
    agrees with both or neither, nobody can be blamed.
    """
    if not outputs_disagree(primary, reference, tolerance, input_norm):
        return Verdict.AGREE
    if reference_trusted:
        return Verdict.PRIMARY_WRONG
    if third is None:
        return Verdict.UNRESOLVED
    primary_ok = not outputs_disagree(primary, third, tolerance, input_norm)
    reference_ok = not outputs_disagree(reference, third, tolerance, input_norm)
    if primary_ok and not reference_ok:
        return Verdict.REFERENCE_WRONG
    if reference_ok and not primary_ok:
        return Verdict.PRIMARY_WRONG
    return Verdict.UNRESOLVED


@dataclass(frozen=True)
class Refusal:
    """Why an expert call's result was not used."""

    reason: str
    byzantine: bool  # the host answered, wrongly (a ban for that expert); False: it did not answer (a timeout ban)


def check_output(result: object, inputs: torch.Tensor, max_ratio: float | None) -> Refusal | None:
    """Pure check of one expert call's result against the tensor it was given: None when usable.

    :param max_ratio: refuse outputs whose RMS exceeds this many times the input's RMS (None: no such check; used
      for backward results, whose scale follows the trainer's gradients)
    """
    if isinstance(result, BaseException):
        reason = f"{type(result).__name__}: {str(result)[:120]}" if str(result) else type(result).__name__
        return Refusal(reason, byzantine=False)
    if not isinstance(result, torch.Tensor) or result.shape != inputs.shape:
        return Refusal(f"wrong output shape {tuple(getattr(result, 'shape', ()))}, expected {tuple(inputs.shape)}", byzantine=True)
    if not torch.isfinite(result).all():
        return Refusal("non-finite output", byzantine=True)
    if max_ratio is not None:
        ratio = _rms(result) / max(_rms(inputs), MIN_INPUT_RMS)
        if ratio > max_ratio:
            return Refusal(f"output RMS {ratio:.3g} x the input's, limit {max_ratio:g} x", byzantine=True)
    return None


def _rms(x: torch.Tensor) -> float:
    return float(x.detach().float().pow(2).mean().sqrt()) if x.numel() else 0.0


class RemoteExpertDispatcher:
    """ExpertDispatcher over hivemind RPC. Start with `start()`, stop with `shutdown()`."""

    def __init__(
        self,
        dht: hivemind.DHT,
        prefix: str,
        num_layers: int,
        num_experts: int,
        d_model: int,
        settings: ExpertsSection,
        seed: int = 0,
        local_backends: Mapping[str, ModuleBackend] | None = None,
        tamper: "ExpertTamper | None" = None,
        bus: EventBus | None = None,
    ):
        """local_backends: experts this very peer hosts; libp2p cannot dial itself, so those calls go straight
        into the host's task pools (same runtime, same optimizer) instead of over the network. They are also the
        trusted reference of cross-checks. bus: where `ExpertBanReport`s go (the stats file, the dashboard)."""
        self.dht, self.prefix, self.settings, self.d_model = dht, prefix, settings, d_model
        self.local_backends = dict(local_backends or {})
        self.tamper = tamper  # TEST/BENCHMARK ONLY: a Byzantine trainer's gradient attack (dragon_swarm.attacks)
        self.bus = bus
        self.own_peer_id = dht.peer_id.to_base58()
        self.num_layers, self.num_experts = num_layers, num_experts
        self.table = ReplicaTable(ban_seconds=settings.expiration)
        self._lock = threading.Lock()
        self._rng = random.Random(seed)
        self._uids = all_expert_uids(prefix, num_layers, num_experts)
        self._refresher: _Refresher | None = None
        self._p2p = None
        self.failures = 0
        self.calls = 0
        self.calls_by_peer: dict[str, int] = {}
        self.cross_checks = 0
        self.disagreements = 0  # cross-checks whose outputs differed beyond the tolerance
        self.unresolved_disagreements = 0  # ...of which nobody could be blamed (two remote replicas, no majority)
        self.max_agreeing_difference = 0.0  # the largest relative difference seen between replicas that agreed
        self.max_agreeing_scale = 1.0  # ...and the largest ratio of their output norms
        self.wire_compression = WIRE_COMPRESSION[settings.wire_dtype]
        self.cached_backwards = 0  # backward calls that sent only the output gradients, the host had the inputs
        self.resent_inputs = 0  # ...and those whose host had lost them, repeated with the inputs

    @property
    def byzantine_bans(self) -> int:
        """(peer, expert) bans for wrong outputs so far."""
        return self.table.byzantine_bans

    @property
    def byzantine_peers(self) -> set[str]:
        """Hosts banned at least once for a wrong output."""
        return set(self.table.byzantine_peers)

    def uids(self) -> list[str]:
        return list(self._uids)

    def start(self) -> None:
        self._p2p = RemoteExpertWorker.run_coroutine(self.dht.replicate_p2p())
        self.refresh()
        self._refresher = _Refresher(self)
        self._refresher.start()

    def shutdown(self) -> None:
        if self._refresher is not None:
            self._refresher.stop()
        logger.info(
            f"Expert calls: {self.calls}, refused or failed {self.failures}; cross-checks {self.cross_checks}, "
            f"disagreements {self.disagreements} ({self.unresolved_disagreements} unresolved), Byzantine bans "
            f"{self.byzantine_bans} of {len(self.table.byzantine_peers)} host(s); largest difference between agreeing "
            f"replicas {self.max_agreeing_difference:.3f} (tolerance {self.settings.cross_check_tolerance:g}), norms up to "
            f"{self.max_agreeing_scale:.2f}x apart; backward calls using inputs kept by the host {self.cached_backwards}, "
            f"inputs re-sent {self.resent_inputs}"
        )

    def refresh(self) -> None:
        try:
            found = find_replicas(self.dht, self.uids())
        except Exception as e:  # keep the old table: a DHT hiccup must not stop training
            logger.warning(f"Looking up experts failed, keeping the previous table: {e}")
            return
        with self._lock:
            self.table.update(found)

    def wait_for_experts(self, timeout: float) -> bool:
        """Block until every layer has at least one live expert, or timeout."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if all(bool(self.alive_mask(layer).any()) for layer in range(self.num_layers)):
                return True
            time.sleep(1.0)
            self.refresh()
        return False

    def online_experts(self) -> int:
        now = time.time()
        with self._lock:
            return sum(1 for uid in self._uids if self.table.usable(uid, now))

    # --- ExpertDispatcher protocol ---

    def alive_mask(self, layer: int) -> torch.Tensor:
        now = time.time()
        with self._lock:
            return torch.tensor(
                [bool(self.table.usable(expert_uid(self.prefix, layer, i), now)) for i in range(self.num_experts)],
                dtype=torch.bool,
            )

    def dispatch(self, layer: int, inputs: dict[int, torch.Tensor]) -> dict[int, torch.Tensor]:
        if not inputs:
            return {}
        now = time.time()
        indices, peers = [], []
        with self._lock:
            for index in inputs:
                peer = self.table.choose(expert_uid(self.prefix, layer, index), now, self._rng)
                if peer is not None:
                    indices.append(index)
                    peers.append(peer)
        if not indices:
            return {}
        # ask hosts to keep the inputs only when a backward can follow (not in the no-grad cycles of one-step grad)
        request_ids = [os.urandom(REQUEST_ID_BYTES) for _ in indices] if torch.is_grad_enabled() else None
        call = _LayerCall(self, [expert_uid(self.prefix, layer, i) for i in indices], peers, request_ids)  # forward may re-point peers
        answered_mask, *outputs = _RemoteLayerFunction.apply(_DUMMY, call, *[inputs[i] for i in indices])
        return {index: out for index, out, ok in zip(indices, outputs, answered_mask.tolist()) if ok}

    # --- RPC plumbing ---

    def _run_calls(
        self, kind: str, uids: Sequence[str], peers: list[str], payloads: Sequence[Sequence[torch.Tensor]], timeout: float,
        request_ids: Sequence[bytes] | None = None,
    ) -> list[torch.Tensor | None]:  # fmt: skip
        """One round of calls, one per (uid, peer, payload); None where a call failed or its output was refused.

        Forward calls may be cross-checked on a second replica; when that shows the chosen replica lied and another
        replica's output is used instead, `peers` is updated in place, so that the backward goes where the used
        output came from. request_ids: forward: ask the hosts to keep the inputs under these ids (references of
        cross-checks too: the backward may go to one of them); backward: the ids the forward used."""
        checks = self._plan_cross_checks(uids, peers) if kind == "forward" else {}
        jobs = [(u, p, t) for u, p, t in zip(uids, peers, payloads)] + [(uids[i], ref, payloads[i]) for i, ref in checks.items()]
        if request_ids is None:
            results = self._gather(kind, jobs, timeout)
        else:
            results = self._gather(kind, jobs, timeout, request_ids=[*request_ids, *(request_ids[i] for i in checks)])
        outputs = [self._accept(kind, u, p, t, r) for u, p, t, r in zip(uids, peers, payloads, results)]
        for (i, reference), result in zip(checks.items(), results[len(uids):]):
            reference_output = self._accept(kind, uids[i], reference, payloads[i], result, primary=False)
            if reference_output is None:
                continue  # the reference's own failure was handled (banned) above; the primary stands alone
            if outputs[i] is None:  # the primary failed or lied: the reference answered, use it
                outputs[i], peers[i] = reference_output, reference
                continue
            outputs[i], peers[i] = self._cross_check(uids[i], peers[i], outputs[i], reference, reference_output, payloads[i], timeout)
        return outputs

    def _plan_cross_checks(self, uids: Sequence[str], peers: Sequence[str]) -> dict[int, str]:
        """call index -> the reference replica to repeat it on: our own copy when we host the expert, else another
        live replica. Calls served by our own copy are trusted and never checked."""
        now = time.time()
        checks = {}
        with self._lock:
            for i, (uid, peer) in enumerate(zip(uids, peers)):
                if peer == self.own_peer_id or not self.table.wants_cross_check(peer, uid, self._rng.random(), self.settings.cross_check_fraction):
                    continue
                if uid in self.local_backends:
                    reference = self.own_peer_id
                else:
                    reference = self.table.choose(uid, now, self._rng, exclude=(peer,))
                if reference is not None:
                    checks[i] = reference
                    self.table.record_cross_check(peer, uid)
        return checks

    def _cross_check(
        self, uid: str, peer: str, output: torch.Tensor, reference: str, reference_output: torch.Tensor, payload: Sequence[torch.Tensor], timeout: float
    ) -> tuple[torch.Tensor | None, str]:
        """(the output to use, the replica it came from) after comparing two replicas' outputs of one call."""
        tolerance = self.settings.cross_check_tolerance
        trusted = reference == self.own_peer_id
        input_norm = float(torch.linalg.vector_norm(payload[0].detach().float()))
        difference = relative_difference(output, reference_output, CROSS_CHECK_INPUT_FLOOR * input_norm)
        scale = scale_ratio(output, reference_output, SCALE_FLOOR * input_norm)
        self.cross_checks += 1
        if not outputs_disagree(output, reference_output, tolerance, input_norm):
            self.max_agreeing_difference = max(self.max_agreeing_difference, difference)
            self.max_agreeing_scale = max(self.max_agreeing_scale, scale)
            return output, peer
        self.disagreements += 1
        third, third_output = None, None
        if not trusted:
            with self._lock:
                third = self.table.choose(uid, time.time(), self._rng, exclude=(peer, reference))
            if third is not None:
                (result,) = self._gather("forward", [(uid, third, payload)], timeout)
                third_output = self._accept("forward", uid, third, payload, result, primary=False)
        verdict = judge_cross_check(output, reference_output, tolerance, trusted, third_output, input_norm)
        numbers = f"differ by {difference:.2f} (tolerance {tolerance:g}), norms {scale:.1f}x apart (limit {CROSS_CHECK_SCALE_LIMIT:g}x)"
        who = "our own copy" if trusted else f"{reference}" + (f", third replica {third}" if third_output is not None else "")
        if verdict is Verdict.PRIMARY_WRONG:
            self._ban_byzantine(uid, peer, f"its output and {who}'s {numbers}")
            return reference_output, reference
        if verdict is Verdict.REFERENCE_WRONG:
            self._ban_byzantine(uid, reference, f"its output and {peer}'s {numbers}, and {third} sides with {peer}")
            return output, peer
        self.unresolved_disagreements += 1
        logger.warning(
            f"Replicas of {uid} disagree: {peer} and {who} {numbers} and no majority decides; output dropped, nobody banned ({self.unresolved_disagreements} unresolved so far)"
        )
        return None, peer

    def _accept(self, kind: str, uid: str, peer: str, payload: Sequence[torch.Tensor], result: object, primary: bool = True) -> torch.Tensor | None:
        """Check one call's result, update the table (latency, bans) and return the output, or None if refused."""
        output, seconds = result if isinstance(result, tuple) else (result, None)
        # forward outputs must stay near their input's scale; backward results follow the trainer's own gradients
        max_ratio = self.settings.max_output_ratio if kind == "forward" else None
        refusal = check_output(output, payload[0], max_ratio)
        with self._lock:
            if primary:
                self.calls += 1
                self.calls_by_peer[peer] = self.calls_by_peer.get(peer, 0) + 1
            if refusal is None:
                self.table.record_success(peer, seconds)
                return output
            self.failures += 1
            if not refusal.byzantine:
                self.table.record_failure(peer, time.time())
                logger.warning(f"Expert {uid} on {peer[-8:]} {kind} failed ({refusal.reason}); skipping it, host banned for {self.table.ban_seconds:.0f} s")
                return None
        self._ban_byzantine(uid, peer, f"{kind} {refusal.reason}")
        return None

    def _ban_byzantine(self, uid: str, peer: str, reason: str) -> None:
        with self._lock:
            seconds = self.table.record_byzantine(peer, uid, time.time())
            bans, calls = self.table.byzantine_bans, self.calls_by_peer.get(peer, 0)
        logger.warning(
            f"Expert {uid} on {peer} refused as Byzantine: {reason}; banned from this expert for {seconds:.0f} s "
            f"(byzantine bans: {bans}, after {calls} call(s) to this host)"
        )
        if self.bus is not None:
            self.bus.publish(ExpertBanReport(peer_id=peer, uid=uid, seconds=seconds, reason=reason, calls=calls))

    async def _rpc(self, rpc, uid: str, tensors: Sequence[torch.Tensor], meta: dict) -> torch.Tensor:
        """One expert RPC in the configured wire format; the first answer tensor as float32."""
        serialized, exponents = encode_tensors(tensors, self.wire_compression)
        if any(exponents):
            meta = {**meta, "exp": exponents}
        metadata = MSGPackSerializer.dumps(meta) if meta else b""
        response = await rpc(runtime_pb2.ExpertRequest(uid=uid, tensors=serialized, metadata=metadata))
        if not response.tensors:
            raise ValueError("empty answer")
        answer = parse_metadata(response.metadata).get("exp")
        return decode_tensors(response.tensors[:1], answer[:1] if answer else None)[0]

    async def _remote_call(self, kind: str, uid: str, peer: str, tensors: Sequence[torch.Tensor], rid: bytes | None) -> torch.Tensor:
        stub = get_server_stub(self._p2p, PeerID.from_base58(peer))
        if kind == "forward":
            return await self._rpc(stub.rpc_forward, uid, tensors, {"rid": rid} if rid is not None else {})
        if rid is not None:
            try:
                output = await self._rpc(stub.rpc_backward, uid, tensors[1:], {"rid": rid, "cached": True})
                self.cached_backwards += 1
                return output
            except P2PHandlerError as e:
                if UNKNOWN_REQUEST not in str(e):
                    raise
                self.resent_inputs += 1  # the stock call below; a host lying about it only costs us bandwidth
        return await self._rpc(stub.rpc_backward, uid, tensors, {})

    def _gather(
        self, kind: str, jobs: Sequence[tuple[str, str, Sequence[torch.Tensor]]], timeout: float, request_ids: Sequence[bytes] | None = None
    ) -> list[object]:
        """Run the calls concurrently: per job (uid, peer, tensors), (output, seconds) or the exception it raised.
        request_ids: one per job (see `_run_calls`), or None: nothing kept (forward), inputs sent again (backward)."""

        async def _call(uid: str, peer: str, tensors: Sequence[torch.Tensor], rid: bytes | None) -> torch.Tensor:
            if peer == self.own_peer_id and uid in self.local_backends:
                backend = self.local_backends[uid]
                if kind == "backward" and hasattr(backend, "trusted_backward"):
                    # in this process, under the backend's lock: the host knows these gradients are ours and judges
                    # remote callers' ones by them
                    loop = asyncio.get_running_loop()
                    outputs = await asyncio.wait_for(loop.run_in_executor(None, backend.trusted_backward, *tensors), timeout=timeout)
                    return outputs[0]
                pool = backend.forward_pool if kind == "forward" else backend.backward_pool
                outputs = await asyncio.wait_for(pool.submit_task(*tensors), timeout=timeout)
                return outputs[0]
            # one deadline for the call, a repeat after a cache miss included
            return await asyncio.wait_for(self._remote_call(kind, uid, peer, tensors, rid), timeout=timeout)

        async def _timed(uid: str, peer: str, tensors: Sequence[torch.Tensor], rid: bytes | None) -> tuple[torch.Tensor, float]:
            # this call's own time: the layer's calls run concurrently, and the round lasts as long as the slowest
            started = time.perf_counter()
            output = await _call(uid, peer, tensors, rid)
            return output, time.perf_counter() - started

        async def _all():
            rids = request_ids if request_ids is not None else [None] * len(jobs)
            return await asyncio.gather(*[_timed(*job, rid) for job, rid in zip(jobs, rids)], return_exceptions=True)

        if not jobs:
            return []
        try:
            return list(RemoteExpertWorker.run_coroutine(_all()))
        except Exception as e:
            return [e] * len(jobs)


class _Refresher(PeriodicThread):
    """Looks the experts up again every `update_period` seconds (the first lookup is `start()`'s own)."""

    def __init__(self, dispatcher: RemoteExpertDispatcher):
        super().__init__("expert-refresh", dispatcher.settings.update_period)
        self.dispatcher = dispatcher

    def tick(self) -> None:
        self.dispatcher.refresh()


_DUMMY = torch.empty(0, requires_grad=True)  # makes autograd call backward even if inputs need no grad


@dataclass
class _LayerCall:
    dispatcher: RemoteExpertDispatcher
    uids: list[str]
    peers: list[str]  # where each output came from: forward re-points one when a cross-check shows its replica lied
    request_ids: list[bytes] | None = None  # under which the hosts keep the inputs for the backward (None: not kept)

    def forward(self, inputs: Sequence[torch.Tensor]) -> list[torch.Tensor | None]:
        return self.dispatcher._run_calls(
            "forward", self.uids, self.peers, [[x] for x in inputs], self.dispatcher.settings.forward_timeout, self.request_ids
        )

    def backward(self, inputs: Sequence[torch.Tensor], grads: Sequence[torch.Tensor], answered: Sequence[bool]) -> list[torch.Tensor | None]:
        todo = [i for i, ok in enumerate(answered) if ok]
        tamper = self.dispatcher.tamper
        if tamper is not None:
            grads = [tamper.sent_grads(uid, g) for uid, g in zip(self.uids, grads)]
        results = self.dispatcher._run_calls(
            "backward",
            [self.uids[i] for i in todo],
            [self.peers[i] for i in todo],
            [[inputs[i], grads[i]] for i in todo],
            self.dispatcher.settings.backward_timeout,
            [self.request_ids[i] for i in todo] if self.request_ids is not None else None,
        )
        grad_inputs: list[torch.Tensor | None] = [None] * len(inputs)
        for i, g in zip(todo, results):
            grad_inputs[i] = g
        return grad_inputs


class _RemoteLayerFunction(torch.autograd.Function):
    """All experts of one layer call in parallel: one forward round, one backward round."""

    @staticmethod
    def forward(ctx, dummy: torch.Tensor, call: _LayerCall, *inputs: torch.Tensor):
        detached = [x.detach().cpu() for x in inputs]
        outputs = call.forward(detached)
        ctx.call = call
        ctx.answered = [o is not None for o in outputs]
        ctx.save_for_backward(*detached)
        mask = torch.tensor(ctx.answered, dtype=torch.bool)
        ctx.mark_non_differentiable(mask)
        results = [o.to(x.device, x.dtype) if o is not None else torch.zeros_like(x) for o, x in zip(outputs, inputs)]
        return (mask, *results)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_mask, *grad_outputs):
        inputs = ctx.saved_tensors
        grads = ctx.call.backward(inputs, [g.detach().cpu().contiguous() for g in grad_outputs], ctx.answered)
        grad_inputs = [g if g is not None else torch.zeros_like(x) for g, x in zip(grads, inputs)]
        return (None, None, *grad_inputs)
