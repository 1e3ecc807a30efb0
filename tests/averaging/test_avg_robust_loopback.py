"""Real RobustDecentralizedAverager swarms on loopback: a poisoning peer, a NaN peer, a banned peer.

Each test starts its own DHTs and averagers on 127.0.0.1 (tcp/0) and always shuts them down.
"""

import contextlib
import multiprocessing

import pytest
import torch

from dragon_swarm.averaging.compression import install_codecs
from dragon_swarm.averaging.robust_allreduce import RobustAveragingSettings, RobustDecentralizedAverager
from tests.averaging.loopback import shut_down, start_loopback_dhts

pytestmark = pytest.mark.swarm

SIZE = 4096  # one tensor ...
PART_SIZE_BYTES = 4096  # ... in 1024-value float32 parts, so that every peer of four reduces one part
STEP_TIMEOUT = 30.0
ROUND_ATTEMPTS = 3


@contextlib.contextmanager
def _swarm(tensors_by_peer, settings, prefix, **averager_kwargs):
    """Start one DHT and one averager per peer, all on 127.0.0.1; yield the averagers; always reap them."""
    if multiprocessing.get_start_method(allow_none=True) != "fork":
        multiprocessing.set_start_method("fork", force=True)
    install_codecs()
    num_peers = len(tensors_by_peer)
    kwargs = dict(
        target_group_size=num_peers,
        min_group_size=num_peers,
        min_matchmaking_time=2.0,
        request_timeout=1.0,
        next_chunk_timeout=5.0,
        part_size_bytes=PART_SIZE_BYTES,
    )
    kwargs.update(averager_kwargs)
    dhts, averagers = [], []
    try:
        start_loopback_dhts(num_peers, into=dhts)
        settings_by_peer = settings if isinstance(settings, list) else [settings] * num_peers
        for dht, tensors, peer_settings in zip(dhts, tensors_by_peer, settings_by_peer):
            averagers.append(
                RobustDecentralizedAverager(tensors, dht, settings=peer_settings, prefix=prefix, start=True, **kwargs)
            )
        yield averagers
    finally:
        shut_down(averagers, dhts)


def _honest_tensors(num_peers, spread=0.1, seed=0):
    generator = torch.Generator().manual_seed(seed)
    base = torch.randn(SIZE, generator=generator)
    return [base + spread * torch.randn(SIZE, generator=generator) for _ in range(num_peers)]


def _step_all(averagers, timeouts=None):
    timeouts = timeouts or [STEP_TIMEOUT] * len(averagers)
    controls = [averager.step(wait=False, timeout=timeout) for averager, timeout in zip(averagers, timeouts)]
    outcomes = []
    for control in controls:
        try:
            outcomes.append(control.result(timeout=2 * STEP_TIMEOUT))
        except Exception as e:  # a peer nobody averages with fails its step; the test decides if that is expected
            outcomes.append(e)
    return outcomes


def _tensor(averager) -> torch.Tensor:
    with averager.get_tensors() as tensors:
        return tensors[0].clone()


def test_sign_flipped_peer_does_not_move_centered_clip():
    # Prepare: three honest peers around a common base, one sending the honest mean times -1000
    honest = _honest_tensors(3)
    honest_mean = torch.stack(honest).mean(dim=0)
    honest_spread = min(torch.linalg.vector_norm(t - honest_mean).item() for t in honest)
    tensors = [[t.clone()] for t in honest] + [[-1000.0 * honest_mean]]
    # tau about the honest distance of one ~1024-value part from the mean (0.1 * sqrt(1024 * 2/3) = 2.6)
    settings = RobustAveragingSettings(aggregator="centered_clip", tau=3.0, relative_tau=False, max_iters=100)

    with _swarm(tensors, settings, prefix="robust_attack") as averagers:
        # Execute
        outcomes = _step_all(averagers)

        # Assert: a full group, every honest peer within the honest cloud (the plain mean would be ~250x |mean| off)
        assert all(isinstance(group, dict) and len(group) == 4 for group in outcomes), outcomes
        for index in range(3):
            error = torch.linalg.vector_norm(_tensor(averagers[index]) - honest_mean).item()
            assert error < 0.5 * honest_spread, f"peer {index}: |result - honest mean| = {error:.3f}"
        attacker_id = str(averagers[3].peer_id)
        for index in range(3):
            peers = averagers[index].get_reputation()["peers"]
            assert peers[attacker_id]["distance_ema"] > settings.ban_distance_ratio
            honest_emas = [peers[str(averagers[j].peer_id)]["distance_ema"] for j in range(3) if j != index]
            assert max(honest_emas) < settings.ban_distance_ratio, honest_emas
            assert str(averagers[index].peer_id) not in peers  # a peer measures itself but never scores itself


def test_nan_peer_is_rejected_banned_and_then_refused():
    # Prepare: peer 3 has NaN scattered through its tensor, so every partition of it is invalid
    honest = _honest_tensors(3, seed=1)
    honest_mean = torch.stack(honest).mean(dim=0)
    poisoned = torch.randn(SIZE)
    poisoned[::97] = float("nan")
    tensors = [[t.clone()] for t in honest] + [[poisoned]]
    settings = RobustAveragingSettings(aggregator="centered_clip", tau=100.0, relative_tau=False, max_invalid=2, ban_seconds=120.0)

    # groups of 3 may form, so that the honest peers can go on once they refuse the NaN peer
    with _swarm(tensors, settings, prefix="robust_nan", min_group_size=3) as averagers:
        nan_id = str(averagers[3].peer_id)

        # Execute: round one
        first = _step_all(averagers)

        # Assert: the honest peers got the honest mean; a malformed part is proof, so each of them banned the
        # NaN peer at its first part (max_invalid counts softer strikes only)
        assert all(isinstance(group, dict) and len(group) == 4 for group in first), first  # the NaN peer too
        for index in range(3):
            torch.testing.assert_close(_tensor(averagers[index]), honest_mean, atol=1e-4, rtol=0)
            snapshot = averagers[index].get_reputation()
            record = snapshot["peers"][nan_id]
            assert record["invalid"] == 1 and "NaN" in record["last_invalid_reason"]
            assert 0 < snapshot["banned"][nan_id] <= settings.ban_seconds
        # the NaN peer's own reducer rejected its own part too, and still averaged the honest ones, but a peer
        # never bans itself
        own = averagers[3].get_reputation()
        assert own["peers"][nan_id]["invalid"] == 1 and nan_id not in own["banned"]

        # Execute: round two
        second = _step_all(averagers, timeouts=[STEP_TIMEOUT] * 3 + [6.0])

        # Assert: the honest peers averaged without it (refused in matchmaking); it found nobody
        honest_ids = {str(averager.peer_id) for averager in averagers[:3]}
        for outcome in second[:3]:
            assert isinstance(outcome, dict) and {str(peer_id) for peer_id in outcome} == honest_ids, second
        assert not isinstance(second[3], dict), second[3]
        for index in range(3):
            assert averagers[index].get_reputation()["peers"][nan_id]["invalid"] == 1  # nothing new was sent
            torch.testing.assert_close(_tensor(averagers[index]), honest_mean, atol=1e-4, rtol=0)


def test_banned_peer_is_refused_in_matchmaking():
    # Prepare: A and B ban C before any round; C would pull the average far away if it got in
    tensors = [[torch.zeros(SIZE)], [torch.ones(SIZE)], [torch.full((SIZE,), 1000.0)]]
    settings = RobustAveragingSettings(aggregator="mean")

    with _swarm(tensors, settings, prefix="robust_refuse", target_group_size=3, min_group_size=2) as averagers:
        banned_id = str(averagers[2].peer_id)
        for averager in averagers[:2]:
            averager.ban_peer(banned_id, "test")

        # Execute
        outcomes = _step_all(averagers, timeouts=[STEP_TIMEOUT, STEP_TIMEOUT, 4.0])

        # Assert: A and B averaged with each other only; C found nobody and kept its tensor
        members = {str(peer_id) for peer_id in outcomes[0]}
        assert members == {str(averagers[0].peer_id), str(averagers[1].peer_id)}, outcomes
        assert {str(peer_id) for peer_id in outcomes[1]} == members
        assert not isinstance(outcomes[2], dict), outcomes[2]
        for index in range(2):
            torch.testing.assert_close(_tensor(averagers[index]), torch.full((SIZE,), 0.5))
        torch.testing.assert_close(_tensor(averagers[2]), torch.full((SIZE,), 1000.0))
        assert averagers[0].get_reputation()["banned"].keys() == {banned_id}


def _one_group_of_three(outcomes: list) -> bool:
    return all(isinstance(outcome, dict) and len(outcome) == 3 for outcome in outcomes)


def _round_where_a_bans_c(a_settings: RobustAveragingSettings, prefix: str) -> dict:
    """Three peers A, B, C holding 0, 1 and 2 (one 1024-value partition each, plain mean, values small enough to
    pass the result check); A bans C but lets it into groups (as if a leader that does not ban C had put them
    together: which peer leads cannot be chosen in a test); B trusts C. One round; what each peer got back."""
    size = 3 * 1024
    tensors = [[torch.zeros(size)], [torch.ones(size)], [torch.full((size,), 2.0)]]
    starts = [[t.clone() for t in held] for held in tensors]  # the averagers average `tensors` in place
    settings = [a_settings, RobustAveragingSettings(aggregator="mean"), RobustAveragingSettings(aggregator="mean")]
    with _swarm(tensors, settings, prefix=prefix) as averagers:
        ids = [str(averager.peer_id) for averager in averagers]
        averagers[0].ban_peer(ids[2], "test")
        # the round under test is one where all three are in one group; on a loaded machine (seen once in CI) a peer
        # can miss the group, and the others' round is then another one: the tensors go back and the round is redone
        for _ in range(ROUND_ATTEMPTS):
            outcomes = _step_all(averagers)
            if _one_group_of_three(outcomes):
                break
            for averager, start in zip(averagers, starts):
                with averager.get_tensors() as held:
                    held[0].copy_(start[0])
        assert _one_group_of_three(outcomes), outcomes
        order = [str(peer_id) for peer_id in outcomes[0]]  # partitions in group order
        by_reducer = {
            name: {reducer: _tensor(averager)[index * 1024 : (index + 1) * 1024] for index, reducer in enumerate(order)}
            for name, averager in zip("AB", averagers)
        }
        received = {name: averager.last_round_received_fraction for name, averager in zip("AB", averagers)}
        return {"ids": dict(zip("ABC", ids)), "by_reducer": by_reducer, "received": received}


def _assert_partitions(got: dict[str, torch.Tensor], expected: dict[str, float]) -> None:
    for reducer, value in expected.items():
        torch.testing.assert_close(got[reducer], torch.full((1024,), value), msg=f"partition of {reducer}")


def test_aggregates_of_a_banned_reducer_are_ignored():
    lenient = RobustAveragingSettings(aggregator="mean", refuse_banned_peers=False, avoid_banned_groups=False)
    run = _round_where_a_bans_c(lenient, "robust_banned_reducer")
    a, b, c = (run["ids"][name] for name in "ABC")
    # what A gets back from each reducer: its own reducer ignores C's part (mean of 0 and 1), B's reducer
    # averages all three, and C's aggregate is ignored: A keeps its own zeros there
    _assert_partitions(run["by_reducer"]["A"], {a: 0.5, b: 1.0, c: 0.0})
    # B trusts C as a reducer and as a sender; only A's reducer left C out
    _assert_partitions(run["by_reducer"]["B"], {a: 0.5, b: 1.0, c: 1.0})


def test_a_peer_grouped_with_a_peer_it_bans_takes_nothing_from_that_round_and_still_serves_the_others():
    run = _round_where_a_bans_c(RobustAveragingSettings(aggregator="mean", refuse_banned_peers=False), "robust_banned_group")
    a, b, c = (run["ids"][name] for name in "ABC")
    # A took nothing from the round: B's aggregate holds C's part, so only A's own values are free of C
    _assert_partitions(run["by_reducer"]["A"], {a: 0.0, b: 0.0, c: 0.0})
    assert run["received"]["A"] == 0.0
    # ... while it still reduced its partition for B, without C's part (mean of 0 and 1)
    _assert_partitions(run["by_reducer"]["B"], {a: 0.5, b: 1.0, c: 1.0})
    assert run["received"]["B"] == 1.0


@pytest.mark.parametrize("codec", ["blockwise8bit", "fp16"])
def test_identical_results_leave_every_member_with_the_same_bytes(codec):
    # Prepare: four honest peers, a lossy codec: hivemind's deltas would leave each peer its own compression errors
    from dragon_swarm.averaging.compression import make_compression

    honest = _honest_tensors(4, spread=0.5, seed=3)
    exact_mean = torch.stack(honest).mean(0)
    settings = RobustAveragingSettings(aggregator="mean")
    with _swarm([[t.clone()] for t in honest], settings, f"identical-{codec}", compression=make_compression(codec), identical_results=True) as averagers:
        # Act
        outcomes = _step_all(averagers)
        results = [_tensor(a) for a in averagers]
    # Assert: every member averaged with all four, holds exactly the same values, and they are the mean within the codec's error
    assert all(isinstance(o, dict) and len(o) == 4 for o in outcomes), outcomes
    for other in results[1:]:
        assert torch.equal(results[0], other)
    error = float((results[0] - exact_mean).abs().max()) / float(exact_mean.abs().max())
    assert error < (0.02 if codec == "blockwise8bit" else 1e-3), error
    assert not torch.equal(results[0], honest[0])


def test_deltas_by_default_leave_members_apart_under_a_lossy_codec():
    # The control for the test above: without identical_results the same round leaves the members apart
    from dragon_swarm.averaging.compression import make_compression

    honest = _honest_tensors(4, spread=0.5, seed=3)
    settings = RobustAveragingSettings(aggregator="mean")
    with _swarm([[t.clone()] for t in honest], settings, "deltas-8bit", compression=make_compression("blockwise8bit")) as averagers:
        outcomes = _step_all(averagers)
        results = [_tensor(a) for a in averagers]
    assert all(isinstance(o, dict) and len(o) == 4 for o in outcomes), outcomes
    assert any(not torch.equal(results[0], other) for other in results[1:])
