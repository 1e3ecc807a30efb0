"""Signed parts and accusations on real RobustDecentralizedAveragers over loopback (one swarm for the module).

Four averagers, each DHT started with its own identity key: A and B honest and signing, C signing NaN parts, U
sending unsigned parts. Then a fifth peer D, which was never in a group, reads the accusations from the DHT.
"""

import contextlib
import multiprocessing

import pytest
import torch
from hivemind.compression import serialize_torch_tensor
from hivemind.proto import runtime_pb2

from dragon_swarm.averaging.accusations import AccusationBoard, make_accusation, verify_accusation
from dragon_swarm.averaging.compression import install_codecs
from dragon_swarm.averaging.part_signatures import PartSigner, tensor_statement
from dragon_swarm.averaging.robust_allreduce import RobustAveragingSettings, RobustDecentralizedAverager
from tests.averaging.loopback import start_loopback_dhts

pytestmark = pytest.mark.swarm

PARTITION = 1024  # values per peer's partition: one 4 KiB float32 part each
PREFIX = "signed_parts"


@pytest.fixture(scope="module")
def swarm(tmp_path_factory):
    if multiprocessing.get_start_method(allow_none=True) != "fork":
        multiprocessing.set_start_method("fork", force=True)
    install_codecs()
    keys = tmp_path_factory.mktemp("identities")
    identities = [keys / f"{name}.key" for name in "ABCUD"]
    values = {"A": torch.zeros(4 * PARTITION), "B": torch.ones(4 * PARTITION), "C": torch.full((4 * PARTITION,), float("nan")), "U": torch.full((4 * PARTITION,), 5.0)}
    settings = RobustAveragingSettings(aggregator="mean", signed_parts=True)
    dhts, averagers = [], []
    with contextlib.ExitStack() as cleanup:
        cleanup.callback(lambda: [dht.shutdown() for dht in dhts])
        cleanup.callback(lambda: [averager.shutdown() for averager in averagers])
        start_loopback_dhts(5, into=dhts, identities=identities)
        for name, dht, identity in zip("ABCU", dhts, identities):
            signer = None if name == "U" else PartSigner.from_identity_file(identity)
            averagers.append(
                RobustDecentralizedAverager(
                    [values[name].clone()], dht, settings=settings, signer=signer, prefix=PREFIX, start=True,
                    target_group_size=4, min_group_size=4, min_matchmaking_time=2.0, request_timeout=1.0,
                    next_chunk_timeout=5.0, part_size_bytes=4 * PARTITION,
                )
            )  # fmt: skip
        controls = [averager.step(wait=False, timeout=30.0) for averager in averagers]
        outcomes = []
        for control in controls:
            try:
                outcomes.append(control.result(timeout=60.0))
            except Exception as e:
                outcomes.append(e)
        yield dict(zip("ABCUD", dhts)), dict(zip("ABCU", averagers)), dict(zip("ABCU", outcomes)), dict(zip("ABCUD", identities))


def _values(averager) -> torch.Tensor:
    with averager.get_tensors() as tensors:
        return tensors[0].clone()


def test_honest_signed_parts_average_and_unsigned_or_nan_parts_are_rejected_and_banned(swarm):
    dhts, averagers, outcomes, _ = swarm
    assert isinstance(outcomes["A"], dict) and len(outcomes["A"]) == 4, outcomes  # one group of four
    order = [str(peer) for peer in outcomes["A"]]
    ids = {name: str(dht.peer_id) for name, dht in dhts.items()}
    a = _values(averagers["A"])
    assert bool(torch.isfinite(a).all())
    for reducer in (ids["A"], ids["B"]):  # the honest reducers averaged A and B only (their seals checked out)
        index = order.index(reducer)
        torch.testing.assert_close(a[index * PARTITION : (index + 1) * PARTITION], torch.full((PARTITION,), 0.5))
    for name in "AB":
        book = averagers[name].get_reputation()
        assert set(book["banned"]) == {ids["C"], ids["U"]}, book
        reasons = {peer: record["ban_reason"] for peer, record in book["peers"].items()}
        assert "not signed" in reasons[ids["U"]] and "no seal" in reasons[ids["U"]], reasons
        assert ids["A"] not in book["banned"] and ids["B"] not in book["banned"]


def test_a_reducer_s_accusation_bans_the_nan_sender_on_a_peer_that_never_saw_its_part(swarm):
    dhts, averagers, _, _ = swarm
    ids = {name: str(dht.peer_id) for name, dht in dhts.items()}
    taken = averagers["A"].take_accusations()
    assert [accusation.accused for accusation in taken] == [ids["C"]]  # U's unsigned part proves nothing to others
    assert verify_accusation(taken[0]) is None and taken[0].reducer == ids["A"]
    assert averagers["A"].take_accusations() == []  # taken once

    published_by_a = AccusationBoard(dhts["A"], PREFIX, take_new=lambda: taken, ban=lambda peer, reason: None)
    bans: list[tuple[str, str]] = []
    reader = AccusationBoard(dhts["D"], PREFIX, take_new=list, ban=lambda peer, reason: bans.append((peer, reason)))
    published_by_a.tick()
    reader.tick()
    assert [peer for peer, _ in bans] == [ids["C"]], bans
    assert f"proof published by {ids['A']}" in bans[0][1]
    reader.tick()
    assert len(bans) == 1  # judged once


def test_a_forged_accusation_bans_nobody(swarm):
    dhts, _, _, identities = swarm
    ids = {name: str(dht.peer_id) for name, dht in dhts.items()}
    mallory = PartSigner.from_identity_file(identities["U"])
    nan_part = serialize_torch_tensor(torch.tensor([float("nan")] * 4), runtime_pb2.CompressionType.NONE)
    group = b"\x01" * 16
    # U seals a NaN part in A's name: the seal's key hashes to U's peer id, not A's
    forged = make_accusation(ids["A"], ids["U"], group, 0, 1.0, nan_part, mallory.seal(tensor_statement(group, ids["A"], ids["U"], 0, 1.0, nan_part)))
    bans: list[str] = []
    forger = AccusationBoard(dhts["U"], PREFIX + "_forged", take_new=lambda: [forged], ban=lambda peer, reason: None)
    reader = AccusationBoard(dhts["D"], PREFIX + "_forged", take_new=list, ban=lambda peer, reason: bans.append(peer))
    forger.tick()
    reader.tick()
    assert bans == [] and reader.refused == 1
