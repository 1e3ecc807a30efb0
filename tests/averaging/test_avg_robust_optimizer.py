"""RobustAveragingSettings and make_grad_averager_factory, including two real hivemind.Optimizer peers on loopback."""

import multiprocessing
import threading
import time

import hivemind
import pytest
import torch
from hivemind.utils.crypto import RSAPrivateKey

from dragon_swarm.averaging.compression import install_codecs
from dragon_swarm.averaging.reputation import ReputationBook
from dragon_swarm.averaging.robust_optimizer import bounded_update_scale
from dragon_swarm.averaging.robust_allreduce import (
    RobustAveragingSettings,
    RobustGradientAverager,
    make_grad_averager_factory,
)

IN_FEATURES = 1023  # 1024 parameters with the bias ...
PART_SIZE_BYTES = 1024  # ... in four 256-value float32 parts: both peers of a group reduce some

# ---------------------------------------------------------------- settings, no network


@pytest.mark.parametrize(
    "bad",
    [
        dict(aggregator="krum"),
        dict(tau=0.0),
        dict(tau=float("inf")),
        dict(aggregator="trimmed_mean", trim_ratio=0.5),
        dict(max_iters=0),
        dict(aggregator="mean", max_weight=0.0),
        dict(ban_seconds=-1.0),
        dict(max_invalid=0),
        dict(ema_alpha=2.0),
    ],
)
def test_bad_settings_raise_on_construction(bad):
    with pytest.raises(ValueError):
        RobustAveragingSettings(**bad)


@pytest.mark.parametrize("aggregator", ["mean", "median", "trimmed_mean", "centered_clip"])
def test_settings_build_the_named_aggregator(aggregator):
    settings = RobustAveragingSettings(aggregator=aggregator, tau=5.0, trim_ratio=0.25, max_weight=2.0)

    built = settings.make_aggregator()

    assert built.__name__.startswith(f"{aggregator}(")
    parts = torch.tensor([[0.0], [1.0], [2.0], [3.0], [100.0]])
    assert built(parts).value.shape == (1,)


def test_settings_build_a_book_with_their_ban_policy():
    settings = RobustAveragingSettings(
        ban_seconds=7.0, max_invalid=2, ban_distance_ratio=3.0, min_observations=4, ema_alpha=0.5
    )

    book = settings.make_reputation_book()

    assert (book.ban_seconds, book.max_invalid, book.ban_distance_ratio) == (7.0, 2, 3.0)
    assert (book.min_observations, book.ema_alpha) == (4, 0.5)


def test_averager_rejects_untyped_settings():
    with pytest.raises(TypeError):
        RobustGradientAverager([], settings={"aggregator": "mean"}, dht=None, prefix="x", start=False)


def test_factory_refuses_arguments_the_optimizer_sets():
    factory = make_grad_averager_factory(RobustAveragingSettings(), target_group_size=4, compression=None)

    with pytest.raises(TypeError, match="compression"):
        factory(dht=None, prefix="x", parameters=[], compression=None, start=False)


# ---------------------------------------------------------------- two hivemind.Optimizer peers


@pytest.mark.swarm
@pytest.mark.parametrize(
    "update, own, expected",
    [
        (1.0, 1.0, 1.0),  # an honest average: about our norm
        (4.9, 1.0, 1.0),  # within the slack (another peer's noisier gradient)
        (50.0, 1.0, 0.1),  # a poisoned round: brought down to 5x ours
        (50.0, 0.0, 1.0),  # nothing of ours to judge by (all our micro-batches dropped)
        (float("inf"), 1.0, 1.0),  # non-finite: validation's job, not a scale's
    ],
)
def test_an_averaged_step_far_beyond_our_own_gradient_is_scaled_to_the_slack(update, own, expected):
    assert bounded_update_scale(update, own, slack=5.0) == pytest.approx(expected)


def test_two_optimizer_peers_train_through_the_robust_grad_averager():
    # Prepare: two peers with identical models, each with its own DHT, robust gradient averaging
    if multiprocessing.get_start_method(allow_none=True) != "fork":
        multiprocessing.set_start_method("fork", force=True)
    install_codecs()
    settings = RobustAveragingSettings(aggregator="centered_clip", tau=10.0, relative_tau=False)
    seed_book = ReputationBook()
    seed_book.ban("12D3KooWSomeoneWeBannedEarlier", "restored from disk")
    dhts, optimizers, errors = [], [], []
    try:
        dhts.append(hivemind.DHT(host_maddrs=["/ip4/127.0.0.1/tcp/0"], start=True))
        initial_peers = [str(maddr) for maddr in dhts[0].get_visible_maddrs()]
        dhts.append(hivemind.DHT(host_maddrs=["/ip4/127.0.0.1/tcp/0"], initial_peers=initial_peers, start=True))
        models = []
        for dht in dhts:
            torch.manual_seed(0)
            model = torch.nn.Linear(IN_FEATURES, 1)
            models.append(model)
            optimizers.append(
                hivemind.Optimizer(
                    dht=dht,
                    run_id="robust_opt_test",
                    params=model.parameters(),
                    optimizer=lambda params: torch.optim.SGD(params, lr=0.1),
                    target_batch_size=32,
                    batch_size_per_step=4,
                    matchmaking_time=1.5,
                    averaging_timeout=15.0,
                    average_state_every=1000,  # keep this test about gradients
                    # two trackers in one process would share the process-wide key and overwrite each other's record
                    tracker_opts=dict(private_key=RSAPrivateKey()),
                    grad_averager_factory=make_grad_averager_factory(
                        settings,
                        reputation=seed_book,
                        request_timeout=0.5,
                        min_group_size=2,
                        part_size_bytes=PART_SIZE_BYTES,
                    ),
                )
            )

        def train(index):
            try:
                generator = torch.Generator().manual_seed(index)
                while optimizers[index].local_epoch < 2:
                    x = torch.randn(4, IN_FEATURES, generator=generator)
                    loss = (models[index](x) - x.sum(dim=1, keepdim=True)).pow(2).mean()
                    loss.backward()
                    optimizers[index].step()
                    optimizers[index].zero_grad()
                    time.sleep(0.05)
            except BaseException as e:
                errors.append(e)

        # one step each publishes progress; then wait until each tracker sees both peers, or each would step
        # alone with its local gradients
        for index in range(2):
            models[index](torch.zeros(4, IN_FEATURES)).pow(2).mean().backward()
            optimizers[index].step()
            optimizers[index].zero_grad()
        deadline = time.monotonic() + 30
        while min(opt.tracker.global_progress.num_peers for opt in optimizers) < 2:
            assert time.monotonic() < deadline, "the progress trackers did not see each other in 30 s"
            time.sleep(0.1)

        initial = [param.detach().clone() for param in models[0].parameters()]

        # Execute
        threads = [threading.Thread(target=train, args=(i,)) for i in range(2)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=60)

        # Assert: both reached epoch 2 by applying the same averaged gradients (same start, so same weights now);
        # each averager process saw the other peer and kept the seeded ban
        assert not errors, errors
        assert not any(thread.is_alive() for thread in threads), "training did not reach epoch 2 in 60 s"
        for first, second, start in zip(models[0].parameters(), models[1].parameters(), initial):
            torch.testing.assert_close(first, second)
            assert not torch.equal(first, start), "the weights did not change"
        for index, opt in enumerate(optimizers):
            assert isinstance(opt.grad_averager, RobustGradientAverager)
            snapshot = opt.grad_averager.get_reputation()
            other = str(dhts[1 - index].peer_id)
            assert other in snapshot["peers"] and snapshot["peers"][other]["parts"] >= 1, snapshot
            assert "12D3KooWSomeoneWeBannedEarlier" in snapshot["banned"]
    finally:
        for opt in optimizers:
            opt.shutdown()
        for dht in dhts:
            dht.shutdown()
