"""The expert RPC's front door: a hivemind ConnectionHandler that rejects malformed requests before they reach a
task pool, where one bad tensor would fail a whole merged batch, and callers that send more requests per second
than one peer may.

Lighter traffic for our own router (`dragon_swarm.moe.router`), stock hivemind clients unchanged:

- Replies use the compression the request used (stock hivemind answers in the expert's `outputs_schema`, float32
  here), so a router sending fp16 gets fp16 back. Both sides use `encode_tensor` / `decode_tensors`: fp16 with a
  per-tensor power-of-two scale (`exp` in the message's `metadata`) so small gradients do not underflow; anything
  non-finite travels in float32, so it is refused by the receiver's checks instead of clamped into a plausible value.
- A forward whose `metadata` carries a request id (`rid`) leaves its serialized inputs in an `InputCache` shared by
  all handler processes of the host, keyed by (caller, expert, rid); a backward carrying the same rid and only the
  output gradients reuses them. An unknown or expired rid gets `UNKNOWN_REQUEST` and the router re-sends the inputs.
"""

from __future__ import annotations

import asyncio
import logging
import math
import multiprocessing as mp
import signal
import threading
import time
from collections import OrderedDict
from multiprocessing.managers import BaseManager
from typing import Any, AsyncIterator, Sequence

import hivemind
import torch
from hivemind.compression import deserialize_torch_tensor, serialize_torch_tensor
from hivemind.moe.server.connection_handler import ConnectionHandler
from hivemind.moe.server.module_backend import ModuleBackend
from hivemind.p2p import P2PContext
from hivemind.proto import runtime_pb2
from hivemind.utils import MSGPackSerializer

from dragon_swarm.rate_limit import RateLimiter

logger = logging.getLogger(__name__)

BURST_SECONDS = 5.0  # a caller may spend this many seconds' worth of requests at once (start-up, a slow step's catch-up)
REFUSAL_LOG_PERIOD_S = 10.0  # one log line per throttled caller per this many seconds, not one per request

FLOAT16, NO_COMPRESSION = runtime_pb2.CompressionType.FLOAT16, runtime_pb2.CompressionType.NONE
FP16_MAX = torch.finfo(torch.float16).max
# fp16 tensors are scaled so their largest magnitude lands in [2^14, 2^15): far from overflow (65504), while values
# down to 2^-24 of the largest keep full precision, instead of underflowing where gradients of a mean loss over
# thousands of tokens live (1e-5..1e-7).
FP16_TARGET_EXPONENT = 15
MAX_SCALE_EXPONENT = 100  # |exp| beyond this is refused: 2^±126 is the end of float32, and no honest tensor needs it
UNKNOWN_REQUEST = "unknown request id"  # the router looks for this in the error to re-send the inputs
MAX_REQUEST_ID_BYTES = 64
# How long a forward's inputs wait for their backward, and how much memory they may take on one host (all handlers
# together). A layer's backward comes after the rest of the micro-batch's forward and backward, i.e. after tens of
# sequential expert round trips on a slow link: a minute covers dragon-tiny at 20 Mbit/s with room to spare. 256 MB
# holds ~10 micro-batches of hrm-smoe-125m's layer calls in fp16. Past either limit the router re-sends the inputs.
INPUT_CACHE_SECONDS = 60.0
INPUT_CACHE_MB = 256.0
INPUT_CACHE_CALLER_SHARE = 0.5  # one caller may fill at most this share, so a flood cannot evict everyone else


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
        input_cache_seconds: float = INPUT_CACHE_SECONDS,
        input_cache_mb: float = INPUT_CACHE_MB,
    ):
        """max_requests_per_s: what one caller may send this handler (None: no limit); a host runs several
        handlers, which share the callers' requests, so it passes its own limit divided among them.
        input_cache_seconds, input_cache_mb: see INPUT_CACHE_SECONDS; the handlers of one host (one
        `module_backends` dict) share one cache, as p2pd balances a caller's requests over all of them."""
        super().__init__(dht, module_backends)
        self.hidden_dim, self.max_tokens = hidden_dim, max_tokens
        self.limiter = None if max_requests_per_s is None else RateLimiter(max_requests_per_s, max_requests_per_s * BURST_SECONDS)
        self._refusals: dict[str, tuple[int, float]] = {}  # caller -> (refused since the last log line, its time)
        self._input_cache_settings = (input_cache_seconds, input_cache_mb)
        self.input_cache: InputCache | None = None  # a proxy of the host's shared one, from `start()` on

    def start(self) -> None:
        # the cache's server process is forked here, before the handler itself: then it exists for the handler's
        # whole life and a handler that is built but never started costs nothing
        if self.input_cache is None:
            self.input_cache = _shared_input_cache(self.module_backends, *self._input_cache_settings)
        super().start()

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

    def shutdown(self) -> None:
        super().shutdown()
        if self.input_cache is not None:
            self.input_cache = None
            _release_input_cache(self.module_backends)

    # hivemind's ServicerBase reads the protobuf types from these annotations: keep them
    async def rpc_forward(self, request: runtime_pb2.ExpertRequest, context: P2PContext) -> runtime_pb2.ExpertResponse:
        self._admit(context)
        meta = parse_metadata(request.metadata)
        inputs = decode_tensors(request.tensors, meta.get("exp"))
        expert = self._expert(request.uid)
        check_request_tensors(inputs, 1, self.hidden_dim, self.max_tokens)
        outputs = await expert.forward_pool.submit_task(*inputs)
        if "rid" in meta and self.input_cache is not None:  # only once the forward worked: a failed one gets no backward
            key = (context.remote_id.to_base58(), request.uid, meta["rid"])
            value = (request.tensors[0].SerializeToString(), _exponents(meta, 1)[0])
            try:
                await self._in_executor(self.input_cache.put, key, value, time.monotonic())
            except Exception as e:  # the cache is an optimisation: without it the router re-sends the inputs
                logger.warning(f"Could not keep a forward's inputs: {type(e).__name__}: {e}")
        return self._reply(outputs, request)

    async def rpc_backward(self, request: runtime_pb2.ExpertRequest, context: P2PContext) -> runtime_pb2.ExpertResponse:
        self._admit(context)
        meta = parse_metadata(request.metadata)
        expert = self._expert(request.uid)
        tensors, exponents = list(request.tensors), _exponents(meta, len(request.tensors))
        if meta.get("cached"):  # only the output gradients came: the inputs are the forward's, kept here
            if "rid" not in meta or len(tensors) != 1:
                raise RequestError("a cached backward carries a request id and exactly one tensor (the output gradients)")
            key = (context.remote_id.to_base58(), request.uid, meta["rid"])
            kept = None
            try:
                if self.input_cache is not None:
                    kept = await self._in_executor(self.input_cache.take, key, time.monotonic())
            except Exception as e:
                logger.warning(f"Could not read the kept inputs: {type(e).__name__}: {e}")
            if kept is None:
                raise RequestError(f"{UNKNOWN_REQUEST}: inputs expired, evicted or never seen here; send them again")
            serialized, exponent = kept
            tensors, exponents = [runtime_pb2.Tensor.FromString(serialized), *tensors], [exponent, *exponents]
        inputs_and_grads = decode_tensors(tensors, exponents)
        check_request_tensors(inputs_and_grads, 2, self.hidden_dim, self.max_tokens)
        grad_inputs = await expert.backward_pool.submit_task(*inputs_and_grads)
        return self._reply(grad_inputs, request)

    def _expert(self, uid: str) -> ModuleBackend:
        return self.module_backends[uid]  # a KeyError for an unknown uid, as stock hivemind answers

    @staticmethod
    def _reply(outputs: Sequence[torch.Tensor], request: runtime_pb2.ExpertRequest) -> runtime_pb2.ExpertResponse:
        """Answer in the compression the request's last tensor (the caller's own data, never cached inputs) used;
        scaled only for callers that speak our metadata (stock clients send none and would not undo a scale)."""
        compression = request.tensors[-1].compression
        tensors, exponents = encode_tensors(outputs, compression, scale=bool(request.metadata))
        metadata = MSGPackSerializer.dumps({"exp": exponents}) if any(exponents) else b""
        return runtime_pb2.ExpertResponse(tensors=tensors, metadata=metadata)

    @staticmethod
    async def _in_executor(fn, *args):
        # the cache lives in another process: never block the event loop on its socket
        return await asyncio.get_running_loop().run_in_executor(None, fn, *args)

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


def parse_metadata(raw: bytes) -> dict[str, Any]:
    """A request's or reply's `metadata`: empty (stock hivemind) or a msgpack dict with `rid` (bytes), `cached`
    (bool), `exp` (one int per tensor). Anything else is a RequestError, never a crash of the handler."""
    if not raw:
        return {}
    try:
        meta = MSGPackSerializer.loads(raw)
    except Exception as e:
        raise RequestError(f"unreadable metadata: {type(e).__name__}") from None
    if not isinstance(meta, dict):
        raise RequestError("metadata must be a dict")
    rid = meta.get("rid")
    if rid is not None and not (isinstance(rid, bytes) and 0 < len(rid) <= MAX_REQUEST_ID_BYTES):
        raise RequestError(f"request id must be 1..{MAX_REQUEST_ID_BYTES} bytes")
    exponents = meta.get("exp")
    if exponents is not None and not (
        isinstance(exponents, list) and all(type(e) is int and abs(e) <= MAX_SCALE_EXPONENT for e in exponents)
    ):
        raise RequestError(f"scale exponents must be a list of ints within ±{MAX_SCALE_EXPONENT}")
    return meta


def _exponents(meta: dict[str, Any], count: int) -> list[int]:
    exponents = meta.get("exp") or [0] * count
    if len(exponents) != count:
        raise RequestError(f"{len(exponents)} scale exponent(s) for {count} tensor(s)")
    return list(exponents)


def encode_tensor(tensor: torch.Tensor, compression: int, scale: bool = True) -> tuple[runtime_pb2.Tensor, int]:
    """(serialized tensor, scale exponent): the receiver multiplies by 2^-exp after deserializing.

    FLOAT16: scaled by a power of two (exact in float32) to use fp16's range fully; a tensor with NaN or Inf, or
    (scale=False, for stock clients, which never read an exponent) one past fp16's range, goes in float32 instead, so
    the receiver gets the real values (hivemind would clamp them to ±65504, a plausible-looking number).
    Other compressions are hivemind's own, unscaled."""
    tensor = tensor.detach()
    if compression != FLOAT16:
        return serialize_torch_tensor(tensor, compression), 0
    amax = float(tensor.abs().max()) if tensor.numel() else 0.0
    if not math.isfinite(amax):
        return serialize_torch_tensor(tensor.float(), NO_COMPRESSION), 0
    exponent = 0 if amax == 0.0 or not scale else FP16_TARGET_EXPONENT - math.frexp(amax)[1]
    exponent = max(-MAX_SCALE_EXPONENT, min(MAX_SCALE_EXPONENT, exponent))
    scaled = tensor.float() * (2.0**exponent) if exponent else tensor.float()
    if float(scaled.abs().max() if scaled.numel() else 0.0) > FP16_MAX:  # unscaled, or past the exponent bound
        return serialize_torch_tensor(tensor.float(), NO_COMPRESSION), 0
    return serialize_torch_tensor(scaled, FLOAT16), exponent


def encode_tensors(tensors: Sequence[torch.Tensor], compression: int, scale: bool = True) -> tuple[list[runtime_pb2.Tensor], list[int]]:
    encoded = [encode_tensor(t, compression, scale) for t in tensors]
    return [e[0] for e in encoded], [e[1] for e in encoded]


def decode_tensors(tensors: Sequence[runtime_pb2.Tensor], exponents: Sequence[int] | None = None) -> list[torch.Tensor]:
    """Deserialize (any compression) to float32 where the sender sent a float, undoing `encode_tensor`'s scale."""
    exponents = list(exponents) if exponents else [0] * len(tensors)
    if len(exponents) != len(tensors):
        raise RequestError(f"{len(exponents)} scale exponent(s) for {len(tensors)} tensor(s)")
    out = []
    for proto, exponent in zip(tensors, exponents):
        try:
            tensor = deserialize_torch_tensor(proto)
        except Exception as e:
            raise RequestError(f"undecodable tensor: {type(e).__name__}: {str(e)[:80]}") from None
        if tensor.is_floating_point():
            tensor = tensor.float()
            if exponent:
                tensor = tensor * (2.0**-exponent)
        out.append(tensor.detach())
    return out


class InputCache:
    """Pure store of forwards' serialized inputs awaiting their backward: expiry, a memory bound (oldest evicted
    first) and a per-caller share of it. Keys are (caller, expert uid, request id): a caller can only reach its own
    entries, since the caller is the authenticated libp2p peer id, not something the request claims.

    Thread-safe: one instance serves all handler processes of a host through a multiprocessing manager."""

    def __init__(self, max_bytes: int, ttl_s: float, caller_share: float = INPUT_CACHE_CALLER_SHARE):
        if not max_bytes > 0 or not ttl_s > 0 or not 0 < caller_share <= 1:
            raise ValueError(f"need max_bytes > 0, ttl_s > 0, 0 < caller_share <= 1; got {max_bytes}, {ttl_s}, {caller_share}")
        self.max_bytes, self.ttl_s = int(max_bytes), float(ttl_s)
        self.max_caller_bytes = int(max_bytes * caller_share)
        self._entries: OrderedDict[tuple, tuple[Any, int, float]] = OrderedDict()  # key -> (value, bytes, expiry)
        self._by_caller: dict[str, OrderedDict[tuple, None]] = {}  # caller -> its keys, oldest first
        self._caller_bytes: dict[str, int] = {}
        self.bytes = 0
        self.hits = self.misses = self.evicted = self.expired = self.refused = 0
        self._lock = threading.Lock()

    def put(self, key: tuple[str, str, bytes], value: tuple[bytes, int], now: float) -> bool:
        """Keep `value` (serialized tensor, scale exponent) until now + ttl_s; False when it alone is over the caller's
        share (then it is not kept)."""
        size = len(value[0]) + len(key[2]) + 64  # + a rough per-entry overhead, so tiny entries still count
        caller = key[0]
        with self._lock:
            self._drop(key)
            self._expire(now)
            if size > self.max_caller_bytes:
                self.refused += 1
                return False
            while self._caller_bytes.get(caller, 0) + size > self.max_caller_bytes:
                self._drop(next(iter(self._by_caller[caller])), evicted=True)
            while self.bytes + size > self.max_bytes:
                self._drop(next(iter(self._entries)), evicted=True)
            self._entries[key] = (value, size, now + self.ttl_s)
            self._by_caller.setdefault(caller, OrderedDict())[key] = None
            self._caller_bytes[caller] = self._caller_bytes.get(caller, 0) + size
            self.bytes += size
            return True

    def take(self, key: tuple[str, str, bytes], now: float) -> tuple[bytes, int] | None:
        """The value kept under `key`, removed (one backward per forward); None when unknown or expired."""
        with self._lock:
            self._expire(now)
            entry = self._entries.get(key)
            if entry is None:
                self.misses += 1
                return None
            self._drop(key)
            self.hits += 1
            return entry[0]

    def clear(self) -> None:
        with self._lock:
            for key in list(self._entries):
                self._drop(key)

    def stats(self) -> dict[str, int]:
        with self._lock:
            return dict(entries=len(self._entries), bytes=self.bytes, hits=self.hits, misses=self.misses,
                        evicted=self.evicted, expired=self.expired, refused=self.refused)  # fmt: skip

    def _expire(self, now: float) -> None:
        # one ttl for all: insertion order is expiry order
        while self._entries:
            key, (_, _, expiry) = next(iter(self._entries.items()))
            if expiry > now:
                break
            self._drop(key)
            self.expired += 1

    def _drop(self, key: tuple, evicted: bool = False) -> None:
        entry = self._entries.pop(key, None)
        if entry is None:
            return
        caller = key[0]
        self.bytes -= entry[1]
        self._caller_bytes[caller] -= entry[1]
        del self._by_caller[caller][key]
        if not self._by_caller[caller]:
            del self._by_caller[caller], self._caller_bytes[caller]
        self.evicted += int(evicted)


class _CacheManager(BaseManager):
    pass


_CacheManager.register("InputCache", InputCache)
# module_backends dict id -> [manager, cache proxy, handlers using it]: the handlers of one host are built from one
# dict (in the host's process, before they fork), so they find and share one cache.
_SHARED_CACHES: dict[int, list] = {}
_SHARED_LOCK = threading.Lock()


def _shared_input_cache(module_backends: dict, ttl_s: float, cache_mb: float):
    with _SHARED_LOCK:
        shared = _SHARED_CACHES.get(id(module_backends))
        if shared is None:
            # forked like hivemind's own handlers: a spawned server would import torch again (~1 s, ~200 MB)
            manager = _CacheManager(ctx=mp.get_context("fork"))
            # Ctrl-C reaches the whole process group: the cache must outlive the handlers' graceful shutdown
            manager.start(initializer=signal.signal, initargs=(signal.SIGINT, signal.SIG_IGN))
            shared = _SHARED_CACHES[id(module_backends)] = [manager, manager.InputCache(int(cache_mb * 2**20), ttl_s), 0]
        shared[2] += 1
        return shared[1]


def _release_input_cache(module_backends: dict) -> None:
    with _SHARED_LOCK:
        shared = _SHARED_CACHES.get(id(module_backends))
        if shared is None:
            return
        shared[2] -= 1
        if shared[2] <= 0:
            del _SHARED_CACHES[id(module_backends)]
            shared[0].shutdown()
