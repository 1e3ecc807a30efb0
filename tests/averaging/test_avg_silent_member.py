"""A group member that never sends: real RobustDecentralizedAveragers on loopback, with the timeouts the trainers use.

hivemind's matchmaking can put a peer in a group that its own side has given up on; that peer then sends nothing.
Each test starts its own DHTs and averagers on 127.0.0.1 (tcp/0) and always shuts them down.
"""

import asyncio
import contextlib
import multiprocessing

import pytest
import torch

from dragon_swarm.averaging.compression import install_codecs
from dragon_swarm.averaging.robust_allreduce import (
    _first_within,
    RobustAveragingSettings,
    RobustDecentralizedAverager,
    silent_peer_timeouts,
)
from tests.averaging.loopback import shut_down, start_loopback_dhts

pytestmark = pytest.mark.swarm

PART = 1024  # float32 values per part (part_size_bytes below): one partition per peer of three
ALLREDUCE_TIMEOUT = 15.0
STEP_TIMEOUT = 40.0  # matchmaking and the all-reduce


async def _never_run_allreduce(tensors, group_info, group_id=None, **kwargs):
    """In place of an averager's all-reduce: it joins groups like any peer, then neither sends its parts nor reduces
    its partition. Set on the instance, not in a subclass: hivemind names a peer's RPC handlers after its class, and
    a subclass could not even be asked to join a group."""
    await asyncio.sleep(3600.0)


@contextlib.contextmanager
def _three_peers_the_last_silent(tensors_by_peer):
    if multiprocessing.get_start_method(allow_none=True) != "fork":
        multiprocessing.set_start_method("fork", force=True)
    install_codecs()
    kwargs = dict(
        settings=RobustAveragingSettings(aggregator="mean"),
        prefix="silent_member",
        target_group_size=3,
        min_group_size=3,
        min_matchmaking_time=2.0,
        request_timeout=1.0,
        allreduce_timeout=ALLREDUCE_TIMEOUT,
        silent_member_timeouts=silent_peer_timeouts(ALLREDUCE_TIMEOUT),
        part_size_bytes=4 * PART,
        identical_results=True,  # as the trainers' outer averager
    )
    dhts, averagers = [], []
    try:
        start_loopback_dhts(3, into=dhts)
        for index, (dht, tensors) in enumerate(zip(dhts, tensors_by_peer)):
            averager = RobustDecentralizedAverager(tensors, dht, start=False, **kwargs)
            averagers.append(averager)
            if index == 2:
                averager._run_allreduce_inplace_ = _never_run_allreduce  # before the averager's process forks
            averager.run_in_background(await_ready=True)
        yield averagers
    finally:
        shut_down(averagers, dhts)


def _tensor(averager) -> torch.Tensor:
    with averager.get_tensors() as tensors:
        return tensors[0].clone()


def test_the_others_finish_the_round_without_a_member_that_never_sends():
    # Prepare: A holds 0, B holds 1, C (silent) holds 2; one 1024-value partition each
    tensors = [[torch.zeros(3 * PART)], [torch.ones(3 * PART)], [torch.full((3 * PART,), 2.0)]]

    with _three_peers_the_last_silent(tensors) as averagers:
        # Execute: one round, no retries (a retry could form a new group that leaves C out)
        controls = [averager.step(wait=False, timeout=STEP_TIMEOUT, allow_retries=False) for averager in averagers]
        outcomes = []
        for control in controls[:2]:
            try:
                outcomes.append(control.result(timeout=2 * STEP_TIMEOUT))
            except Exception as e:
                outcomes.append(e)

        # Assert: A and B ended the round in the group of three (without the timeouts it fails for both)
        assert all(isinstance(outcome, dict) and len(outcome) == 3 for outcome in outcomes), outcomes
        order = [str(peer_id) for peer_id in outcomes[0]]  # partitions in group order
        silent = order.index(str(averagers[2].peer_id))
        results = [_tensor(averagers[0]), _tensor(averagers[1])]
        for index in range(3):
            parts = [result[index * PART : (index + 1) * PART] for result in results]
            if index == silent:  # nobody reduced it: each keeps its own values
                torch.testing.assert_close(parts[0], torch.zeros(PART), atol=0, rtol=0)
                torch.testing.assert_close(parts[1], torch.ones(PART), atol=0, rtol=0)
            else:  # the mean of A and B, C's 2.0 left out, the same bytes on both
                torch.testing.assert_close(parts[0], torch.full((PART,), 0.5))
                assert torch.equal(parts[0], parts[1])


def test_silent_peer_timeouts_fit_in_the_allreduce_sender_first():
    sender, reducer = silent_peer_timeouts(30.0)
    assert 0 < sender < reducer  # a reducer's first answer waits for every sender's first part
    assert sender + reducer <= 30.0  # a silent sender, then a silent reducer, still end within the all-reduce's time
    with pytest.raises(ValueError):
        silent_peer_timeouts(0.0)


def _answers(delays):
    async def answers():
        for index, delay in enumerate(delays):
            await asyncio.sleep(delay)
            yield index

    return answers()


async def _collect(answers):
    return [answer async for answer in answers]


def test_only_the_first_answer_has_a_deadline():
    # a reducer answers its first part within the deadline, then waits longer than it between parts: a live member
    # that is slow (a loaded machine), which must not be dropped mid-round
    assert asyncio.run(_collect(_first_within(_answers([0.05, 0.4, 0.4]), 0.2, "test"))) == [0, 1, 2]
    # one that sends nothing fails at the deadline, not when the all-reduce times out
    with pytest.raises(asyncio.TimeoutError):
        asyncio.run(_collect(_first_within(_answers([5.0]), 0.2, "test")))
    assert asyncio.run(_collect(_first_within(_answers([]), 0.2, "test"))) == []  # an empty answer is not a timeout
