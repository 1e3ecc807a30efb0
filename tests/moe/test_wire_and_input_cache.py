"""The expert wire format (fp16 with a per-tensor scale, float32 fallback) and the host's cache of forward inputs."""

import multiprocessing as mp

import pytest
import torch
from hivemind.compression import serialize_torch_tensor
from hivemind.utils import MSGPackSerializer

from dragon_swarm.moe import handler
from dragon_swarm.moe.handler import (
    FLOAT16,
    NO_COMPRESSION,
    InputCache,
    RequestError,
    check_request_tensors,
    decode_tensors,
    encode_tensor,
    encode_tensors,
    parse_metadata,
)

# --- the wire format ---


@pytest.mark.parametrize("scale", [1e-7, 1e-3, 1.0, 1e3, 1e30])
def test_fp16_round_trip_keeps_relative_precision_at_any_scale(scale):
    x = torch.randn(16, 8) * scale  # 1e-7: gradients of a mean loss over many tokens; 1e30: far past fp16's 65504
    proto, exponent = encode_tensor(x, FLOAT16)
    assert proto.compression == FLOAT16 and len(proto.buffer) == x.numel() * 2
    (y,) = decode_tensors([proto], [exponent])
    assert y.dtype == torch.float32 and torch.isfinite(y).all()
    assert torch.allclose(y, x, rtol=1e-3, atol=scale * 1e-4)


def test_plain_fp16_would_lose_these_values():
    """Why the scale: hivemind's own FLOAT16 flushes tiny gradients to zero and clamps big values to 65504."""
    tiny, big = torch.full((4,), 1e-8), torch.full((4,), 1e6)
    assert (decode_tensors([serialize_torch_tensor(tiny, FLOAT16)])[0] == 0).all()
    assert (decode_tensors([serialize_torch_tensor(big, FLOAT16)])[0] < 7e4).all()


def test_float32_wire_is_exact_and_zero_tensors_are_fine():
    x = torch.randn(5, 3)
    proto, exponent = encode_tensor(x, NO_COMPRESSION)
    assert proto.compression == NO_COMPRESSION and exponent == 0
    assert torch.equal(decode_tensors([proto])[0], x)
    proto, exponent = encode_tensor(torch.zeros(2, 3), FLOAT16)
    assert exponent == 0 and torch.equal(decode_tensors([proto], [exponent])[0], torch.zeros(2, 3))


def test_unscaled_fp16_for_stock_clients_falls_back_to_float32_past_the_range():
    """Stock hivemind clients never read our exponent: a host answering one in fp16 must not scale, nor clamp."""
    small, big = torch.randn(4, 8), torch.randn(4, 8) * 1e6
    proto, exponent = encode_tensor(small, FLOAT16, scale=False)
    assert (proto.compression, exponent) == (FLOAT16, 0)
    assert torch.allclose(decode_tensors([proto])[0], small, rtol=1e-3, atol=1e-3)
    proto, exponent = encode_tensor(big, FLOAT16, scale=False)
    assert (proto.compression, exponent) == (NO_COMPRESSION, 0) and torch.equal(decode_tensors([proto])[0], big)


@pytest.mark.parametrize("bad", [float("inf"), float("-inf"), float("nan")])
def test_non_finite_values_travel_as_they_are_and_are_refused(bad):
    """fp16 must not turn an Inf into a plausible 65504: the tensor goes in float32 and the host's check refuses it."""
    x = torch.randn(3, 8)
    x[1, 2] = bad
    tensors, exponents = encode_tensors([x], FLOAT16)
    assert tensors[0].compression == NO_COMPRESSION and exponents == [0]
    received = decode_tensors(tensors, exponents)
    assert not torch.isfinite(received[0][1, 2])
    with pytest.raises(RequestError, match="NaN or Inf"):
        check_request_tensors(received, 1, 8, 10)


def test_an_infinite_fp16_buffer_from_a_forger_is_refused():
    forged = serialize_torch_tensor(torch.ones(3, 8), FLOAT16)
    forged.buffer = torch.full((3, 8), float("inf"), dtype=torch.float16).numpy().tobytes()
    with pytest.raises(RequestError, match="NaN or Inf"):
        check_request_tensors(decode_tensors([forged]), 1, 8, 10)


@pytest.mark.parametrize(
    "raw, message",
    [
        (b"\xc1garbage", "unreadable metadata"),
        (MSGPackSerializer.dumps([1, 2]), "must be a dict"),
        (MSGPackSerializer.dumps({"rid": "text"}), "request id"),
        (MSGPackSerializer.dumps({"rid": b"x" * 65}), "request id"),
        (MSGPackSerializer.dumps({"exp": [1000]}), "scale exponents"),
        (MSGPackSerializer.dumps({"exp": [1.5]}), "scale exponents"),
    ],
)
def test_bad_metadata_is_a_request_error(raw, message):
    with pytest.raises(RequestError, match=message):
        parse_metadata(raw)


def test_metadata_round_trip_and_stock_empty_metadata():
    assert parse_metadata(b"") == {}
    meta = {"rid": b"\x01" * 16, "cached": True, "exp": [3, -2]}
    assert parse_metadata(MSGPackSerializer.dumps(meta)) == meta


def test_exponent_count_must_match_tensors():
    with pytest.raises(RequestError, match="exponent"):
        decode_tensors([serialize_torch_tensor(torch.ones(2), FLOAT16)], [1, 2])


# --- the input cache ---

A, B = "peerA", "peerB"


def key(caller: str, rid: bytes, uid: str = "e.0.0") -> tuple[str, str, bytes]:
    return (caller, uid, rid)


def value(n: int) -> tuple[bytes, int]:
    return (b"x" * n, 0)


def test_take_returns_once_and_only_to_the_caller_that_put():
    cache = InputCache(max_bytes=10_000, ttl_s=10.0)
    assert cache.put(key(A, b"1"), value(100), now=0.0)
    assert cache.take(key(B, b"1"), now=1.0) is None  # another peer guessing the id gets nothing
    assert cache.take(key(A, b"1", uid="e.0.1"), now=1.0) is None  # nor does another expert
    assert cache.take(key(A, b"1"), now=1.0) == value(100)
    assert cache.take(key(A, b"1"), now=1.0) is None  # one backward per forward
    assert cache.stats()["hits"] == 1 and cache.stats()["misses"] == 3 and cache.bytes == 0


def test_entries_expire_after_ttl():
    cache = InputCache(max_bytes=10_000, ttl_s=5.0)
    cache.put(key(A, b"old"), value(10), now=0.0)
    cache.put(key(A, b"new"), value(10), now=3.0)
    assert cache.take(key(A, b"old"), now=5.0) is None
    assert cache.take(key(A, b"new"), now=5.0) == value(10)
    assert cache.stats()["expired"] == 1 and cache.stats()["entries"] == 0


def test_memory_bound_evicts_the_oldest_first():
    cache = InputCache(max_bytes=1000, ttl_s=100.0, caller_share=1.0)
    for i in range(5):  # each entry counts 200 bytes of value + id + overhead: room for 3
        cache.put(key(A if i % 2 else B, bytes([i])), value(200), now=float(i))
    assert cache.bytes <= 1000
    assert [cache.take(key(A if i % 2 else B, bytes([i])), now=5.0) is not None for i in range(5)] == [False, False, True, True, True]
    assert cache.stats()["evicted"] == 2


def test_one_caller_cannot_evict_everyone_else():
    cache = InputCache(max_bytes=1000, ttl_s=100.0, caller_share=0.5)
    cache.put(key(B, b"b"), value(200), now=0.0)
    for i in range(20):  # a flood from A only ever evicts A's own entries
        cache.put(key(A, bytes([i])), value(100), now=1.0 + i)
    assert cache.take(key(B, b"b"), now=30.0) == value(200)
    assert cache.take(key(A, bytes([19])), now=30.0) is not None and cache.take(key(A, bytes([0])), now=30.0) is None


def test_an_entry_over_the_callers_share_is_not_kept():
    cache = InputCache(max_bytes=1000, ttl_s=100.0, caller_share=0.5)
    assert not cache.put(key(A, b"big"), value(600), now=0.0)
    assert cache.take(key(A, b"big"), now=0.0) is None and cache.stats()["refused"] == 1


def _put_from_child(cache, rid: bytes) -> None:
    cache.put((A, "e.0.0", rid), (b"from child", 0), 0.0)


def test_handlers_of_one_host_share_one_cache_across_processes():
    """p2pd balances requests over a host's handler processes: a backward must find what another handler kept."""
    backends: dict = {}
    first = handler._shared_input_cache(backends, 60.0, 1.0)
    second = handler._shared_input_cache(backends, 60.0, 1.0)
    try:
        child = mp.get_context("fork").Process(target=_put_from_child, args=(first, b"rid"))
        child.start()
        child.join(30)
        assert child.exitcode == 0
        assert second.take((A, "e.0.0", b"rid"), 1.0) == (b"from child", 0)
        other: dict = {}
        assert handler._shared_input_cache(other, 60.0, 1.0).take((A, "e.0.0", b"rid"), 1.0) is None  # another host's
        handler._release_input_cache(other)
    finally:
        handler._release_input_cache(backends)
        assert id(backends) in handler._SHARED_CACHES  # one handler still uses it
        handler._release_input_cache(backends)
        assert id(backends) not in handler._SHARED_CACHES
