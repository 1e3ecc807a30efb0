"""The pure parts of local-expert mode: the outer Nesterov step, its round-start digest and the barrier's majority."""

import math

import torch

from dragon_swarm.training.local_trainer import REALIGN_LATE_FRACTION, OuterOptimizer, SpreadLayout, majority_digest, round_runs_to_end


def test_outer_step_is_nesterov_sgd_on_the_pseudo_gradient_from_the_round_start():
    p = torch.nn.Parameter(torch.tensor([1.0, 2.0]))
    outer = OuterOptimizer([p], lr=0.7, momentum=0.9)
    with torch.no_grad():
        p.sub_(torch.tensor([0.1, -0.2]))  # what the inner steps did
    g = outer.pseudo_gradient()
    assert torch.allclose(g[0], torch.tensor([0.1, -0.2]))
    outer.step(g)
    # v = g; p = start - lr * (g + momentum * v) = start - 0.7 * 1.9 * g
    assert torch.allclose(p.detach(), torch.tensor([1.0, 2.0]) - 0.7 * 1.9 * torch.tensor([0.1, -0.2]))
    assert torch.equal(outer.start[0], p.detach())  # the next round starts here
    before = p.detach().clone()
    outer.step([torch.zeros(2)])  # no progress: momentum alone still moves it
    assert torch.allclose(outer.velocity[0], 0.9 * torch.tensor([0.1, -0.2]))
    assert not torch.equal(p.detach(), before)


def test_outer_warmup_starts_as_plain_averaging_and_reaches_nesterov_after_its_rounds():
    p = torch.nn.Parameter(torch.tensor([1.0, 2.0]))
    outer = OuterOptimizer([p], lr=0.7, momentum=0.9, warmup_rounds=4)
    assert outer.schedule(1) == (1.0, 0.0)
    lr, momentum = outer.schedule(3)
    assert abs(lr - 0.85) < 1e-12 and abs(momentum - 0.45) < 1e-12
    assert outer.schedule(5) == outer.schedule(50) == (0.7, 0.9)
    with torch.no_grad():
        p.sub_(torch.tensor([0.1, -0.2]))
    outer.step(outer.pseudo_gradient(), round_number=1)
    # round 1 is plain averaging: the weights stay where the (averaged) inner steps took them
    assert torch.allclose(p.detach(), torch.tensor([0.9, 2.2]))
    no_ramp = OuterOptimizer([torch.nn.Parameter(torch.zeros(1))], lr=0.7, momentum=0.9)
    assert no_ramp.schedule(1) == (0.7, 0.9)


def test_trainers_that_apply_the_same_average_to_the_same_start_stay_bit_identical():
    a, b = torch.nn.Parameter(torch.full((5,), 0.3)), torch.nn.Parameter(torch.full((5,), 0.3))
    oa, ob = OuterOptimizer([a], 0.7, 0.9), OuterOptimizer([b], 0.7, 0.9)
    generator = torch.Generator().manual_seed(0)
    for _ in range(5):
        with torch.no_grad():  # different local progress, the same averaged pseudo-gradient
            a.sub_(torch.randn(5, generator=generator) * 0.01)
            b.sub_(torch.randn(5, generator=generator) * 0.01)
        average = [(oa.pseudo_gradient()[0] + ob.pseudo_gradient()[0]) / 2]
        oa.step(average)
        ob.step(average)
        assert torch.equal(a.detach(), b.detach()) and oa.digest() == ob.digest()


def test_a_trainer_out_of_step_has_another_digest_until_it_loads_the_swarm_s_state():
    a, b = torch.nn.Parameter(torch.zeros(4)), torch.nn.Parameter(torch.zeros(4))
    oa, ob = OuterOptimizer([a], 0.7, 0.9), OuterOptimizer([b], 0.7, 0.9)
    with torch.no_grad():
        a.sub_(0.1)
    oa.step(oa.pseudo_gradient())  # a stepped alone
    assert oa.digest() != ob.digest()
    ob.load([s.clone() for s in oa.start], [v.clone() for v in oa.velocity])
    assert oa.digest() == ob.digest() and torch.equal(a.detach(), b.detach())
    assert torch.equal(ob.velocity[0], oa.velocity[0])


def test_the_majority_digest_counts_our_own_and_breaks_ties_the_same_way_everywhere():
    assert majority_digest("aa", ["bb", "bb"]) == "bb"
    assert majority_digest("bb", ["aa", "bb"]) == "bb"
    assert majority_digest("aa", []) == "aa"
    # a 2-2 split: both halves pick the same side
    assert majority_digest("cc", ["cc", "dd", "dd"]) == majority_digest("dd", ["cc", "cc", "dd"]) == "cc"


def test_spread_layout_round_trips_and_gives_every_share_a_sample_of_the_whole_model():
    shapes = [torch.Size([50, 8]), torch.Size([7]), torch.Size([3, 3, 3])]
    layout = SpreadLayout(shapes, chunks=16)
    tensors = [torch.randn(s) for s in shapes]
    packed = layout.pack(tensors)
    assert [t.numel() for t in packed] == [t.numel() for t in layout.empty()]
    assert all(torch.equal(a, b) for a, b in zip(tensors, layout.unpack(packed)))
    # a quarter of the travelling list (one of 4 reducers) holds chunks from every quarter of the model
    for share in range(4):
        held = layout.order[share * 4 : (share + 1) * 4]
        assert sorted(i // 4 for i in held) == [0, 1, 2, 3], held


def _train(p: torch.nn.Parameter, step: torch.Tensor) -> None:
    with torch.no_grad():
        p.sub_(step)


def test_overlapped_rounds_keep_the_starts_identical_and_each_trainer_s_progress_on_top():
    """What `LocalExpertsTrainer` does with `outer_overlap`: at a boundary the pseudo-gradient goes out and training
    goes on; a few micro-batches later the round's average is applied under the progress made meanwhile."""
    a, b = torch.nn.Parameter(torch.full((6,), 0.5)), torch.nn.Parameter(torch.full((6,), 0.5))
    oa, ob = OuterOptimizer([a], 0.7, 0.9, overlap=True), OuterOptimizer([b], 0.7, 0.9, overlap=True)
    generator = torch.Generator().manual_seed(1)
    carried = {"a": torch.zeros(6), "b": torch.zeros(6)}  # trained after the last round went out, before it applied
    for _ in range(4):
        late = {}
        for name, p, outer in (("a", a, oa), ("b", b, ob)):
            step = torch.randn(6, generator=generator) * 0.01
            _train(p, step)
            sent = outer.pseudo_gradient()  # the boundary
            # a round's pseudo-gradient holds everything trained since the last one went out, nothing twice
            assert torch.allclose(sent[0], carried[name] + step, atol=1e-6)
            outer.mark_boundary()
            late[name] = (sent, torch.randn(6, generator=generator) * 0.01)
            _train(p, late[name][1])  # the next round trains while this one averages
        average = [(late["a"][0][0] + late["b"][0][0]) / 2]
        for name, p, outer in (("a", a, oa), ("b", b, ob)):
            outer.step(average, carry=outer.pseudo_gradient())  # the round ends a few micro-batches later
            # each trainer goes on from the swarm's start plus its own progress made since the boundary
            assert torch.allclose(p.detach(), outer.start[0] - late[name][1], atol=1e-6) and torch.equal(outer.base[0], outer.start[0])
            carried[name] = late[name][1]
        assert oa.digest() == ob.digest() and torch.equal(oa.start[0], ob.start[0])
    # the last round runs to its end: both trainers stop exactly at the same start
    final = [(oa.pseudo_gradient()[0] + ob.pseudo_gradient()[0]) / 2]
    oa.step(final)
    ob.step(final)
    assert torch.equal(a.detach(), b.detach()) and torch.equal(a.detach(), oa.start[0])


def test_a_lone_overlapped_trainer_with_plain_averaging_trains_as_if_there_were_no_rounds():
    p = torch.nn.Parameter(torch.zeros(4))
    outer = OuterOptimizer([p], lr=1.0, momentum=0.0, overlap=True)
    generator, total = torch.Generator().manual_seed(2), torch.zeros(4)
    for late_steps in (3, 0, 1, 2):  # 0: the round was still running at the next boundary, applied there
        step = torch.randn(4, generator=generator) * 0.1
        total += step
        _train(p, step)
        sent = outer.pseudo_gradient()
        outer.mark_boundary()
        for _ in range(late_steps):
            step = torch.randn(4, generator=generator) * 0.1
            total += step
            _train(p, step)
        outer.step(sent, carry=outer.pseudo_gradient())  # alone: the average is its own
        assert torch.allclose(p.detach(), -total, atol=1e-6)  # applying a round neither loses nor repeats progress
    outer.step(outer.pseudo_gradient())
    assert torch.allclose(outer.start[0], -total, atol=1e-6) and torch.equal(p.detach(), outer.start[0])


def test_synchronous_rounds_measure_progress_from_the_round_start_itself():
    p = torch.nn.Parameter(torch.ones(3))
    outer = OuterOptimizer([p], 0.7, 0.9)
    assert outer.base is outer.start  # one copy of the trunk, not two


def test_which_overlapped_rounds_run_to_their_end():
    assert round_runs_to_end(first=True, final=False, last_applied_late=0, sync_every=50)
    assert round_runs_to_end(first=False, final=True, last_applied_late=0, sync_every=50)
    late = int(REALIGN_LATE_FRACTION * 50)
    assert round_runs_to_end(first=False, final=False, last_applied_late=late, sync_every=50) is None
    reason = round_runs_to_end(first=False, final=False, last_applied_late=late + 1, sync_every=50)
    assert reason is not None and f"{late + 1} micro-batch" in reason


def _applied_late(seconds_per_micro_batch: list[float], rounds: int, sync_every: int, realign: bool) -> list[list[int]]:
    """The timeline `LocalExpertsTrainer.outer_step` makes of overlapped trainers that train at different speeds: a
    round ends (`network_s`) after the last trainer reached its boundary; a trainer that went on training applies
    it at its next micro-batch, and waits at its next boundary for a round still running. Each trainer's
    micro-batches between a round's boundary and its application, per round."""
    network_s = 2.0
    at_boundary = [sync_every * s for s in seconds_per_micro_batch]
    last_late = [0] * len(at_boundary)
    history: list[list[int]] = []
    for number in range(rounds):
        ends = max(at_boundary) + network_s
        lates = []
        for i, s in enumerate(seconds_per_micro_batch):
            to_end = round_runs_to_end(number == 0, False, last_late[i] if realign else 0, sync_every)
            if to_end:
                late, resume = 0, ends
            else:
                late, resume = min(math.ceil((ends - at_boundary[i]) / s), sync_every), at_boundary[i]
            at_boundary[i] = max(resume + sync_every * s, ends)
            lates.append(late)
            last_late[i] = late
        history.append(lates)
    return history


def test_a_trainer_ahead_of_the_swarm_comes_back_in_step():
    """Four trainers, one 10% faster than the others: without a synchronous round now and then the fast one's lead
    (how late it applies each round) grows by 5 micro-batches a round until a round is waited for at the next
    boundary; with it the lead stays near `REALIGN_LATE_FRACTION` of a round."""
    speeds = [0.9, 1.0, 1.0, 1.0]
    drifting = _applied_late(speeds, rounds=16, sync_every=50, realign=False)
    realigned = _applied_late(speeds, rounds=16, sync_every=50, realign=True)
    assert max(r[0] for r in drifting[-4:]) >= 40  # the fast trainer trains a whole round ahead of the others
    assert max(r[0] for r in realigned) <= REALIGN_LATE_FRACTION * 50 + 8
    assert sum(late == 0 for late, *_ in realigned[1:]) >= 3  # it did wait at some boundaries
    assert max(max(r[1:]) for r in realigned) <= 2  # the slowest trainers apply at their next micro-batch or so
