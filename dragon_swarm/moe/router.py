"""Routes MoE tokens to experts found in the DHT, one replica per expert, never waiting past a deadline.

The model asks two things (see `dragon_swarm.model.dispatch.ExpertDispatcher`): which experts are alive, and
"run these token groups through these experts". Experts that fail, answer late or answer garbage are skipped
(the model renormalizes over the experts that answered) and their host is banned for a while.
"""

from __future__ import annotations

import asyncio
import logging
import random
import threading
import time
from dataclasses import dataclass, field
from typing import Mapping, Sequence

import hivemind
import torch
from hivemind.compression import deserialize_torch_tensor, serialize_torch_tensor
from hivemind.moe.client.expert import get_server_stub
from hivemind.moe.client.remote_expert_worker import RemoteExpertWorker
from hivemind.moe.server.module_backend import ModuleBackend
from hivemind.p2p import PeerID
from hivemind.proto import runtime_pb2
from torch.autograd.function import once_differentiable

from dragon_swarm.background import PeriodicThread
from dragon_swarm.config import ExpertsSection
from dragon_swarm.moe.backend import ExpertTamper
from dragon_swarm.moe.expert_uids import all_expert_uids, expert_uid
from dragon_swarm.moe.registry import Replica, find_replicas

logger = logging.getLogger(__name__)

NO_COMPRESSION = runtime_pb2.CompressionType.NONE


@dataclass
class ReplicaTable:
    """Pure bookkeeping of replicas, latency EMAs and bans; no network here.

    `latency` is each replica's own answer time (one RPC, measured by the router per call), so replicas called
    together in one layer round can still be told apart.
    """

    ban_seconds: float
    latency_alpha: float = 0.3
    replicas: dict[str, list[str]] = field(default_factory=dict)  # uid -> peer ids (base58)
    latency: dict[str, float] = field(default_factory=dict)  # peer id -> EMA seconds
    banned_until: dict[str, float] = field(default_factory=dict)

    def update(self, found: dict[str, list[Replica]]) -> None:
        self.replicas = {uid: [r.record.peer_id for r in reps] for uid, reps in found.items()}

    def usable(self, uid: str, now: float) -> list[str]:
        return [p for p in self.replicas.get(uid, ()) if self.banned_until.get(p, 0.0) <= now]

    def choose(self, uid: str, now: float, rng: random.Random) -> str | None:
        """Lowest latency EMA first; replicas never measured go first so every replica gets tried."""
        candidates = self.usable(uid, now)
        if not candidates:
            return None
        best = min(self.latency.get(p, 0.0) for p in candidates)
        return rng.choice([p for p in candidates if self.latency.get(p, 0.0) == best])

    def record_success(self, peer_id: str, seconds: float) -> None:
        old = self.latency.get(peer_id)
        self.latency[peer_id] = seconds if old is None else (1 - self.latency_alpha) * old + self.latency_alpha * seconds

    def record_failure(self, peer_id: str, now: float) -> None:
        self.banned_until[peer_id] = now + self.ban_seconds


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
    ):
        """local_backends: experts this very peer hosts; libp2p cannot dial itself, so those calls go straight
        into the host's task pools (same runtime, same optimizer) instead of over the network."""
        self.dht, self.prefix, self.settings, self.d_model = dht, prefix, settings, d_model
        self.local_backends = dict(local_backends or {})
        self.tamper = tamper  # TEST/BENCHMARK ONLY: a Byzantine trainer's gradient attack (dragon_swarm.attacks)
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
        call = _LayerCall(self, [expert_uid(self.prefix, layer, i) for i in indices], peers)
        answered_mask, *outputs = _RemoteLayerFunction.apply(_DUMMY, call, *[inputs[i] for i in indices])
        return {index: out for index, out, ok in zip(indices, outputs, answered_mask.tolist()) if ok}

    # --- RPC plumbing ---

    def _run_calls(self, kind: str, uids: Sequence[str], peers: Sequence[str], payloads: Sequence[Sequence[torch.Tensor]], timeout: float) -> list[torch.Tensor | None]:
        async def _call(uid: str, peer: str, tensors: Sequence[torch.Tensor]) -> torch.Tensor:
            if peer == self.own_peer_id and uid in self.local_backends:
                backend = self.local_backends[uid]
                pool = backend.forward_pool if kind == "forward" else backend.backward_pool
                outputs = await asyncio.wait_for(pool.submit_task(*tensors), timeout=timeout)
                return outputs[0]
            stub = get_server_stub(self._p2p, PeerID.from_base58(peer))
            request = runtime_pb2.ExpertRequest(uid=uid, tensors=[serialize_torch_tensor(t, NO_COMPRESSION) for t in tensors])
            rpc = stub.rpc_forward if kind == "forward" else stub.rpc_backward
            response = await asyncio.wait_for(rpc(request), timeout=timeout)
            return deserialize_torch_tensor(response.tensors[0])

        async def _timed(uid: str, peer: str, tensors: Sequence[torch.Tensor]) -> tuple[torch.Tensor, float]:
            # this call's own time: the layer's calls run concurrently, and the round lasts as long as the slowest
            started = time.perf_counter()
            output = await _call(uid, peer, tensors)
            return output, time.perf_counter() - started

        async def _all():
            return await asyncio.gather(*[_timed(u, p, t) for u, p, t in zip(uids, peers, payloads)], return_exceptions=True)

        try:
            results = RemoteExpertWorker.run_coroutine(_all())
        except Exception as e:
            results = [e] * len(uids)
        outputs: list[torch.Tensor | None] = []
        now = time.time()
        with self._lock:
            for uid, peer, payload, result in zip(uids, peers, payloads, results):
                self.calls += 1
                output, seconds = result if isinstance(result, tuple) else (result, None)
                problem = _check_output(output, payload[0].shape)
                if problem is None:
                    self.table.record_success(peer, seconds)
                    outputs.append(output)
                else:
                    self.failures += 1
                    self.table.record_failure(peer, now)
                    logger.warning(f"Expert {uid} on {peer[-8:]} {kind} failed ({problem}); skipping it, host banned for {self.table.ban_seconds:.0f} s")
                    outputs.append(None)
        return outputs


class _Refresher(PeriodicThread):
    """Looks the experts up again every `update_period` seconds (the first lookup is `start()`'s own)."""

    def __init__(self, dispatcher: RemoteExpertDispatcher):
        super().__init__("expert-refresh", dispatcher.settings.update_period)
        self.dispatcher = dispatcher

    def tick(self) -> None:
        self.dispatcher.refresh()


def _check_output(result: object, expected_shape: torch.Size) -> str | None:
    if isinstance(result, BaseException):
        return f"{type(result).__name__}: {str(result)[:120]}" if str(result) else type(result).__name__
    if not isinstance(result, torch.Tensor) or result.shape != expected_shape:
        return f"wrong output shape {getattr(result, 'shape', None)}, expected {tuple(expected_shape)}"
    if not torch.isfinite(result).all():
        return "non-finite output"
    return None


_DUMMY = torch.empty(0, requires_grad=True)  # makes autograd call backward even if inputs need no grad


@dataclass
class _LayerCall:
    dispatcher: RemoteExpertDispatcher
    uids: list[str]
    peers: list[str]

    def forward(self, inputs: Sequence[torch.Tensor]) -> list[torch.Tensor | None]:
        return self.dispatcher._run_calls("forward", self.uids, self.peers, [[x] for x in inputs], self.dispatcher.settings.forward_timeout)

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
