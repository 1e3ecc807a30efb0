"""Real loopback swarms with Byzantine trainers (the hidden, test-only `--attack` mode).

Three runs: CenteredClip with three honest trainers and one sign-flipping (x-1000) trainer, and the same swarm
under plain (capped-weight) mean: honest trainers must learn in the first and must not in the second. A third,
smaller swarm of two honest trainers and a NaN sender: the sender must be rejected and banned while training
continues. A fourth with verification by recomputation on: two honest trainers, one that sends honest-looking
gradients of other batches (which no distance rule can see), which must be caught and banned, and one that publishes
false evidence against whomever it checks, which must be refuted and banned; no honest trainer banned.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml

from dragon_swarm.averaging.ban_store import BANS_FILE, load_bans
from benchmarks.local_peers import PeerLauncher, PeerProcess, read_stats
from tests.swarm.paths import TEST_CONFIG

pytestmark = [pytest.mark.swarm, pytest.mark.slow]

STEPS = 25
NAN_STEPS = 16
MEAN_STEPS = 14
VERIFIED_STEPS = 20


@dataclass
class Trainer:
    process: PeerProcess
    stats: Path
    attack: str | None

    @property
    def peer_id(self) -> str:
        return self.process.initial_peers()[0].rsplit("/p2p/", 1)[1]

    def losses(self) -> list[float]:
        return [r["loss"] for r in read_stats(self.stats)]

    @property
    def state_dir(self) -> Path:
        return self.stats.parent / f"t{self.stats.stem.removeprefix('trainer')}"  # run_swarm's names

    def bans(self) -> set[str]:
        """Trainers this one banned: in any stats line, or still banned when it stopped (its saved `bans.json`:
        a ban after its last micro-batch, e.g. from judging evidence, shows only there)."""
        banned = {peer for r in read_stats(self.stats) for peer in r["banned_peers"]}
        return banned | set(load_bans(self.state_dir / BANS_FILE))


def run_swarm(
    launcher: PeerLauncher,
    name: str,
    aggregator: str,
    attacks: list[str | None],
    steps: int = STEPS,
    attackers_until_honest_finish: bool = False,
    settings_update: dict | None = None,
) -> list[Trainer]:
    """Start a bootstrap, an expert host and one trainer per entry of `attacks`; wait until they finish.

    :param attackers_until_honest_finish: attackers run without a step limit and are stopped once the honest
      trainers are done (an attacker whose steps are cheap would otherwise finish before anyone averages)
    """
    work = launcher.log_dir / name
    work.mkdir()
    config = work / "config.yaml"
    settings = yaml.safe_load(TEST_CONFIG.read_text())
    settings["averaging"]["aggregator"] = aggregator
    # five processes share two cores here: give every trainer time to make it into the one averaging group
    settings["averaging"]["matchmaking_time"] = 3.0
    for section, values in (settings_update or {}).items():
        settings.setdefault(section, {}).update(values)
    config.write_text(yaml.safe_dump(settings))
    boot = launcher.start(f"{name}-boot", ["--identity", str(work / "boot.key")], module="dragon_swarm.bootstrap")
    peers = boot.initial_peers()
    common = ["-c", str(config), "--initial-peers", *peers]
    host = launcher.start(f"{name}-host", [*common, "--no-train", "--experts", "all", "--state-dir", str(work / "host")])
    host.wait_for_log("Serving 8 expert(s)", timeout=120)
    trainers = []
    for i, attack in enumerate(attacks):
        stats = work / f"trainer{i}.jsonl"
        args = [*common, "--no-host", "--state-dir", str(work / f"t{i}"), "--stats-file", str(stats)]
        if attack is None or not attackers_until_honest_finish:
            args += ["--max-steps", str(steps)]
        if attack is not None:
            args += ["--attack", attack]
        trainers.append(Trainer(launcher.start(f"{name}-trainer{i}", args), stats, attack))
    for trainer in trainers:
        if trainer.attack is None or not attackers_until_honest_finish:
            trainer.process.wait(timeout=600)
    for trainer in trainers:
        if trainer.attack is not None and attackers_until_honest_finish:
            trainer.process.stop()
    return trainers


@pytest.fixture(scope="module")
def robust_run(module_launcher) -> list[Trainer]:
    return run_swarm(module_launcher, "robust", "centered_clip", [None, None, None, "sign_flip"])


@pytest.fixture(scope="module")
def mean_run(module_launcher) -> list[Trainer]:
    # a control (the attack reaches the average when nothing robust stands in its way): fewer steps show it
    return run_swarm(module_launcher, "mean", "mean", [None, None, None, "sign_flip"], steps=MEAN_STEPS)


@pytest.fixture(scope="module")
def nan_run(module_launcher) -> list[Trainer]:
    return run_swarm(
        module_launcher, "nan", "centered_clip", [None, None, "nan"], steps=NAN_STEPS, attackers_until_honest_finish=True
    )


@pytest.fixture(scope="module")
def verified_run(module_launcher) -> list[Trainer]:
    # every sender checked every round (checks_per_round = trainers), so the test needs few rounds
    verification = {"verification": {"enabled": True, "checks_per_round": 4}}
    return run_swarm(
        module_launcher, "verified", "centered_clip", [None, None, "other_batch", "false_evidence"], steps=VERIFIED_STEPS,
        attackers_until_honest_finish=True, settings_update=verification,
    )  # fmt: skip


def honest(trainers: list[Trainer]) -> list[Trainer]:
    return [t for t in trainers if t.attack is None]


def drop(trainer: Trainer) -> tuple[float, float]:
    losses = trainer.losses()
    return sum(losses[:5]) / 5, sum(losses[-5:]) / 5


def test_centered_clip_trains_through_a_sign_flipper(robust_run):
    for trainer in honest(robust_run):
        assert trainer.process.proc.returncode == 0, trainer.process.stderr()[-3000:]
        assert len(trainer.losses()) == STEPS
        first, last = drop(trainer)
        assert last < first - 0.2, f"honest loss did not fall under CenteredClip: {first:.3f} -> {last:.3f}"
    # and together they learn: the honest trainers' mean loss falls by more than 0.4 nats in 25 steps
    # (clean 4-trainer runs: ~1.8; the same swarm under mean: ~0.1, see the next test)
    drops = [first - last for first, last in map(drop, honest(robust_run))]
    assert sum(drops) / len(drops) > 0.4, drops


def test_mean_does_not_survive_a_sign_flipper(mean_run):
    for trainer in honest(mean_run):
        assert trainer.losses(), trainer.process.stderr()[-3000:]
        first, last = drop(trainer)
        assert not last < first - 0.4, f"mean should not train through a x-1000 sign flip: {first:.3f} -> {last:.3f}"


def test_nan_sender_is_rejected_and_banned_while_training_continues(nan_run):
    nan_peer = next(t for t in nan_run if t.attack == "nan").peer_id
    banned_by, rejected_by = [], []
    for trainer in honest(nan_run):
        assert trainer.process.proc.returncode == 0, trainer.process.stderr()[-3000:]
        records = read_stats(trainer.stats)
        assert records[-1]["micro_batches"] == NAN_STEPS  # training went on
        assert all(math.isfinite(r["loss"]) for r in records)  # no NaN reached an honest model
        if records[-1]["rejected_parts"] > 0:
            rejected_by.append(trainer.process.name)
        if any(nan_peer in r["banned_peers"] for r in records):
            assert f"Banned trainer {nan_peer}" in trainer.process.stderr()
            banned_by.append(trainer.process.name)
            # the ban is in the state dir, where a restart picks it up (`averaging.ban_store`)
            assert nan_peer in load_bans(trainer.state_dir / BANS_FILE), f"{trainer.process.name} did not save its ban"
    # a peer that was sent a NaN part holds proof: it bans at once and publishes the signed part (an accusation);
    # a peer that never shared a group with the NaN sender bans it on that proof (`averaging.accusations`)
    assert rejected_by, "no honest trainer was sent a NaN part: the NaN sender never averaged with anyone"
    assert set(rejected_by) <= set(banned_by)
    logs = {t.process.name: t.process.stderr() for t in honest(nan_run)}
    assert any(f"Accusing trainer {nan_peer}" in log for log in logs.values()), "no accusation was published"
    for name in set(banned_by) - set(rejected_by):
        assert "proof published by" in logs[name], f"{name} banned the NaN sender without a part or a proof"
    assert not any("Ignoring an accusation" in log for log in logs.values())  # honest accusations all verify


def test_recomputation_catches_another_batch_s_gradient_and_refutes_false_evidence(verified_run):
    liar = next(t for t in verified_run if t.attack == "other_batch")
    accuser = next(t for t in verified_run if t.attack == "false_evidence")
    honest_ids = {t.peer_id for t in honest(verified_run)}
    logs = {t.process.name: t.process.stderr() for t in verified_run}
    everything = "\n".join(line for log in logs.values() for line in log.splitlines() if "erif" in line or "vidence" in line)
    honest_checks, caught_by = 0, []
    for trainer in honest(verified_run):
        name, log = trainer.process.name, logs[trainer.process.name]
        assert trainer.process.proc.returncode == 0, log[-3000:]
        banned = trainer.bans()
        # caught by this trainer's own check or by confirming another's evidence: banned. (A trainer that missed a
        # round holds another model under the same version number for a while: it can neither check nor judge)
        if f"Trainer {liar.peer_id[-8:]} lied in round" in log or f"Confirmed evidence against trainer {liar.peer_id[-8:]}" in log:
            assert liar.peer_id in banned, f"{name} caught the other-batch sender but did not ban it"
            caught_by.append(name)
        # no honest trainer is banned by an honest one, whatever the accuser published
        assert not banned & honest_ids, f"{name} banned an honest trainer:\n{everything}"
        for peer in honest_ids:
            assert f"Trainer {peer[-8:]} lied" not in log, f"{name} accused an honest trainer"
            assert not re.search(rf"Trainer {peer[-8:]} .* times in a row: banning it", log), f"{name} struck out an honest trainer"
        honest_checks += len(re.findall(r"Verified round \d+ of trainer \w+ .*: honest, error", log))
    assert caught_by, f"no honest trainer caught the other-batch sender:\n{everything}"
    assert honest_checks > 0
    # the false accuser's evidence against honest trainers is recomputed by the others, refuted, and costs it a ban
    refuted_by = [
        t.process.name for t in honest(verified_run)
        if re.search(rf"Evidence from {accuser.peer_id[-8:]} against \w+ is false; banning the accuser", logs[t.process.name])
    ]  # fmt: skip
    assert refuted_by, f"nobody refuted the false evidence:\n{everything}"
    for name in refuted_by:
        trainer = next(t for t in verified_run if t.process.name == name)
        assert accuser.peer_id in trainer.bans(), f"{name} refuted the false evidence but did not ban the accuser"
