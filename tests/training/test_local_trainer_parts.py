"""The pure parts of local-expert mode: the outer Nesterov step and the layout of a round's all-reduce."""

import torch

from dragon_swarm.training.local_trainer import OuterOptimizer, RoundLayout


def test_outer_step_is_nesterov_sgd_on_the_pseudo_gradient_from_the_given_start():
    p = torch.nn.Parameter(torch.tensor([1.0, 2.0]))
    outer = OuterOptimizer([p], lr=0.7, momentum=0.9)
    with torch.no_grad():
        p.sub_(torch.tensor([0.1, -0.2]))  # what the inner steps did
    g = outer.pseudo_gradient()
    assert torch.allclose(g[0], torch.tensor([0.1, -0.2]))
    outer.step([torch.tensor([1.0, 2.0])], g)
    # v = g; p = start - lr * (g + momentum * v) = start - 0.7 * 1.9 * g
    assert torch.allclose(p.detach(), torch.tensor([1.0, 2.0]) - 0.7 * 1.9 * torch.tensor([0.1, -0.2]))
    assert torch.equal(outer.start[0], p.detach())  # the next round starts here
    outer.step([p.detach().clone()], [torch.zeros(2)])  # no progress: momentum alone still moves it
    assert torch.allclose(outer.velocity[0], 0.9 * torch.tensor([0.1, -0.2]))


def test_an_averaged_start_heals_a_trainer_that_drifted():
    a, b = torch.nn.Parameter(torch.zeros(3)), torch.nn.Parameter(torch.ones(3))  # two trainers, different starts
    oa, ob = OuterOptimizer([a], 0.7, 0.9), OuterOptimizer([b], 0.7, 0.9)
    common_start, common_g = [torch.full((3,), 0.5)], [torch.full((3,), 0.01)]
    oa.step(common_start, common_g)
    ob.step(common_start, common_g)
    assert torch.equal(a.detach(), b.detach())


def test_round_layout_round_trips_and_spreads_every_quantity_over_the_vector():
    shapes = [torch.Size([7, 5]), torch.Size([3]), torch.Size([2, 2, 2])]
    layout = RoundLayout(shapes, chunks=4)
    start = [torch.randn(s) for s in shapes]
    pseudo = [torch.randn(s) for s in shapes]
    velocity = [torch.randn(s) for s in shapes]
    packed = layout.pack(start, pseudo, velocity)
    assert [t.numel() for t in packed] == [t.numel() for t in layout.empty()]
    back = layout.unpack(packed)
    for original, restored in zip((start, pseudo, velocity), back):
        assert all(torch.equal(x, y) for x, y in zip(original, restored))
    # every quarter of the flattened vector (what one of 4 group members reduces) holds pseudo-gradient values
    flat_kind = torch.cat([torch.full((t.numel(),), k % 3) for k, t in enumerate(packed)])
    for quarter in flat_kind.tensor_split(4):
        assert (quarter == 1).any()
