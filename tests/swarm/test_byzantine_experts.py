"""A real loopback swarm with a Byzantine expert host and a Byzantine trainer on the expert path (the hidden,
test-only `--expert-attack` modes).

One swarm, two attacks: a host serving every expert with x100 outputs (`scale_outputs`) and a trainer sending x1000
gradients to the experts (`scale_grads`). The two honest trainers also host every expert, so each expert keeps honest
replicas and each honest trainer holds a trusted copy to cross-check remote replicas against; the Byzantine trainer
hosts nothing and must rely on the majority of the three replicas. Every trainer must ban the lying host within its
first 20 calls to it and never an honest one, and the honest trainers must learn as much as under a Byzantine
gradient sender in the averaging tests.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml

from benchmarks.local_peers import PeerLauncher, PeerProcess, read_stats
from tests.swarm.paths import TEST_CONFIG

pytestmark = [pytest.mark.swarm, pytest.mark.slow]

STEPS = 25
BAN = re.compile(r"Expert (\S+) on (\S+) refused as Byzantine: .* after (\d+) call\(s\) to this host\)")


@dataclass
class Peer:
    process: PeerProcess
    stats: Path | None = None

    @property
    def peer_id(self) -> str:
        return self.process.initial_peers()[0].rsplit("/p2p/", 1)[1]

    def losses(self) -> list[float]:
        return [r["loss"] for r in read_stats(self.stats)]

    def expert_bans(self) -> list[tuple[str, str, int]]:
        """(uid, host, calls to that host so far) per Byzantine ban, in order."""
        return [(uid, host, int(calls)) for uid, host, calls in BAN.findall(self.process.stderr())]


@dataclass
class Swarm:
    liar: Peer
    honest: list[Peer]
    grad_scaler: Peer

    @property
    def trainers(self) -> list[Peer]:
        return [*self.honest, self.grad_scaler]


@pytest.fixture(scope="module")
def swarm(module_launcher: PeerLauncher) -> Swarm:
    work = module_launcher.log_dir / "experts"
    work.mkdir()
    config = work / "config.yaml"
    settings = yaml.safe_load(TEST_CONFIG.read_text())
    settings["averaging"]["matchmaking_time"] = 3.0  # five busy processes on two cores: give averaging time
    config.write_text(yaml.safe_dump(settings))
    boot = module_launcher.start("boot", ["--identity", str(work / "boot.key")], module="dragon_swarm.bootstrap")
    common = ["-c", str(config), "--initial-peers", *boot.initial_peers()]
    liar = Peer(module_launcher.start("liar", [*common, "--no-train", "--experts", "all", "--state-dir", str(work / "liar"), "--expert-attack", "scale_outputs"]))
    liar.process.wait_for_log("Serving 8 expert(s)", timeout=120)

    def trainer(name: str, *extra: str) -> Peer:
        stats = work / f"{name}.jsonl"
        args = [*common, "--state-dir", str(work / name), "--stats-file", str(stats), "--max-steps", str(STEPS), *extra]
        return Peer(module_launcher.start(name, args), stats)

    honest = [trainer(f"honest{i}", "--experts", "all") for i in range(2)]
    grad_scaler = trainer("grad-scaler", "--no-host", "--expert-attack", "scale_grads")
    for peer in [*honest, grad_scaler]:
        peer.process.wait(timeout=600)
    return Swarm(liar, honest, grad_scaler)


def test_every_trainer_bans_the_lying_host_within_20_calls(swarm):
    liar = swarm.liar.peer_id
    for trainer in swarm.trainers:
        assert trainer.process.proc.returncode == 0, trainer.process.stderr()[-3000:]
        banned_liar = [calls for _, host, calls in trainer.expert_bans() if host == liar]
        assert banned_liar, f"{trainer.process.name} never banned the x100 host:\n{trainer.process.stderr()[-3000:]}"
        assert banned_liar[0] <= 20, f"{trainer.process.name} banned the x100 host only after {banned_liar[0]} calls to it"


def test_no_trainer_bans_an_honest_host(swarm):
    """Cross-checks assume the replicas of an expert stay close (replica sync, `experts.sync_period`); honest replicas
    that drift apart look like liars to each other."""
    honest_hosts = {peer.peer_id for peer in swarm.honest}
    for trainer in swarm.trainers:
        wrongly = [(uid, host, calls) for uid, host, calls in trainer.expert_bans() if host in honest_hosts]
        why = [line for line in trainer.process.stderr().splitlines() if "refused as Byzantine" in line and any(f" on {h} refused" in line for h in honest_hosts)]
        assert not wrongly, f"{trainer.process.name} banned honest hosts (uid, host, calls to it): {wrongly}\n" + "\n".join(why[:5])


def test_honest_trainers_learn_through_a_lying_host_and_a_gradient_scaler(swarm):
    drops = []
    for trainer in swarm.honest:
        assert trainer.process.proc.returncode == 0, trainer.process.stderr()[-3000:]
        losses = trainer.losses()
        assert len(losses) == STEPS
        first, last = sum(losses[:5]) / 5, sum(losses[-5:]) / 5
        assert last < first - 0.2, f"{trainer.process.name}: loss did not fall: {first:.3f} -> {last:.3f}"
        drops.append(first - last)
    # the margin tests/swarm/test_byzantine_swarm.py asks of honest trainers beside a x1000 gradient sender
    assert sum(drops) / len(drops) > 0.4, drops
