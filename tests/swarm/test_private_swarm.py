"""Private swarms, identity work and per-peer rate limits (issue 12, items 2 and 4): the admission gate in front of
every RPC a peer serves.

Real hivemind DHTs and p2pd on loopback. In this process: a member peer serving an expert (hivemind's MoE RPC through
our validating handler), its expert state service and a robust averager, a second member, and three outsiders that
dial the member directly: one without the key, one with a wrong key, one with the key but an identity without the
swarm's work. Then real peer processes: a bootstrap and a trainer with `--swarm-key` train; a peer without the key
is turned away with one line saying why. The same member's state service also shows a robust download asking
every host at once.
"""

from __future__ import annotations

import asyncio
import threading
import time

import pytest
import torch
import yaml
from hivemind.moe.client.expert import RemoteExpert
from hivemind.moe.client.remote_expert_worker import RemoteExpertWorker
from hivemind.moe.expert_uid import ExpertInfo
from hivemind.moe.server.connection_handler import ConnectionHandler
from hivemind.utils.multiaddr import Multiaddr

from dragon_swarm.averaging.robust_allreduce import RobustDecentralizedAverager
from dragon_swarm.config import load_config
from dragon_swarm.moe import expert_state, round_delta
from dragon_swarm.moe.backend import build_expert_backends
from dragon_swarm.moe.host import ExpertHost
from dragon_swarm.moe.state_service import ExpertStateService, ExpertStateServicer
from dragon_swarm.swarm.admission import AdmissionPolicy, new_swarm_key
from dragon_swarm.swarm.dht_node import start_dht, visible_maddrs
from dragon_swarm.swarm.identity_work import load_work
from tests.swarm.paths import TEST_CONFIG
from tests.swarm.shutdowns import shutdowns

pytestmark = [pytest.mark.swarm, pytest.mark.slow]

CONFIG = load_config(str(TEST_CONFIG))
D = CONFIG.model.d_model
UID = f"{CONFIG.expert_prefix}.0.0"
PREFIX = "private_averaging"
NAMESPACE = f"{CONFIG.run_prefix}.experts"
KEY = bytes.fromhex(new_swarm_key())
BITS = 2
MEMBER = AdmissionPolicy(swarm_key=KEY, identity_bits=BITS)


def run(coro):
    return RemoteExpertWorker.run_coroutine(coro)


@pytest.fixture(scope="module")
def swarm():
    with shutdowns() as later:
        host_dht = start_dht(admission=MEMBER)
        later(host_dht.shutdown)
        backends = build_expert_backends([UID], D, CONFIG.model.expert_hidden, CONFIG.training, 64, CONFIG.swarm.seed)
        host = ExpertHost(host_dht, backends, CONFIG.experts, hidden_dim=D, checkpoint_dir=None, throughput=100.0)
        host.start()
        later(host.shutdown)
        service = ExpertStateService(host_dht, NAMESPACE, backends.get)
        service.start()
        later(service.shutdown)
        member_dht = start_dht(initial_peers=visible_maddrs(host_dht), admission=MEMBER)
        later(member_dht.shutdown)
        averagers = []
        for dht in (host_dht, member_dht):
            averager = RobustDecentralizedAverager(
                [torch.zeros(100)], dht, prefix=PREFIX, start=True, min_matchmaking_time=2.0, request_timeout=1.0,
                target_group_size=2,
            )  # fmt: skip
            later(averager.shutdown)
            averagers.append(averager)
        outsiders = {}
        for name, policy in (
            ("no key", None),
            ("wrong key", AdmissionPolicy(swarm_key=bytes.fromhex(new_swarm_key()), identity_bits=BITS)),
            ("no identity work", AdmissionPolicy(swarm_key=KEY, identity_bits=0)),
        ):
            dht = start_dht(admission=policy)  # cannot bootstrap through a member: it dials the member directly
            later(dht.shutdown)
            p2p = run(dht.replicate_p2p())
            run(p2p._client.connect(host_dht.peer_id, [Multiaddr(m.split("/p2p/")[0]) for m in visible_maddrs(host_dht)]))
            outsiders[name] = dht
        yield host_dht, backends, member_dht, averagers, outsiders


def served_handlers() -> list[tuple[str, bool]]:
    """(protocol name, unary?) of every RPC a member serves: the DHT's, the expert RPC, state service, averaging."""
    from hivemind.dht.protocol import DHTProtocol

    names = []
    for servicer, namespace in ((DHTProtocol, None), (ConnectionHandler, None), (ExpertStateServicer, NAMESPACE), (RobustDecentralizedAverager, PREFIX)):
        servicer._collect_rpc_handlers()
        for handler in servicer._rpc_handlers:
            names.append((servicer._get_handle_name(namespace, handler.method_name), not handler.stream_input and not handler.stream_output))
    return names


async def _call_raw(p2p, peer, name: str, unary: bool, wait: float = 20.0) -> str:
    """What an empty request gets back, as text: the error message, or what was answered. A stream ends with
    hivemind's end-of-stream message, not by closing it (that would cancel the handler before it answers)."""
    from hivemind.p2p import P2P

    try:
        if unary:
            reply = await asyncio.wait_for(p2p._client.call_unary_handler(peer, name, b""), timeout=wait)
            return f"answered {len(reply)} bytes"
        _, reader, writer = await asyncio.wait_for(p2p.call_binary_stream_handler(peer, name), timeout=wait)
        try:
            writer.write(P2P.MESSAGE_MARKER)
            await P2P.send_raw_data(b"", writer)
            await P2P.send_protobuf(P2P.END_OF_STREAM, writer)
        except ConnectionError:  # a refusing server may answer and close before the end-of-stream is written
            pass
        try:
            marker = await asyncio.wait_for(reader.readexactly(1), timeout=wait)
            data = await asyncio.wait_for(P2P.receive_raw_data(reader), timeout=wait)
        finally:
            writer.close()
        if marker == P2P.ERROR_MARKER:
            from hivemind.proto.p2pd_pb2 import RPCError

            return f"stream error: {RPCError.FromString(data).message}"
        return f"stream reply {len(data)} bytes"
    except Exception as e:
        return f"{type(e).__name__}: {e}"


def test_outsiders_are_refused_at_every_rpc_and_members_are_served(swarm):
    host_dht, _, member_dht, _, outsiders = swarm
    target = host_dht.peer_id
    names = served_handlers()
    assert len(names) >= 10
    for who, dht in outsiders.items():
        p2p = run(dht.replicate_p2p())
        for name, unary in names:
            outcome = run(_call_raw(p2p, target, name, unary))
            assert "not admitted to this swarm" in outcome, (who, name, outcome)
    member = run(member_dht.replicate_p2p())
    for name, unary in names:
        outcome = run(_call_raw(member, target, name, unary, wait=5.0))
        assert "not admitted" not in outcome and "rate limit" not in outcome, (name, outcome)
    # what each outsider was refused for
    reasons = {who: run(_call_raw(run(dht.replicate_p2p()), target, "DHTProtocol.rpc_ping", True)) for who, dht in outsiders.items()}
    assert "did not answer the admission challenge" in reasons["no key"]
    assert "no proof of the swarm key" in reasons["wrong key"]
    assert f"identity work of 0 bit(s), the swarm asks {BITS}" in reasons["no identity work"]


def test_outsiders_cannot_use_experts_state_or_dht_records(swarm):
    host_dht, backends, member_dht, _, outsiders = swarm
    target = host_dht.peer_id
    assert host_dht.store("private-record", "secret", expiration_time=_dht_time() + 120)
    x = torch.randn(3, D)
    template = expert_state.make_template(D, CONFIG.model.expert_hidden, CONFIG.training)
    for who, dht in outsiders.items():
        p2p = run(dht.replicate_p2p())
        with pytest.raises(Exception, match="not admitted"):
            RemoteExpert(ExpertInfo(UID, target), p2p)(x)
        client = ExpertStateService(dht, NAMESPACE, lambda uid: None)
        client.start(serve=False)
        try:
            with pytest.raises(Exception):
                client.fetch(target.to_base58(), UID, template, timeout=15)
        finally:
            client.shutdown()
        assert dht.get("private-record", latest=True) is None, who
    # the member reads the record, calls the expert, downloads its state
    assert member_dht.get("private-record", latest=True).value == "secret"
    member = run(member_dht.replicate_p2p())
    assert torch.allclose(RemoteExpert(ExpertInfo(UID, target), member)(x), backends[UID].module(x), atol=1e-4)
    client = ExpertStateService(member_dht, NAMESPACE, lambda uid: None)
    client.start(serve=False)
    try:
        assert client.fetch(target.to_base58(), UID, template, timeout=30).version == backends[UID].version
    finally:
        client.shutdown()


def test_members_average_through_the_gate_and_state_downloads_are_rate_limited(swarm):
    host_dht, _, member_dht, averagers, _ = swarm
    for value, averager in zip((1.0, 3.0), averagers):
        with averager.get_tensors() as tensors:
            tensors[0].fill_(value)
    controls = [a.step(wait=False, timeout=30) for a in averagers]
    assert all(c.result(timeout=60) is not None for c in controls)
    for averager in averagers:
        with averager.get_tensors() as tensors:
            assert torch.allclose(tensors[0], torch.full((100,), 2.0))
        assert averager.last_round_received_fraction == 1.0  # every reducer answered
    # a member asking for the whole state again and again is throttled (burst 4, then 1 per 5 s)
    member = run(member_dht.replicate_p2p())
    name = f"{PREFIX}::RobustDecentralizedAverager.rpc_download_state"
    outcomes = [run(_call_raw(member, host_dht.peer_id, name, False)) for _ in range(8)]
    refused = [o for o in outcomes if "over the rate limit of rpc_download_state" in o]
    assert 3 <= len(refused) <= 5, outcomes
    assert "rate limit" not in outcomes[0]


def _dht_time() -> float:
    from hivemind.utils import get_dht_time

    return get_dht_time()


def test_peers_with_the_key_train_and_a_peer_without_it_is_told_why(launcher, tmp_path):
    config = yaml.safe_load(TEST_CONFIG.read_text())
    config["swarm"]["identity_bits"] = BITS
    config_path = tmp_path / "private.yaml"
    config_path.write_text(yaml.safe_dump(config))
    key_file = tmp_path / "swarm.key"
    key_file.write_text(new_swarm_key())
    boot = launcher.start("boot", ["--swarm-key", str(key_file), "--identity-bits", str(BITS)], module="dragon_swarm.bootstrap")
    peers = boot.initial_peers()
    common = ["-c", str(config_path), "--initial-peers", *peers]
    member = launcher.start("member", [*common, "--swarm-key", str(key_file), "--experts", "all", "--max-steps", "2",
                                       "--state-dir", str(tmp_path / "member")])  # fmt: skip
    outsider = launcher.start("outsider", [*common, "--no-host", "--max-steps", "1", "--state-dir", str(tmp_path / "outsider")])
    assert outsider.wait(timeout=180) != 0
    assert "a private swarm also refuses peers without its --swarm-key" in outsider.stderr()
    assert member.wait(timeout=300) == 0, member.stderr()[-3000:]
    assert "Refused requests from peer" not in member.stderr()  # members never refuse each other
    identity = tmp_path / "member" / "identity.key"
    from hivemind.p2p import PeerID

    work = load_work(identity, PeerID.from_identity(identity.read_bytes()).to_bytes())
    assert work is not None and work.bits >= BITS


def test_a_round_snapshot_is_recorded_as_fetched_only_once_sent(swarm):
    """A local-expert trainer stopping after its last round waits until the holders it merged with have fetched its
    snapshot of that round (`ExpertHosting.wait_for_round_partners`): the host must know who has it."""
    host_dht, backends, member_dht, _, _ = swarm
    captured = expert_state.capture(backends[UID])
    frozen = round_delta.snapshot(captured, {name: t.clone() for name, t in captured.module.items()})
    namespace = f"{NAMESPACE}.rounds"
    host = ExpertStateService(host_dht, namespace, backends.get, snapshot=lambda uid, tag: frozen if tag == "r1" else None)
    host.start()
    client = ExpertStateService(member_dht, namespace, lambda uid: None)
    client.start(serve=False)
    template = expert_state.make_template(D, CONFIG.model.expert_hidden, CONFIG.training)
    try:
        with pytest.raises(Exception, match="no snapshot"):
            client.fetch(host_dht.peer_id.to_base58(), UID, template, timeout=15, tag="r2", own_round=frozen)
        assert host.fetched_by(UID, "r2") == set() and host.fetched_by(UID, "r1") == set()
        got = client.fetch(host_dht.peer_id.to_base58(), UID, template, timeout=30, tag="r1", own_round=frozen)
        assert got.version == frozen.version and all(torch.equal(got.module[k], v) for k, v in frozen.weights().items())
        deadline = time.monotonic() + 10  # recorded once the stream's last chunk is out, a moment after it arrives
        while not host.fetched_by(UID, "r1") and time.monotonic() < deadline:
            time.sleep(0.05)
        assert host.fetched_by(UID, "r1") == {member_dht.peer_id.to_base58()}
    finally:
        client.shutdown()
        host.shutdown()


def test_a_robust_download_asks_every_host_at_once_while_a_micro_batch_holds_the_expert(swarm):
    """A host that trains answers a state request only between micro-batches (it holds the expert's lock for a whole
    one). Asked one after another, k hosts cost k micro-batch waits (a joining trainer waited 48 s for 6 experts);
    asked at once, all requests are at the hosts while the first micro-batch still runs."""
    host_dht, backends, member_dht, _, _ = swarm
    asked = []
    namespace = f"{NAMESPACE}.parallel"
    host = ExpertStateService(host_dht, namespace, lambda uid: asked.append(uid) or backends.get(uid))
    host.start()
    client = ExpertStateService(member_dht, namespace, lambda uid: None)
    client.start(serve=False)
    template = expert_state.make_template(D, CONFIG.model.expert_hidden, CONFIG.training)
    answers = []
    fetching = None
    try:
        with backends[UID].lock:  # the trainer's micro-batch
            fetching = threading.Thread(target=lambda: answers.append(client.fetch_robust([host_dht.peer_id.to_base58()] * 3, UID, template, timeout=60)))
            fetching.start()
            deadline = time.monotonic() + 30
            while len(asked) < 3 and time.monotonic() < deadline:
                time.sleep(0.05)
            reached_while_held = len(asked)
        fetching.join(timeout=60)
        assert reached_while_held == 3, f"only {reached_while_held} of 3 requests reached the host during the micro-batch"
        state, _, problems = answers[0]
        assert problems == [] and state.version == backends[UID].version
    finally:
        if fetching is not None:
            fetching.join(timeout=60)
        client.shutdown()
        host.shutdown()
