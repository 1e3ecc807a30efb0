"""The expert path's Byzantine defences without a network: the router's checks and cross-check decisions on replicas
simulated as functions, the host's one-request-per-batch backward pool and its per-caller rate limit."""

from __future__ import annotations

import asyncio
import threading
from types import SimpleNamespace

import pytest
import torch
from hivemind.moe.server.task_pool import TaskPool
from hivemind.p2p import P2PContext
from hivemind.proto import runtime_pb2
from hivemind.utils.tensor_descr import BatchTensorDescriptor

from dragon_swarm.config import ExpertsSection
from dragon_swarm.events import EventBus, ExpertBanReport
from dragon_swarm.moe.backend import ExpertBackend, SingleRequestTaskPool
from dragon_swarm.moe.handler import RequestError, ValidatingConnectionHandler
from dragon_swarm.rate_limit import RateLimiter
from dragon_swarm.moe.router import VERIFY_FIRST_CALLS, RemoteExpertDispatcher

UID = "ffn.0.0"
ME = "QmMe"
D = 4


class SimulatedReplicas(RemoteExpertDispatcher):
    """The real dispatcher logic; only `_gather` (the RPCs) is replaced by calling each replica's function."""

    def __init__(self, replicas: dict[str, callable], settings: ExpertsSection, local: bool = False):
        dht = SimpleNamespace(peer_id=SimpleNamespace(to_base58=lambda: ME))
        local_backends = {UID: object()} if local else None
        super().__init__(dht, "ffn", 1, 1, D, settings, local_backends=local_backends, bus=EventBus())
        self.replicas = replicas
        self.asked: list[str] = []
        self.bans: list[ExpertBanReport] = []
        self.bus.subscribe(self.bans.append, ExpertBanReport)
        self.table.replicas = {UID: [p for p in replicas if p != ME]}

    def _gather(self, kind, jobs, timeout):
        self.asked += [peer for _, peer, _ in jobs]
        return [(self.replicas[peer](tensors[0]), 0.01) for _, peer, tensors in jobs]

    def call(self, peer: str, x: torch.Tensor) -> tuple[torch.Tensor | None, str]:
        peers = [peer]
        (out,) = self._run_calls("forward", [UID], peers, [[x]], 1.0)
        return out, peers[0]


def honest(x: torch.Tensor) -> torch.Tensor:
    return 2 * x


def scaled(x: torch.Tensor) -> torch.Tensor:
    return 200 * x


def flipped(x: torch.Tensor) -> torch.Tensor:
    return -2 * x


SETTINGS = ExpertsSection(max_output_ratio=30.0, cross_check_fraction=0.01, cross_check_tolerance=0.5)
X = torch.ones(3, D)


def test_an_output_far_larger_than_its_input_is_refused_and_its_host_banned_from_that_expert():
    router = SimulatedReplicas({"QmBad": scaled}, SETTINGS)
    out, _ = router.call("QmBad", X)
    assert out is None
    assert router.byzantine_bans == 1 and router.byzantine_peers == {"QmBad"}
    assert [(b.peer_id, b.uid, b.seconds) for b in router.bans] == [("QmBad", UID, 10 * SETTINGS.expiration)]
    assert "output RMS 200 x" in router.bans[0].reason and router.bans[0].calls == 1
    assert not router.alive_mask(0).any()


def test_a_liar_of_honest_size_is_caught_by_our_own_trusted_copy_and_its_output_replaced():
    router = SimulatedReplicas({"QmBad": flipped, ME: honest}, SETTINGS, local=True)
    out, served_by = router.call("QmBad", X)  # a first call: always cross-checked
    assert torch.equal(out, honest(X)) and served_by == ME  # the backward goes where the used output came from
    assert router.asked == ["QmBad", ME] and router.byzantine_peers == {"QmBad"} and router.disagreements == 1


def test_two_remote_replicas_that_disagree_are_counted_but_nobody_is_banned():
    router = SimulatedReplicas({"QmBad": flipped, "QmGood": honest}, SETTINGS)
    out, _ = router.call("QmBad", X)
    assert out is None  # nobody knows which one is right: the model renormalises over the other experts
    assert router.disagreements == 1 and router.unresolved_disagreements == 1 and router.byzantine_bans == 0
    assert sorted(router.table.usable(UID, 0.0)) == ["QmBad", "QmGood"]


@pytest.mark.parametrize("liar_serves", [True, False])
def test_with_three_replicas_the_majority_decides(liar_serves):
    replicas = {"QmBad": flipped, "QmGood": honest, "QmThird": lambda x: 2.1 * x}
    router = SimulatedReplicas(replicas, SETTINGS)
    if liar_serves:
        out, served_by = router.call("QmBad", X)
        assert served_by in ("QmGood", "QmThird")  # the reference's output replaces the liar's
    else:  # an honest replica serves, and the liar happens to be the reference
        router.table.record_success("QmThird", 9.0)  # slow: the reference chosen is the liar, QmThird the third
        out, served_by = router.call("QmGood", X)
        assert served_by == "QmGood"
    assert torch.equal(out, replicas[served_by](X)) and len(router.asked) == 3
    assert router.byzantine_peers == {"QmBad"} and router.table.usable(UID, 0.0) == ["QmGood", "QmThird"]


def test_honest_replicas_pass_and_after_the_first_calls_only_a_fraction_is_checked():
    router = SimulatedReplicas({"QmA": honest, "QmB": lambda x: 2.2 * x}, SETTINGS)  # drifted 10 %: agrees
    for _ in range(VERIFY_FIRST_CALLS + 5):
        out, served_by = router.call("QmA", X)
        assert torch.equal(out, honest(X)) and served_by == "QmA"
    assert VERIFY_FIRST_CALLS <= router.cross_checks <= VERIFY_FIRST_CALLS + 1  # then 1 % of calls
    assert router.disagreements == 0 and router.byzantine_bans == 0
    assert 0.0 < router.max_agreeing_difference < 0.5


def test_calls_served_by_our_own_copy_are_never_cross_checked():
    router = SimulatedReplicas({"QmA": honest, ME: honest}, SETTINGS, local=True)
    router.call(ME, X)
    assert router.asked == [ME] and router.cross_checks == 0


# --- host: every backward request clipped and applied on its own ---


def make_backend(clip: float = 1.0) -> ExpertBackend:
    torch.manual_seed(0)
    module = torch.nn.Linear(D, D, bias=False)
    return ExpertBackend(
        UID, module, clip_grad_norm=clip, optimizer=torch.optim.SGD(module.parameters(), lr=1.0),
        args_schema=(BatchTensorDescriptor(D),), max_batch_size=64,
    )  # fmt: skip


def batches(pool: TaskPool, count: int) -> list[list]:
    iterator = pool.iterate_minibatches()
    return [next(iterator) for _ in range(count)]


def submit_two_large_gradient_requests(pool: TaskPool) -> None:
    for scale in (1000.0, -1000.0):  # two callers, opposite directions: a merged update would cancel out
        pool.submit_task(torch.ones(2, D), torch.full((2, D), scale))


def test_stock_task_pool_would_merge_the_two_requests():
    pool = TaskPool(lambda *x: x, max_batch_size=64, name="stock")
    submit_two_large_gradient_requests(pool)
    threading.Event().wait(0.2)  # mp.Queue's feeder thread
    assert [len(b) for b in batches(pool, 1)] == [2]


def test_each_backward_request_is_clipped_and_applied_on_its_own():
    backend = make_backend(clip=1.0)
    assert isinstance(backend.backward_pool, SingleRequestTaskPool)
    assert backend.backward_pool.max_batch_size == backend.forward_pool.max_batch_size == 64
    submit_two_large_gradient_requests(backend.backward_pool)
    steps = []
    for batch in batches(backend.backward_pool, 2):  # what the Runtime does with each batch
        assert len(batch) == 1
        before = backend.module.weight.detach().clone()
        backend.backward(*[torch.cat([task.args[i] for task in batch]) for i in range(2)])
        steps.append(backend.module.weight.detach() - before)
        assert backend.last_grad_norm > 1000  # the request's own gradient, before its clip
    assert backend.version == 2
    for step in steps:  # SGD with lr 1: each step is exactly that request's clipped gradient
        assert abs(float(step.norm()) - 1.0) < 1e-4
    assert torch.allclose(steps[0], -steps[1])  # neither caller's gradient drowned the other's


# --- host: per-caller rate limit ---


def test_rate_limiter_allows_a_burst_then_the_rate():
    limiter = RateLimiter(rate=10.0, burst=20.0)
    assert all(limiter.take("A", now=0.0) for _ in range(20))
    assert not limiter.take("A", now=0.0)
    assert limiter.take("B", now=0.0)  # per caller
    assert limiter.take("A", now=0.1) and not limiter.take("A", now=0.1)  # 10/s: one more after 0.1 s
    assert sum(limiter.take("A", now=100.0) for _ in range(50)) == 20  # refills up to the burst only


def test_rate_limiter_forgets_idle_callers():
    limiter = RateLimiter(rate=1.0, burst=2.0)
    limiter.MAX_KEYS = 3
    for i in range(4):
        limiter.take(i, now=float(i))
    assert len(limiter.buckets) <= 3 and 3 in limiter.buckets


def test_a_caller_over_the_rate_gets_a_clear_error():
    handler = ValidatingConnectionHandler(None, {}, hidden_dim=D, max_tokens=8, max_requests_per_s=1.0)
    context = P2PContext(handle_name="rpc_forward", local_id="QmHost", remote_id="QmGreedy")
    request = runtime_pb2.ExpertRequest(uid="unknown-expert")
    refused = []
    for _ in range(8):
        try:
            asyncio.run(handler.rpc_forward(request, context))
        except RequestError as e:
            refused.append(str(e))
        except KeyError:
            pass  # admitted: the (empty) host then knows no such expert
    assert len(refused) == 8 - 5  # a burst of 5 s at 1 request/s, then refused
    assert "rate limit" in refused[0]
    handler._admit(P2PContext(handle_name="rpc_forward", local_id="QmHost", remote_id="QmOther"))  # others still pass
