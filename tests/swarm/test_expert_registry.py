"""Expert hosting over real hivemind DHTs and p2pd on loopback, in one test process."""

from __future__ import annotations

import copy
import random
import time
from types import SimpleNamespace

import pytest
import torch
from hivemind.moe.client.expert import RemoteExpert
from hivemind.moe.client.remote_expert_worker import RemoteExpertWorker
from hivemind.moe.expert_uid import ExpertInfo
from hivemind.moe.server.dht_handler import get_experts
from hivemind.p2p import PeerID

from dragon_swarm.config import load_config
from dragon_swarm.model import HRMSMoE
from dragon_swarm.moe import expert_state
from dragon_swarm.moe.backend import build_expert_backends
from dragon_swarm.moe.host import ExpertHost
from dragon_swarm.moe.hosting import ExpertHosting
from dragon_swarm.moe.registry import find_replicas
from dragon_swarm.moe.router import RemoteExpertDispatcher, relative_difference
from dragon_swarm.node.startup import choose_experts
from dragon_swarm.swarm.dht_node import start_dht, visible_maddrs
from dragon_swarm.verification.transcript import RecordingDispatcher
from tests.swarm.paths import TEST_CONFIG
from tests.training.test_pipeline import SlowExperts, random_batches, run_loop

pytestmark = pytest.mark.swarm

CONFIG = load_config(str(TEST_CONFIG))
D = CONFIG.model.d_model


UIDS = [f"{CONFIG.expert_prefix}.0.{i}" for i in range(4)]


def start_host(client, served: list[str], stack: list, forward_delay_s: float = 0.0, frozen: bool = False) -> ExpertHost:
    """A real expert host joined through `client`; with `forward_delay_s`, each expert forward first sleeps that long
    (a slow machine); `frozen`: its experts learn nothing (learning rate 0), so every call gives the same answer."""
    dht = start_dht(initial_peers=visible_maddrs(client))
    stack.append(dht.shutdown)
    training = CONFIG.training.model_copy(update={"expert_lr": 0.0}) if frozen else CONFIG.training
    backends = build_expert_backends(served, D, CONFIG.model.expert_hidden, training, 64, CONFIG.swarm.seed)
    if forward_delay_s:
        for backend in backends.values():
            backend.module.register_forward_pre_hook(lambda module, args: time.sleep(forward_delay_s))
    host = ExpertHost(dht, backends, CONFIG.experts, hidden_dim=D, checkpoint_dir=None, throughput=100.0)
    host.start()
    stack.append(host.shutdown)
    return host


@pytest.fixture
def swarm():
    """A client DHT plus two hosts; host A serves layer 0, host B replicates expert 0.0 and 0.1."""
    stack = []
    try:
        client = start_dht()
        stack.append(client.shutdown)
        hosts = {name: start_host(client, served, stack) for name, served in (("A", UIDS), ("B", UIDS[:2]))}
        yield client, hosts, UIDS
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


def test_auto_placement_takes_the_least_replicated_experts_the_registry_shows(swarm):
    client, hosts, uids = swarm
    everything = [f"{CONFIG.expert_prefix}.{layer}.{i}" for layer in range(2) for i in range(4)]
    options = SimpleNamespace(config=CONFIG, host_spec="auto", max_experts=5)
    deadline = time.monotonic() + 30
    while len(find_replicas(client, uids)[uids[0]]) < 2 and time.monotonic() < deadline:
        time.sleep(0.5)  # both hosts' records have reached the DHT
    chosen = choose_experts(client, options)
    # layer 1 has no host, 0.2 and 0.3 one, 0.0 and 0.1 two: the four unserved plus one of the singly served
    assert set(everything[4:]) <= set(chosen)
    assert len(chosen) == 5 and len(set(chosen) & {uids[2], uids[3]}) == 1 and not set(chosen) & {uids[0], uids[1]}


def test_a_new_replica_downloads_the_live_copies_although_it_keeps_their_keys_itself(tmp_path):
    """A new replica announces itself `joining`, then looks for live copies to download. Its own record may land in
    its own DHT storage (it is one of the nodes nearest to the key, or not yet sent the key's older entries), and a
    plain read is answered from there: it would see no other host and start from the seeded init. That happens for
    about half of the keys here, so each of two joiners takes four experts."""
    uids = [f"{CONFIG.expert_prefix}.1.{i}" for i in range(4)]
    stack = []
    try:
        client = start_dht()
        stack.append(client.shutdown)

        def hosting(uids: list[str], name: str) -> ExpertHosting:
            dht = start_dht(initial_peers=visible_maddrs(client))
            stack.append(dht.shutdown)
            h = ExpertHosting(dht, CONFIG, checkpoint_dir=tmp_path / name, throughput=100.0, periodic_sync=False)
            stack.append(h.shutdown)
            h.start(uids)
            return h

        seed = hosting(uids, "seed")
        live = {}
        for uid, backend in seed.backends.items():
            with backend.lock, torch.no_grad():
                for p in backend.module.parameters():
                    p.add_(torch.randn_like(p))  # trained weights: far from the seeded init a blind start would have
            live[uid] = expert_state.capture(backend).parameter_vector()
        for i in range(2):
            joiner = hosting(uids, f"joiner{i}")
            blind = [uid for uid in uids if not torch.equal(expert_state.capture(joiner.backends[uid]).parameter_vector(), live[uid])]
            assert not blind, f"joiner {i} did not download {blind}"
    finally:
        for shutdown in reversed(stack):
            shutdown()


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


def test_router_sends_fp16_and_the_backward_reuses_the_inputs_the_host_kept(swarm):
    """fp16 on the wire, inputs kept by the host for the backward: the outputs and input gradients are the expert's
    own (within fp16 error); when the host has lost the inputs, the router sends them again and still gets them."""
    client, hosts, uids = swarm
    host = hosts["A"]  # the only host of experts 0.2 and 0.3
    settings = CONFIG.experts.model_copy(update={"cross_check_fraction": 0.0, "wire_dtype": "float16"})
    dispatcher = RemoteExpertDispatcher(client, CONFIG.expert_prefix, 1, 4, D, settings)
    dispatcher.start()
    try:
        assert dispatcher.wait_for_experts(30.0)
        cache = host.handlers[0].input_cache  # shared by the host's handler processes
        for lose_inputs in (False, True):
            reference = {i: copy.deepcopy(host.backends[uids[i]].module) for i in (2, 3)}  # each backward steps them
            x = {i: torch.randn(6, D, requires_grad=True) for i in (2, 3)}
            grads = {i: torch.randn(6, D) * 1e-6 for i in (2, 3)}  # as small as a mean loss over many tokens makes them
            out = dispatcher.dispatch(0, x)
            assert set(out) == {2, 3}
            if lose_inputs:
                cache.clear()
            torch.autograd.backward([out[i] for i in (2, 3)], [grads[i] for i in (2, 3)])
            for i in (2, 3):
                x_ref = x[i].detach().clone().requires_grad_()
                expected = reference[i](x_ref)
                expected.backward(grads[i])
                assert not torch.equal(out[i], expected)  # it did travel in fp16...
                assert relative_difference(out[i], expected) < 5e-3  # ...which costs ~1e-3
                assert relative_difference(x[i].grad, x_ref.grad) < 5e-3, f"lost inputs: {lose_inputs}"
        assert (dispatcher.cached_backwards, dispatcher.resent_inputs) == (2, 2)
        stats = cache.stats()
        assert (stats["hits"], stats["misses"], stats["entries"]) == (2, 2, 0)
    finally:
        dispatcher.shutdown()


SLOW_S = 0.5


def test_router_times_each_replica_and_prefers_the_fast_one():
    """Two replicas of expert 0.0, one slow. Expert 0.1 lives on the slow host only, so every layer round also
    waits for it: only each call's own time tells the fast replica of 0.0 from the slow one."""
    stack = []
    try:
        client = start_dht()
        stack.append(client.shutdown)
        fast = start_host(client, UIDS[:1], stack)
        slow = start_host(client, UIDS[:2], stack, forward_delay_s=SLOW_S)
        fast_id, slow_id = (h.dht.peer_id.to_base58() for h in (fast, slow))
        # no cross-checks: they send extra forwards to the other replica, which this test counts
        settings = CONFIG.experts.model_copy(update={"cross_check_fraction": 0.0})
        dispatcher = RemoteExpertDispatcher(client, CONFIG.expert_prefix, 1, 2, D, settings)
        dispatcher.start()
        stack.append(dispatcher.shutdown)
        assert dispatcher.wait_for_experts(30.0)
        assert sorted(dispatcher.table.replicas[UIDS[0]]) == sorted([fast_id, slow_id])

        x = torch.randn(4, D)
        for _ in range(3):  # the first rounds try each replica of 0.0 once
            assert set(dispatcher.dispatch(0, {0: x, 1: x})) == {0, 1}
        latency = dispatcher.table.latency
        assert latency[slow_id] >= SLOW_S
        assert latency[fast_id] < SLOW_S / 2, f"fast replica timed as {latency[fast_id]:.3f} s: the round's time, not its own"

        served_by_slow, served_by_fast = slow.backends[UIDS[0]].requests_served, fast.backends[UIDS[0]].requests_served
        for _ in range(3):
            dispatcher.dispatch(0, {0: x, 1: x})
        assert slow.backends[UIDS[0]].requests_served == served_by_slow  # expert 0.0 now always goes to the fast host
        assert fast.backends[UIDS[0]].requests_served == served_by_fast + 3
        assert dispatcher.table.choose(UIDS[0], time.time(), random.Random(0)) == fast_id
    finally:
        for shutdown in reversed(stack):
            shutdown()


def test_two_micro_batches_in_flight_through_remote_experts_compute_what_the_sequential_path_does():
    """Issue 10: the trainer's loop with 2 micro-batches in flight (`training.pipeline`) against a real host over
    p2pd gives the sequential loop's losses, trunk steps between micro-batches included; the two really waited for
    their experts at once. The host's experts are frozen: a training host's answers change with every backward,
    whichever loop calls it."""
    stack = []
    try:
        client = start_dht()
        stack.append(client.shutdown)
        all_uids = [f"{CONFIG.expert_prefix}.{layer}.{i}" for layer in range(CONFIG.model.num_moe_layers) for i in range(4)]
        start_host(client, all_uids, stack, frozen=True)
        settings = CONFIG.experts.model_copy(update={"cross_check_fraction": 0.0})
        dispatcher = RemoteExpertDispatcher(client, CONFIG.expert_prefix, CONFIG.model.num_moe_layers, 4, D, settings)
        dispatcher.start()
        stack.append(dispatcher.shutdown)
        assert dispatcher.wait_for_experts(30.0)
        batches = random_batches(CONFIG.model.vocab_size, CONFIG.model.seq_len, 6, batch_size=2)  # <= 64 tokens an expert
        results = {}
        for depth in (1, 2):
            counting = SlowExperts(dispatcher, delay=0.0)
            recorder = RecordingDispatcher(counting)
            torch.manual_seed(0)
            model = HRMSMoE(CONFIG.model, recorder)
            losses, recorded, recomputed = run_loop(model, recorder, batches, depth)
            results[depth] = losses, recorded, recomputed, counting.most_waiting
        (sequential, sequential_calls, _, sequential_waiting), (pipelined, pipelined_calls, recomputed, waiting) = results[1], results[2]
        assert sequential_waiting == 1 and waiting >= 2
        assert pipelined == pytest.approx(sequential, rel=1e-4)  # float error (the host may batch the two together)
        assert pipelined_calls == sequential_calls and recomputed == 0
        assert dispatcher.failures == 0
    finally:
        for shutdown in reversed(stack):
            shutdown()
