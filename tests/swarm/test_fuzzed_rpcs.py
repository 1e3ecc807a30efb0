"""Every RPC a peer serves gets malformed, truncated, oversized and random messages from a stranger: the peer
answers with an error or drops the stream, stays up, and keeps serving honest peers (issue 12, item 6).

Real hivemind DHTs and p2pd on loopback, in this process: an expert host (forward, backward, info over hivemind's
MoE RPC through our validating handler), its expert state service, two robust averagers (matchmaking,
all-reduce parts, state download) and a trainer's verification service (round records). The fuzzer opens raw libp2p streams and unary calls by protocol name, so the
bytes never pass through a protobuf serializer first.
"""

from __future__ import annotations

import asyncio
import random
import struct
from typing import AsyncIterator

import pytest
import torch
from hivemind.moe.client.remote_expert_worker import RemoteExpertWorker
from hivemind.moe.server.connection_handler import ConnectionHandler
from hivemind.p2p import P2PContext, PeerID
from hivemind.p2p.p2p_daemon_bindings.utils import P2PHandlerError
from hivemind.proto import runtime_pb2

from dragon_swarm.averaging.robust_allreduce import RobustDecentralizedAverager
from dragon_swarm.config import load_config
from dragon_swarm.moe import expert_state, state_service
from dragon_swarm.moe.backend import build_expert_backends
from dragon_swarm.moe.host import ExpertHost
from dragon_swarm.moe.state_service import ExpertStateService, ExpertStateServicer
from dragon_swarm.swarm.dht_node import start_dht, visible_maddrs
from dragon_swarm.verification.commitment import RoundRecord
from dragon_swarm.verification.service import RoundRecordServicer, VerificationService
from tests.swarm.paths import TEST_CONFIG
from tests.swarm.shutdowns import shutdowns

pytestmark = pytest.mark.swarm

CONFIG = load_config(str(TEST_CONFIG))
D = CONFIG.model.d_model
UID = f"{CONFIG.expert_prefix}.0.0"
PREFIX = "fuzz_averaging"
NAMESPACE = f"{CONFIG.run_prefix}.experts"
VERIFYING = CONFIG.model_copy(update={"verification": CONFIG.verification.model_copy(update={"enabled": True})})
VERIFY_PREFIX = f"{CONFIG.run_prefix}_verify"


def payloads(rng: random.Random) -> list[bytes]:
    """What a hostile or broken peer may send: nothing, junk, truncated frames, lying length prefixes, huge ones."""
    junk = [bytes(rng.getrandbits(8) for _ in range(n)) for n in (1, 7, 64, 4096)]
    return [
        b"",
        *junk,
        b"\x0a\xff\xff\xff\xff\x0f",  # a protobuf field claiming a 4 GB string
        struct.pack("<Q", 2**40) + b"x",  # a length prefix far beyond what follows
        b"\x08" * 100_000,  # 100 kB of varint continuation bytes
        b"\x00" * (2 << 20),  # 2 MB of zeros
    ]


@pytest.fixture(scope="module")
def swarm():
    with shutdowns() as later:
        host_dht = start_dht()
        later(host_dht.shutdown)
        backends = build_expert_backends([UID], D, CONFIG.model.expert_hidden, CONFIG.training, 64, CONFIG.swarm.seed)
        host = ExpertHost(host_dht, backends, CONFIG.experts, hidden_dim=D, checkpoint_dir=None, throughput=100.0)
        host.start()
        later(host.shutdown)
        service = ExpertStateService(host_dht, NAMESPACE, backends.get)
        service.start()
        later(service.shutdown)
        other_dht = start_dht(initial_peers=visible_maddrs(host_dht))
        later(other_dht.shutdown)
        averagers = []
        for dht in (host_dht, other_dht):
            averager = RobustDecentralizedAverager(
                [torch.zeros(1000)], dht, prefix=PREFIX, start=True, min_matchmaking_time=2.0, request_timeout=1.0,
                target_group_size=2,
            )  # fmt: skip
            later(averager.shutdown)
            averagers.append(averager)
        verification = VerificationService(VERIFYING, host_dht, batch_of_peer=lambda peer: None, ban=lambda peer, why: None)
        later(verification.shutdown)
        record = RoundRecord(3, [7], [8], {}, [b"transcript"], {"w": torch.arange(6.0)}, {"w": torch.ones(6)})
        verification.commit(record)
        fuzzer_dht = start_dht(initial_peers=visible_maddrs(host_dht))
        later(fuzzer_dht.shutdown)
        yield host_dht, host, backends, service, averagers, fuzzer_dht, record


def handler_names() -> list[tuple[str, bool]]:
    """(protocol name, unary?) of every RPC this peer serves."""
    names = []
    for servicer, namespace in (
        (ConnectionHandler, None),
        (ExpertStateServicer, NAMESPACE),
        (RobustDecentralizedAverager, PREFIX),
        (RoundRecordServicer, VERIFY_PREFIX),
    ):
        servicer._collect_rpc_handlers()
        for handler in servicer._rpc_handlers:
            unary = not handler.stream_input and not handler.stream_output
            names.append((servicer._get_handle_name(namespace, handler.method_name), unary))
    return names


async def _fuzz_one(p2p, peer: PeerID, name: str, unary: bool, data: bytes) -> str:
    """Send `data` raw; return what happened (never raises: the point is that the *server* survives)."""
    try:
        if unary:
            await asyncio.wait_for(p2p._client.call_unary_handler(peer, name, data), timeout=10)
            return "answered"
        _, reader, writer = await asyncio.wait_for(p2p.call_binary_stream_handler(peer, name), timeout=10)
        writer.write(data)
        await writer.drain()
        writer.write_eof() if writer.can_write_eof() else None
        reply = await asyncio.wait_for(reader.read(1 << 16), timeout=10)
        writer.close()
        return f"stream reply {len(reply)} bytes"
    except (P2PHandlerError, asyncio.TimeoutError, ConnectionError, OSError, asyncio.IncompleteReadError) as e:
        return type(e).__name__
    except Exception as e:  # anything else on the client side is fine too, as long as the server lives
        return f"client {type(e).__name__}"


def test_every_rpc_survives_garbage_and_keeps_serving_honest_peers(swarm):
    host_dht, host, backends, service, averagers, fuzzer_dht, record = swarm
    p2p = RemoteExpertWorker.run_coroutine(fuzzer_dht.replicate_p2p())
    target = host_dht.peer_id
    names = handler_names()
    assert {n for n, _ in names} >= {
        "ConnectionHandler.rpc_forward", "ConnectionHandler.rpc_backward", "ConnectionHandler.rpc_info",
        f"{NAMESPACE}::ExpertStateServicer.rpc_download_expert",
        f"{PREFIX}::RobustDecentralizedAverager.rpc_join_group",
        f"{PREFIX}::RobustDecentralizedAverager.rpc_aggregate_part",
        f"{PREFIX}::RobustDecentralizedAverager.rpc_download_state",
        f"{VERIFY_PREFIX}::RoundRecordServicer.rpc_round_record",
    }  # fmt: skip
    # the raw path reaches the real handlers: a well-formed request sent the same way is answered
    from hivemind.compression import serialize_torch_tensor
    from hivemind.proto import runtime_pb2

    valid = runtime_pb2.ExpertRequest(uid=UID, tensors=[serialize_torch_tensor(torch.randn(2, D))]).SerializeToString()
    name = "ConnectionHandler.rpc_forward"
    assert RemoteExpertWorker.run_coroutine(_fuzz_one(p2p, target, name, True, valid)) == "answered"
    assert RemoteExpertWorker.run_coroutine(_fuzz_one(p2p, target, name, True, valid[:-5])) == "P2PHandlerError"
    rng = random.Random(0)
    outcomes = {}
    for name, unary in names:
        for data in payloads(rng):
            outcomes[(name, len(data))] = RemoteExpertWorker.run_coroutine(_fuzz_one(p2p, target, name, unary, data))

    # everything is still alive and serving
    assert host_dht.is_alive() and all(h.is_alive() for h in host.handlers) and host.runtime.is_alive()
    assert all(a.is_alive() for a in averagers)
    from hivemind.moe.client.expert import RemoteExpert
    from hivemind.moe.expert_uid import ExpertInfo

    expert = RemoteExpert(ExpertInfo(UID, target), p2p)
    x = torch.randn(3, D)
    assert torch.allclose(expert(x), backends[UID].module(x), atol=1e-4)  # honest forward, right answer

    client = ExpertStateService(fuzzer_dht, NAMESPACE, lambda uid: None)
    client.start()
    try:
        template = expert_state.make_template(D, CONFIG.model.expert_hidden, CONFIG.training)
        state = client.fetch(target.to_base58(), UID, template, timeout=30)
        assert state.version == backends[UID].version
    finally:
        client.shutdown()

    # a drawn checker still gets the committed round record, byte for byte
    checker = VerificationService(VERIFYING, fuzzer_dht, batch_of_peer=lambda peer: None, ban=lambda peer, why: None)
    try:
        data = checker.fetch_record(target.to_base58(), target.to_base58(), record.epoch)
        assert data == record.to_bytes() and RoundRecord.from_bytes(data).opens(record.commitment()) is None
    finally:
        checker.shutdown()

    # an honest all-reduce between the two averagers still works after the garbage
    for value, averager in zip((1.0, 3.0), averagers):
        with averager.get_tensors() as tensors:
            tensors[0].fill_(value)
    controls = [a.step(wait=False, timeout=30) for a in averagers]
    results = [c.result(timeout=60) for c in controls]
    assert all(r is not None for r in results), outcomes
    for averager in averagers:
        with averager.get_tensors() as tensors:
            assert torch.allclose(tensors[0], torch.full((1000,), 2.0))


def _cutting_servicer(backends, cut_answers: int):
    """A state servicer whose first `cut_answers` answers stop halfway, as hivemind hands a client a stream reset
    mid-answer: a clean end after fewer bytes than were announced. Same class name, so the stock stub reaches it."""

    class ExpertStateServicer(state_service.ExpertStateServicer):
        answers = 0

        async def rpc_download_expert(self, request: runtime_pb2.ExpertUID, context: P2PContext) -> AsyncIterator[runtime_pb2.ExpertResponse]:
            messages = [m async for m in super().rpc_download_expert(request, context)]
            data = b"".join(m.metadata for m in messages[1:])
            type(self).answers += 1
            yield messages[0]  # the size header, honest
            yield runtime_pb2.ExpertResponse(metadata=data[: len(data) // 2] if self.answers <= cut_answers else data)

    return ExpertStateServicer(backends.get)


def test_a_state_answer_cut_short_is_named_and_asked_for_again(swarm):
    host_dht, _, backends, _, _, fuzzer_dht, _ = swarm
    host_p2p = RemoteExpertWorker.run_coroutine(host_dht.replicate_p2p())
    template = expert_state.make_template(D, CONFIG.model.expert_hidden, CONFIG.training)
    for cut, namespace in ((1, "cut_once.experts"), (5, "cut_always.experts")):
        servicer = _cutting_servicer(backends, cut)
        RemoteExpertWorker.run_coroutine(servicer.add_p2p_handlers(host_p2p, namespace=namespace))
        client = ExpertStateService(fuzzer_dht, namespace, lambda uid: None)
        client.start(serve=False)
        try:
            if cut == 1:  # cut once: the second answer is whole, and the state is the host's
                state = client.fetch(host_dht.peer_id.to_base58(), UID, template, timeout=30)
                assert type(servicer).answers == 2 and state.version == backends[UID].version
            else:  # cut every time: the error says what happened, after one more try
                with pytest.raises(state_service.TruncatedDownload, match="ended after"):
                    client.fetch(host_dht.peer_id.to_base58(), UID, template, timeout=30)
                assert type(servicer).answers == 1 + state_service.DOWNLOAD_RETRIES
        finally:
            client.shutdown()
            RemoteExpertWorker.run_coroutine(servicer.remove_p2p_handlers(host_p2p, namespace=namespace))


def test_a_state_request_left_unanswered_is_sent_again(swarm, monkeypatch):
    host_dht, _, backends, _, _, fuzzer_dht, _ = swarm
    monkeypatch.setattr(state_service, "FIRST_ANSWER_TIMEOUT_S", 1.0)

    class ExpertStateServicer(state_service.ExpertStateServicer):
        requests = 0

        async def rpc_download_expert(self, request: runtime_pb2.ExpertUID, context: P2PContext) -> AsyncIterator[runtime_pb2.ExpertResponse]:
            type(self).requests += 1
            if self.requests == 1:  # the first request is never answered (lost), until the client has given up
                await asyncio.sleep(5.0)
                return
            async for message in super().rpc_download_expert(request, context):
                yield message

    host_p2p = RemoteExpertWorker.run_coroutine(host_dht.replicate_p2p())
    servicer = ExpertStateServicer(backends.get)
    RemoteExpertWorker.run_coroutine(servicer.add_p2p_handlers(host_p2p, namespace="unanswered.experts"))
    client = ExpertStateService(fuzzer_dht, "unanswered.experts", lambda uid: None)
    client.start(serve=False)
    try:
        template = expert_state.make_template(D, CONFIG.model.expert_hidden, CONFIG.training)
        state = client.fetch(host_dht.peer_id.to_base58(), UID, template, timeout=30)
        assert ExpertStateServicer.requests == 2 and state.version == backends[UID].version
    finally:
        client.shutdown()
        RemoteExpertWorker.run_coroutine(servicer.remove_p2p_handlers(host_p2p, namespace="unanswered.experts"))
