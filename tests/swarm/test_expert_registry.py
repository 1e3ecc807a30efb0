"""Expert hosting over real hivemind DHTs and p2pd on loopback, in one test process."""

from __future__ import annotations

import time

import pytest
import torch
from hivemind.moe.client.expert import RemoteExpert
from hivemind.moe.client.remote_expert_worker import RemoteExpertWorker
from hivemind.moe.expert_uid import ExpertInfo
from hivemind.moe.server.dht_handler import get_experts
from hivemind.p2p import PeerID

from dragon_swarm.config import load_config
from dragon_swarm.moe.host import ExpertHost, build_expert_backends
from dragon_swarm.moe.registry import find_replicas
from dragon_swarm.moe.router import RemoteExpertDispatcher
from dragon_swarm.swarm.dht_node import start_dht, visible_maddrs
from tests.swarm.paths import TEST_CONFIG

pytestmark = pytest.mark.swarm

CONFIG = load_config(str(TEST_CONFIG))
D = CONFIG.model.d_model


@pytest.fixture
def swarm():
    """A client DHT plus two hosts; host A serves layer 0, host B replicates expert 0.0 and 0.1."""
    stack = []
    try:
        client = start_dht()
        stack.append(client.shutdown)
        uids = [f"{CONFIG.expert_prefix}.0.{i}" for i in range(4)]
        hosts = {}
        for name, served in (("A", uids), ("B", uids[:2])):
            dht = start_dht(initial_peers=visible_maddrs(client))
            stack.append(dht.shutdown)
            backends = build_expert_backends(served, D, CONFIG.model.expert_hidden, CONFIG.training, 64, CONFIG.swarm.seed)
            host = ExpertHost(dht, backends, CONFIG.experts, hidden_dim=D, checkpoint_dir=None, throughput=100.0)
            host.start()
            stack.append(host.shutdown)
            hosts[name] = host
        yield client, hosts, uids
    finally:
        for shutdown in reversed(stack):
            shutdown()


def remote(client, uid: str, peer_id: str) -> RemoteExpert:
    p2p = RemoteExpertWorker.run_coroutine(client.replicate_p2p())
    return RemoteExpert(ExpertInfo(uid, PeerID.from_base58(peer_id)), p2p)


def test_two_hosts_of_one_expert_both_serve_it(swarm):
    client, hosts, uids = swarm
    replicas = find_replicas(client, uids)
    peer_a, peer_b = (hosts[n].dht.peer_id.to_base58() for n in "AB")
    assert {r.record.peer_id for r in replicas[uids[0]]} == {peer_a, peer_b}
    assert [r.record.peer_id for r in replicas[uids[3]]] == [peer_a]

    x = torch.randn(5, D)
    expected = hosts["A"].backends[uids[0]].module(x)
    for peer in (peer_a, peer_b):  # fresh replicas of one uid start from the same weights
        out = remote(client, uids[0], peer)(x)
        assert torch.allclose(out, expected, atol=1e-5)


def test_stock_hivemind_client_finds_and_calls_every_expert(swarm):
    client, hosts, uids = swarm
    experts = get_experts(client, uids)
    assert all(e is not None for e in experts)
    x = torch.randn(3, D, requires_grad=True)
    for expert in experts:
        out = expert(x)
        assert out.shape == (3, D)
    out.sum().backward()  # backward through the stock client trains the expert on its host
    assert x.grad is not None and torch.isfinite(x.grad).all()


def test_malformed_requests_are_refused_and_the_host_stays_up(swarm):
    client, hosts, uids = swarm
    peer_a = hosts["A"].dht.peer_id.to_base58()
    expert = remote(client, uids[2], peer_a)
    for bad in (torch.randn(3, D + 1), torch.full((2, D), float("nan")), torch.randn(65, D)):
        with pytest.raises(Exception) as info:
            expert(bad)
        assert "RequestError" in repr(info.value) or "expected" in str(info.value) or "NaN" in str(info.value)
    assert expert(torch.randn(2, D)).shape == (2, D)


def test_router_skips_a_dead_host_within_the_deadline(swarm):
    client, hosts, uids = swarm
    dispatcher = RemoteExpertDispatcher(client, CONFIG.expert_prefix, 1, 4, D, CONFIG.experts)
    dispatcher.start()
    try:
        assert dispatcher.alive_mask(0).all()
        hosts["B"].handlers[0].terminate()  # B stops answering but its records are still in the DHT
        for handler in hosts["B"].handlers:
            handler.terminate()
        x = torch.randn(4, D, requires_grad=True)
        started = time.monotonic()
        for _ in range(3):  # some calls may land on B: they must fail fast and move to A afterwards
            out = dispatcher.dispatch(0, {0: x, 1: x, 3: x})
        assert time.monotonic() - started < 3 * CONFIG.experts.forward_timeout + 5
        assert set(out) == {0, 1, 3}
        sum(o.sum() for o in out.values()).backward()
        assert torch.isfinite(x.grad).all()
    finally:
        dispatcher.shutdown()
