"""A placement change on a real expert host (one in-process DHT on loopback, hivemind's expert server): the experts
it keeps move into the new generation at the moment of the switch, so whatever trained them while the new experts
were downloading is kept, and the trainer's in-process dispatch hears of the new set."""

from __future__ import annotations

import torch

from dragon_swarm.config import load_config
from dragon_swarm.moe.hosting import ExpertHosting
from tests.averaging.loopback import start_loopback_dhts
from tests.swarm.paths import TEST_CONFIG


def test_a_placement_change_keeps_the_updates_made_during_its_downloads(tmp_path):
    config = load_config(str(TEST_CONFIG))
    dhts = []
    hosting = None
    try:
        (dht,) = start_loopback_dhts(1, dhts)
        hosting = ExpertHosting(dht, config, tmp_path / "experts", throughput=1000.0, periodic_sync=False)
        kept, added = hosting.all_uids[0], hosting.all_uids[1]
        heard: list[dict] = []
        hosting.listeners.append(heard.append)
        hosting.start([kept])
        before = hosting.backend(kept)
        real_fill = hosting._fill

        def fill_while_training(uid, backend):  # a trainer steps the kept expert while the new one downloads
            with before.lock, torch.no_grad():
                for p in before.module.parameters():
                    p.add_(1.0)
            real_fill(uid, backend)

        hosting._fill = fill_while_training
        trained = {k: v.clone() + 1.0 for k, v in before.module.state_dict().items()}
        hosting.change([kept, added], "test")

        after = hosting.backend(kept)
        assert after is not before and hosting.uids == [kept, added]
        for name, value in after.module.state_dict().items():
            assert torch.equal(value, trained[name]), name
        assert heard and heard[-1][kept] is after and set(heard[-1]) == {kept, added}
    finally:
        if hosting is not None:
            hosting.shutdown()
        for dht in dhts:
            dht.shutdown()
