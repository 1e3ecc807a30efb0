"""The expert RPC's front door: a hivemind ConnectionHandler that rejects malformed requests before they reach a
task pool, where one bad tensor would fail a whole merged batch, and callers that send more requests per second
than one peer may."""

from __future__ import annotations

import logging
import time
from typing import AsyncIterator, Hashable, Sequence

import hivemind
import torch
from hivemind.moe.server.connection_handler import ConnectionHandler
from hivemind.moe.server.module_backend import ModuleBackend
from hivemind.p2p import P2PContext
from hivemind.proto import runtime_pb2

logger = logging.getLogger(__name__)

BURST_SECONDS = 5.0  # a caller may spend this many seconds' worth of requests at once (start-up, a slow step's catch-up)
REFUSAL_LOG_PERIOD_S = 10.0  # one log line per throttled caller per this many seconds, not one per request


class RequestError(ValueError):
    """A malformed expert request; the caller gets this message, the host stays up."""


class ValidatingConnectionHandler(ConnectionHandler):
    """Rejects malformed requests before they reach a task pool, where one bad tensor would fail a whole batch
    (and stock hivemind can leave the caller waiting forever)."""

    def __init__(
        self,
        dht: hivemind.DHT,
        module_backends: dict[str, ModuleBackend],
        *,
        hidden_dim: int,
        max_tokens: int,
        max_requests_per_s: float | None = None,
    ):
        """max_requests_per_s: what one caller may send this handler (None: no limit); a host runs several
        handlers, which share the callers' requests, so it passes its own limit divided among them."""
        super().__init__(dht, module_backends)
        self.hidden_dim, self.max_tokens = hidden_dim, max_tokens
        self.limiter = None if max_requests_per_s is None else RateLimiter(max_requests_per_s, max_requests_per_s * BURST_SECONDS)
        self._refusals: dict[str, tuple[int, float]] = {}  # caller -> (refused since the last log line, its time)

    def _admit(self, context: P2PContext) -> None:
        if self.limiter is None:
            return
        caller = str(context.remote_id)
        now = time.monotonic()
        if self.limiter.take(caller, now):
            return
        refused, logged_at = self._refusals.get(caller, (0, -REFUSAL_LOG_PERIOD_S))
        refused += 1
        if now - logged_at >= REFUSAL_LOG_PERIOD_S:
            logger.warning(f"Throttling {caller}: over {self.limiter.rate:g} expert requests/s; refused {refused} request(s) in the last {min(now - logged_at, REFUSAL_LOG_PERIOD_S):.0f} s")
            refused, logged_at = 0, now
        self._refusals[caller] = (refused, logged_at)
        raise RequestError(f"rate limit: more than {self.limiter.rate:g} requests/s from this peer; slow down")

    # hivemind's ServicerBase reads the protobuf types from these annotations: keep them
    async def rpc_forward(self, request: runtime_pb2.ExpertRequest, context: P2PContext) -> runtime_pb2.ExpertResponse:
        self._admit(context)
        return await super().rpc_forward(request, context)

    async def rpc_backward(self, request: runtime_pb2.ExpertRequest, context: P2PContext) -> runtime_pb2.ExpertResponse:
        self._admit(context)
        return await super().rpc_backward(request, context)

    async def rpc_forward_stream(
        self, requests: AsyncIterator[runtime_pb2.ExpertRequest], context: P2PContext
    ) -> AsyncIterator[runtime_pb2.ExpertResponse]:
        self._admit(context)
        async for response in super().rpc_forward_stream(requests, context):
            yield response

    async def rpc_backward_stream(
        self, requests: AsyncIterator[runtime_pb2.ExpertRequest], context: P2PContext
    ) -> AsyncIterator[runtime_pb2.ExpertResponse]:
        self._admit(context)
        async for response in super().rpc_backward_stream(requests, context):
            yield response

    @classmethod
    def _get_handle_name(cls, namespace, method_name):
        # answer under stock hivemind's protocol names, so stock RemoteExpert clients reach us
        return ConnectionHandler._get_handle_name(namespace, method_name)

    async def _process_inputs(self, inputs, pool, schema):
        expected_count = 2 if pool.name.endswith("_backward") else 1
        check_request_tensors(inputs, expected_count, self.hidden_dim, self.max_tokens)
        return await super()._process_inputs(inputs, pool, schema)


def check_request_tensors(inputs: Sequence[torch.Tensor], expected_count: int, hidden_dim: int, max_tokens: int) -> None:
    """Pure check of one request: count, shape [n, hidden], float dtype, size limit, finite values."""
    if len(inputs) != expected_count:
        raise RequestError(f"expected {expected_count} tensor(s), got {len(inputs)}")
    first_rows = inputs[0].shape[0] if inputs[0].ndim == 2 else None
    for tensor in inputs:
        if tensor.ndim != 2 or tensor.shape[1] != hidden_dim:
            raise RequestError(f"expected shape [tokens, {hidden_dim}], got {list(tensor.shape)}")
        if tensor.shape[0] != first_rows:
            raise RequestError("tensors of one request must have the same number of tokens")
        if not 0 < tensor.shape[0] <= max_tokens:
            raise RequestError(f"request has {tensor.shape[0]} tokens; allowed 1..{max_tokens}")
        if not tensor.is_floating_point():
            raise RequestError(f"expected a floating point tensor, got {tensor.dtype}")
        if not torch.isfinite(tensor).all():
            raise RequestError("request contains NaN or Inf")


class RateLimiter:
    """Pure per-key token buckets: each key earns `rate` tokens per second up to `burst`; a request costs one.

    Keys idle long enough to have refilled their bucket are forgotten once there are many, so a stream of new
    callers cannot grow the table without bound."""

    MAX_KEYS = 4096

    def __init__(self, rate: float, burst: float):
        if not rate > 0 or not burst >= 1:
            raise ValueError(f"rate must be > 0 and burst >= 1, got rate {rate!r}, burst {burst!r}")
        self.rate, self.burst = float(rate), float(burst)
        self.buckets: dict[Hashable, tuple[float, float]] = {}  # key -> (tokens, time they were counted)

    def take(self, key: Hashable, now: float) -> bool:
        """Spend one token of `key`'s bucket at time `now` (seconds, monotonic); False when it is empty."""
        tokens, then = self.buckets.get(key, (self.burst, now))
        tokens = min(self.burst, tokens + max(0.0, now - then) * self.rate)
        allowed = tokens >= 1.0
        self.buckets[key] = (tokens - 1.0 if allowed else tokens, now)
        if len(self.buckets) > self.MAX_KEYS:
            self._forget_full(now)
        return allowed

    def _forget_full(self, now: float) -> None:
        full = [k for k, (tokens, then) in self.buckets.items() if tokens + (now - then) * self.rate >= self.burst]
        for key in full:
            del self.buckets[key]
