"""Local-expert mode under attack, on a real loopback swarm: three honest trainers and one that sends a
sign-flipped pseudo-gradient (x1000) every outer round. The robust all-reduce and the ban policy are the trunk's
usual ones: the attacker must be banned and the honest trainers must keep learning."""

from __future__ import annotations

import math
import re

import pytest
import yaml

from benchmarks.local_peers import read_stats
from dragon_swarm.config import load_config
from tests.swarm.paths import TEST_CONFIG

pytestmark = [pytest.mark.swarm, pytest.mark.slow]

STEPS = 16  # 4 outer rounds: bans take 3 (averaging.ban_rounds)
HONEST = 3
BAN_ROUNDS = load_config(str(TEST_CONFIG)).averaging.ban_rounds


@pytest.fixture(scope="module")
def swarm(module_launcher):
    log_dir = module_launcher.log_dir
    raw = yaml.safe_load(TEST_CONFIG.read_text())
    raw["training"]["mode"] = "local_experts"
    config = log_dir / "local.yaml"
    config.write_text(yaml.safe_dump(raw))
    initial = module_launcher.bootstrap().initial_peers()

    def start(name: str, *extra: str):
        args = ["-c", str(config), "--initial-peers", *initial, "--state-dir", str(log_dir / name), "--max-experts", "6",
                "--max-steps", str(STEPS), "--stats-file", str(log_dir / f"{name}.jsonl"), *extra]  # fmt: skip
        return module_launcher.start(name, args)

    honest = [start(f"trainer{i}") for i in range(HONEST)]
    attacker = start("attacker", "--attack", "sign_flip")
    codes = [t.wait(timeout=500) for t in honest]
    attacker.wait(timeout=120)
    return log_dir, honest, attacker, codes


def full_rounds(stderr: str) -> int:
    """Outer rounds in which this trainer averaged its trunk with all 3 others (the attacker among them)."""
    return len(re.findall(rf"Outer step \d+: trunk averaged with {HONEST} other trainer", stderr))


def test_the_sign_flipper_is_banned_by_the_honest_trainers(swarm):
    _, honest, attacker, codes = swarm
    assert codes == [0] * HONEST, [t.stderr()[-2000:] for t in honest]
    attacker_id = re.search(r"peer id (Qm\w+)", attacker.stderr()).group(1)
    banned_by = [t.name for t in honest if re.search(rf"banned {attacker_id} for \d+ s", t.stderr())]
    rounds_with_attacker = {t.name: full_rounds(t.stderr()) for t in honest}
    assert banned_by, f"nobody banned the attacker; rounds each trainer averaged with it: {rounds_with_attacker}"
    # a trainer that missed a round (seen in CI: a slow start or a group that formed without it) has seen the attacker
    # fewer than ban_rounds times when the others ban it, and from then on the attacker is not in their groups: only
    # a trainer that averaged with it in ban_rounds rounds owes a ban
    owed = [name for name, rounds in rounds_with_attacker.items() if rounds >= BAN_ROUNDS]
    assert set(owed) <= set(banned_by), f"banned by {banned_by}; rounds each averaged with the attacker: {rounds_with_attacker}"


def test_the_honest_trainers_keep_learning(swarm):
    log_dir, honest, _, _ = swarm
    runs = {t.name: read_stats(log_dir / f"{t.name}.jsonl") for t in honest}
    from_the_start = [records[0]["loss"] for records in runs.values() if records[0]["epoch"] == 0]
    assert from_the_start, "no honest trainer trained from the first model version"
    initial = sum(from_the_start) / len(from_the_start)
    for name, records in runs.items():
        assert all(math.isfinite(r["loss"]) for r in records)
        # a trainer whose start was slow (seen in CI: its expert downloads waited ~50 s) joins at a later version
        # with the others' trained trunk and may train the rest alone: it must end below the swarm's initial loss
        first = records[0]["loss"] if records[0]["epoch"] == 0 else initial
        last = sum(r["loss"] for r in records[-3:]) / 3
        assert last < first - 0.3, f"{name}: loss {first:.3f} -> {last:.3f} (joined at model version {records[0]['epoch']})"
