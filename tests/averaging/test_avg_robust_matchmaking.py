"""The two matchmaking seams of the robust averagers, each on its own, without a network or averager process.

An averager is built with start=False (no process, no DHT); its matchmaking is a stand-in that records calls.
"""

import asyncio
import types

import pytest
import torch
from hivemind.p2p import PeerID
from hivemind.proto import averaging_pb2

from dragon_swarm.averaging.reputation import ReputationBook
from dragon_swarm.averaging.robust_allreduce import RobustAveragingSettings, RobustDecentralizedAverager

BANNED = PeerID(b"banned-peer-id-bytes")
FRIEND = PeerID(b"friendly-peer-id-bytes")


class _RecordingMatchmaking:
    """Stands in for hivemind's Matchmaking: records which leaders were asked and which requests got through."""

    def __init__(self):
        self.asked_leaders, self.join_requests = [], []

    async def _request_join_group(self, leader):
        self.asked_leaders.append(leader)
        return "group"

    async def rpc_join_group(self, request, context):
        self.join_requests.append(context.remote_id)
        yield averaging_pb2.MessageFromLeader(code=averaging_pb2.ACCEPTED)


def _averager(refuse_banned_peers=True):
    book = ReputationBook()
    book.ban(str(BANNED), "test")
    averager = RobustDecentralizedAverager(
        [torch.zeros(3)],
        types.SimpleNamespace(client_mode=False),  # never used: the averager is not started
        settings=RobustAveragingSettings(refuse_banned_peers=refuse_banned_peers),
        reputation=book,
        prefix="robust_mm_test",
        client_mode=False,
        start=False,
    )
    averager._matchmaking = _RecordingMatchmaking()
    return averager


async def _collect(async_iterator):
    return [item async for item in async_iterator]


def test_leader_side_refuses_a_banned_peer_before_matchmaking_sees_it():
    averager = _averager()

    refused = asyncio.run(_collect(averager.rpc_join_group(averaging_pb2.JoinRequest(), _context(BANNED))))
    accepted = asyncio.run(_collect(averager.rpc_join_group(averaging_pb2.JoinRequest(), _context(FRIEND))))

    assert [message.code for message in refused] == [averaging_pb2.PROTOCOL_VIOLATION]
    assert [message.code for message in accepted] == [averaging_pb2.ACCEPTED]
    assert averager._matchmaking.join_requests == [FRIEND]


def test_follower_side_skips_banned_leaders_including_redirects():
    averager = _averager()
    averager._skip_banned_leaders()
    averager._skip_banned_leaders()  # idempotent: wraps once
    matchmaking = averager._matchmaking

    from_banned = asyncio.run(matchmaking._request_join_group(BANNED))
    from_friend = asyncio.run(matchmaking._request_join_group(FRIEND))

    assert from_banned is None and from_friend == "group"
    assert matchmaking.asked_leaders == [FRIEND]


@pytest.mark.parametrize("peer", [BANNED, FRIEND])
def test_both_seams_can_be_switched_off(peer):
    averager = _averager(refuse_banned_peers=False)
    averager._skip_banned_leaders()

    joined = asyncio.run(averager._matchmaking._request_join_group(peer))
    answers = asyncio.run(_collect(averager.rpc_join_group(averaging_pb2.JoinRequest(), _context(peer))))

    assert joined == "group"
    assert [message.code for message in answers] == [averaging_pb2.ACCEPTED]


def _context(peer_id):
    return types.SimpleNamespace(remote_id=peer_id)
