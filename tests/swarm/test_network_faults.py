"""Network and disk faults on a real loopback swarm (issue 12, item 1): a trainer SIGKILLed as an all-reduce begins,
a link cut between two halves of the swarm and healed, a state dir that stops taking writes.

One swarm serves the module: a bootstrap, and two halves, each with its own expert host (``--experts all``) so
both can train while they cannot reach each other:

    half A: bootstrap, host-a, trainer-a1, trainer-a2        half B: host-b, trainer-b1

Every peer sits behind its own :class:`GatedLink` (a ``benchmarks.wan_link.WanLink``: the peer listens on a private
port and announces the link's). libp2p dials from its listen port, so a link knows which peer dialed it; cutting
the halves apart makes every link refuse (and drop) the connections dialed from the other half's private ports,
while connections within a half go on. A connection A dials to B crosses B's link only, so it takes the links of
*both* halves to cut them apart; a plain ``WanLink.cut()`` would cut a peer off from its own half too.

The phases run in the order of the tests, each starting from a swarm whose trainers train together: the cut and
heal, then the SIGKILL (of trainer-a2), then the unwritable state dir (of trainer-a1). Each test waits generously
(this runs on 2 shared cores) and asserts strictly on what the peers logged and wrote to their stats files. What
was measured (times to recover, micro-batches while cut, state downloads, bans) goes to <log dir>/measured.yaml.
"""

from __future__ import annotations

import asyncio
import hashlib
import math
import os
import shutil
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import pytest
import yaml

from benchmarks.local_peers import PeerProcess, read_stats, wait_for_stats
from benchmarks.wan_link import WanLink, _abort, free_port
from dragon_swarm.config import load_config
from dragon_swarm.model import HRMSMoE, LocalExperts
from dragon_swarm.training.checkpoint import CHECKPOINT_NAME, read_trainer_state
from tests.swarm.paths import TEST_CONFIG

pytestmark = [pytest.mark.swarm, pytest.mark.slow]

CONFIG = yaml.safe_load(TEST_CONFIG.read_text())
AVERAGING_TIMEOUT = float(CONFIG["averaging"]["averaging_timeout"])  # 30 s in swarm-test.yaml
# The 60 s of cut: longer than the averaging timeout (30 s: a round that straddles the cut has failed by then,
# which leaves 30 s to see each half train at its own pace), the expert records' expiration (8 s) and hivemind's
# progress records (60 s: by the heal each half has forgotten the other). A 40 s cut saves 20 s of the module's
# ~5 minutes but leaves too little time after the straddling rounds fail to tell a stalled half from a slow one.
CUT_S = 60.0
SLACK_S = 30.0  # on top of the averaging timeout: scheduling on 2 busy cores, a micro-batch, a stats line


class GatedLink(WanLink):
    """A WanLink that can be closed to some dialers: while :meth:`only_from` is in force it refuses new connections
    from any source port outside ``allowed`` and drops the ones it carries from them; :meth:`open` lifts it."""

    def __init__(self, target_port: int):
        super().__init__(target_port)
        self.allowed: frozenset[int] | None = None
        self.refused = 0  # connections refused or dropped by the gate
        self._dialer_port: dict[asyncio.Task, int] = {}

    def start(self) -> "GatedLink":
        super().start()
        self._loop.call_soon_threadsafe(self._loop.set_exception_handler, _quiet_about_cut_connections)
        return self

    async def _accept(self, client_reader, client_writer) -> None:
        peer = client_writer.get_extra_info("peername")
        port = peer[1] if peer else 0
        if self.allowed is not None and port not in self.allowed:
            self.refused += 1
            _abort(client_writer)
            return
        task = asyncio.current_task()
        self._dialer_port[task] = port
        try:
            await super()._accept(client_reader, client_writer)
        finally:
            self._dialer_port.pop(task, None)

    def only_from(self, ports) -> None:
        self.allowed = frozenset(ports)
        self._call(self._drop_others())

    def open(self) -> None:
        self.allowed = None

    async def _drop_others(self) -> None:
        doomed = [task for task, port in self._dialer_port.items() if port not in self.allowed]
        self.refused += len(doomed)
        for task in doomed:
            task.cancel()
        await asyncio.gather(*doomed, return_exceptions=True)


def _quiet_about_cut_connections(loop: asyncio.AbstractEventLoop, context: dict) -> None:
    """The link's loop: a connection cut on purpose (a cancelled connection task, a reset) is no error to log."""
    if isinstance(context.get("exception"), (asyncio.CancelledError, ConnectionError)):
        return
    loop.default_exception_handler(context)


@dataclass
class Member:
    name: str
    half: str
    link: GatedLink
    private_port: int
    process: PeerProcess | None = None
    stats: Path | None = None
    state_dir: Path | None = None

    @property
    def flags(self) -> list[str]:
        return ["--host-maddrs", f"/ip4/127.0.0.1/tcp/{self.private_port}", "--announce-maddrs", f"/ip4/127.0.0.1/tcp/{self.link.port}"]

    def records(self) -> list[dict]:
        return read_stats(self.stats)

    def log_size(self) -> int:
        return self.process.stderr_path.stat().st_size

    def log_since(self, offset: int) -> str:
        return self.process.stderr_path.read_bytes()[offset:].decode(errors="replace")


@dataclass
class Swarm:
    log_dir: Path
    members: dict[str, Member]
    notes: dict = field(default_factory=dict)  # what was measured: written to measured.yaml, printed at the end

    def trainers(self, alive_only: bool = True) -> list[Member]:
        found = [m for m in self.members.values() if m.stats is not None]
        return [m for m in found if not alive_only or m.process.proc.poll() is None]


def _wait(predicate, timeout: float, what: str, swarm: Swarm, interval: float = 0.5):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        for m in swarm.trainers(alive_only=False):
            code = m.process.proc.poll()
            if code is not None and m.name not in swarm.notes.get("killed", ()):
                raise RuntimeError(f"{m.name} exited with {code}:\n{m.process.stderr()[-3000:]}")
        time.sleep(interval)
    tails = {m.name: m.records()[-1:] for m in swarm.trainers(alive_only=False)}
    raise TimeoutError(f"{what}: not within {timeout:.0f} s; last stats {tails}")


def _epoch(member: Member) -> int:
    records = member.records()
    return records[-1]["epoch"] if records else -1


def _training_together(swarm: Swarm, min_epoch: int, peers: int, since: dict[str, int] | None = None):
    """True once every live trainer is at one model version >= min_epoch and has logged an all-reduce with
    `peers` peers (since the log offsets `since`)."""
    trainers = swarm.trainers()
    epochs = {_epoch(m) for m in trainers}
    if len(epochs) != 1 or min(epochs) < min_epoch:
        return False
    text = f"Averaged gradients with {peers} peers"
    return all(text in m.log_since((since or {}).get(m.name, 0)) for m in trainers)


@pytest.fixture(scope="module")
def swarm(module_launcher):
    launch, log_dir = module_launcher.start, module_launcher.log_dir
    members: dict[str, Member] = {}
    for name, half in (("boot", "A"), ("host-a", "A"), ("trainer-a1", "A"), ("trainer-a2", "A"), ("host-b", "B"), ("trainer-b1", "B")):
        private = free_port()
        members[name] = Member(name, half, GatedLink(private).start(), private)
    try:
        boot = members["boot"]
        boot.process = launch("boot", ["--identity", str(log_dir / "boot.key"), *boot.flags], module="dragon_swarm.bootstrap")
        initial = boot.process.initial_peers()
        common = ["-c", str(TEST_CONFIG), "--initial-peers", *initial]
        for name in ("host-a", "host-b"):
            m = members[name]
            m.state_dir = log_dir / name
            m.process = launch(name, [*common, *m.flags, "--no-train", "--experts", "all", "--state-dir", str(m.state_dir)])
        for name in ("trainer-a1", "trainer-a2", "trainer-b1"):
            m = members[name]
            m.state_dir, m.stats = log_dir / name, log_dir / f"{name}.jsonl"
            m.process = launch(name, [*common, *m.flags, "--no-host", "--state-dir", str(m.state_dir), "--stats-file", str(m.stats)])
        s = Swarm(log_dir, members)
        for name in ("host-a", "host-b"):
            members[name].process.wait_for_log("Serving 8 expert(s)", timeout=240)
        started = time.monotonic()
        _wait(lambda: _training_together(s, 2, peers=3), 300, "the three trainers training together", s)
        s.notes["warm-up s"] = round(time.monotonic() - started, 1)
        yield s
        path = log_dir / "measured.yaml"
        path.write_text(yaml.safe_dump(s.notes, sort_keys=False))
        print(f"\nnetwork faults, measured ({path}):\n{path.read_text()}")
    finally:
        for m in members.values():
            m.link.stop()


# --- a link cut between the halves, then healed ---


@dataclass
class CutAndHeal:
    at_cut: dict[str, int]  # epoch per trainer
    at_heal: dict[str, int]
    cut_time: float
    heal_time: float
    during_cut: dict[str, list[dict]]  # stats records per trainer
    settled_time: float  # cut_time + the averaging timeout: rounds that straddled the cut are over
    cut_logs: dict[str, str]  # log text per trainer from settled_time to the heal
    whole_cut_logs: dict[str, str]  # from the cut to the heal
    heal_logs: dict[str, str]  # from the heal on
    refused: int
    agreed_after_s: float
    agreed_epoch: int


@pytest.fixture(scope="module")
def cut_and_heal(swarm: Swarm) -> CutAndHeal:
    trainers = swarm.trainers()
    assert len(trainers) == 3
    _wait(lambda: _training_together(swarm, 2, peers=3), 300, "the three trainers training together before the cut", swarm)
    halves = {half: {m.private_port for m in swarm.members.values() if m.half == half} for half in "AB"}
    at_cut = {m.name: _epoch(m) for m in trainers}
    cut_from = {m.name: m.log_size() for m in trainers}
    for m in swarm.members.values():
        m.link.only_from(halves[m.half])
    cut_time = time.time()
    time.sleep(AVERAGING_TIMEOUT)  # rounds that began before the cut are over (averaged or failed) by now
    settled = {m.name: m.log_size() for m in trainers}
    settled_time = time.time()
    time.sleep(max(0.0, cut_time + CUT_S - time.time()))
    cut_logs = {m.name: m.log_since(settled[m.name]) for m in trainers}
    whole_cut_logs = {m.name: m.log_since(cut_from[m.name]) for m in trainers}
    at_heal = {m.name: _epoch(m) for m in trainers}
    healed_from = {m.name: m.log_size() for m in trainers}
    for m in swarm.members.values():
        m.link.open()
    heal_time = time.time()
    refused = sum(m.link.refused for m in swarm.members.values())
    swarm.notes["cut s"] = round(heal_time - cut_time, 1)
    swarm.notes["micro-batches while cut"] = {
        m.name: sum(cut_time <= r["time"] <= heal_time for r in m.records()) for m in trainers
    }  # fmt: skip
    swarm.notes["epochs at cut"] = at_cut
    swarm.notes["epochs at heal"] = at_heal

    # healed: every trainer in one model version again, and all three in one all-reduce again
    target = max(at_heal.values())
    _wait(lambda: _training_together(swarm, target, peers=3, since=healed_from), 240, "the halves training together again", swarm)
    agreed_after = time.time() - heal_time
    agreed_epoch = _epoch(trainers[0])
    swarm.notes["heal -> versions agree s"] = round(agreed_after, 1)
    # a few more micro-batches on the agreed versions, for the loss to show where training goes after the heal
    _wait(
        lambda: all(sum(r["epoch"] >= agreed_epoch for r in m.records()) >= 4 for m in trainers),
        240, "four micro-batches each after the heal", swarm,
    )  # fmt: skip
    swarm.notes["heal -> 4 micro-batches each s"] = round(time.time() - heal_time, 1)
    during = {m.name: [r for r in m.records() if cut_time <= r["time"] <= heal_time] for m in trainers}
    heal_logs = {m.name: m.log_since(healed_from[m.name]) for m in trainers}
    # not asserted, reported: the returning trainer keeps lagging one model version (each step it downloads the state,
    # and the two others step once more meanwhile), and the state averager's robust reducer may ban it for that
    swarm.notes["state downloads after the heal"] = {name: text.count("Peer is out of sync") for name, text in heal_logs.items()}
    bans = [f"{m.name}: {line}" for m in trainers for line in m.process.stderr().splitlines() if "reputation: banned" in line]
    swarm.notes["bans of honest trainers"] = bans
    return CutAndHeal(
        at_cut, at_heal, cut_time, heal_time, during, settled_time, cut_logs, whole_cut_logs, heal_logs, refused, agreed_after,
        agreed_epoch,
    )  # fmt: skip


def test_both_halves_train_while_cut_and_agree_again_after_the_heal(swarm: Swarm, cut_and_heal: CutAndHeal):
    c = cut_and_heal
    assert c.refused > 0, "the gates refused no connection: the halves were never cut apart"
    # the cut was real: no all-reduce joined the halves once the rounds in flight at the cut were over
    for name, text in c.cut_logs.items():
        assert "Averaged gradients with 3 peers" not in text, (name, text[-2000:])

    # both halves kept training: micro-batches all along the cut and new model versions on both sides. A round that
    # straddled the cut may take up to the averaging timeout to fail; after that half A trains at its own pace, two
    # trainers averaging round after round. Half B's lone trainer crawls: its progress tracker still counts half A's
    # trainers (hivemind keeps progress records 60 s), so each of its steps looks for an all-reduce group until the
    # averaging timeout fails it, then steps alone.
    for name in ("trainer-a1", "trainer-a2"):
        assert c.cut_logs[name].count("Averaged gradients with 2 peers") >= 2, c.cut_logs[name][-3000:]
        settled = [r for r in c.during_cut[name] if r["time"] >= c.settled_time]
        assert len(settled) >= 6, f"{name}: {len(settled)} micro-batches in the last {c.heal_time - c.settled_time:.0f} s of cut"
        assert c.at_heal[name] >= c.at_cut[name] + 3, f"{name}: too few model versions while cut: {c.at_cut} -> {c.at_heal}"
    for name, records in c.during_cut.items():  # trainer-b1 included: it waits, but never longer than a round's timeout
        assert records, f"{name} trained nothing in {CUT_S:.0f} s of cut"
        times = [c.cut_time, *(r["time"] for r in records), c.heal_time]
        longest = max(b - a for a, b in zip(times, times[1:]))
        assert longest < AVERAGING_TIMEOUT + SLACK_S, f"{name} stalled for {longest:.0f} s while cut"

    # after the heal: one model version again, the lagging half by a state download, within a bounded time
    assert c.agreed_after_s < 180, c.agreed_after_s
    # (one version behind is a trainer caught mid-step when the epochs were read, not a lagging half)
    lagging = [name for name, epoch in c.at_heal.items() if epoch < max(c.at_heal.values()) - 1]
    assert lagging, c.at_heal  # the lone trainer of half B stepped far less than half A while cut
    for name in lagging:
        assert "Peer is out of sync" in c.heal_logs[name], f"{name} was behind at the heal but downloaded no state"
    assert c.agreed_epoch >= max(c.at_heal.values())

    # loss finite everywhere, and lower after the heal than before the cut
    for m in swarm.trainers():
        records = m.records()
        assert all(math.isfinite(r["loss"]) for r in records), m.name
        before = [r["loss"] for r in records if r["time"] < c.cut_time][-4:]
        after = [r["loss"] for r in records if r["time"] > c.heal_time and r["epoch"] >= c.agreed_epoch][:4]
        assert len(before) == 4 and len(after) == 4, (m.name, before, after)
        assert sum(after) / 4 < sum(before) / 4 - 0.3, f"{m.name}: loss before the cut {before}, after the heal {after}"


# --- a trainer SIGKILLed as its all-reduce begins ---


def _kill_at_log_line(member: Member, text: str, timeout: float, only_if: Callable[[str], bool] | None = None) -> tuple[float, str]:
    """SIGKILL `member` (its whole process group) the moment its log gets a new line containing `text` (and for which
    `only_if(line)` holds, if given): polls the log's new bytes every 20 ms. Returns the kill time and the line."""
    deadline = time.monotonic() + timeout
    with open(member.process.stderr_path, "rb") as log:
        log.seek(0, os.SEEK_END)
        pending = b""
        while time.monotonic() < deadline:
            pending += log.read()
            lines = pending.split(b"\n")
            pending = lines.pop()
            for line in lines:
                if text.encode() in line and (only_if is None or only_if(line.decode(errors="replace"))):
                    killed_at = time.time()
                    member.process.kill_hard()
                    return killed_at, line.decode(errors="replace")
            if member.process.proc.poll() is not None:
                raise RuntimeError(f"{member.name} exited with {member.process.proc.returncode} before logging {text!r}")
            time.sleep(0.02)
    raise TimeoutError(f"{member.name} did not log {text!r} in {timeout} s")


@dataclass
class KilledMidRound:
    step: int  # the victim's optimizer step that was beginning (its epoch before the step)
    kill_time: float
    epochs_at_kill: dict[str, int]  # survivors' model versions, read right before the kill
    recovered_after_s: dict[str, float]  # per survivor: kill -> its first record one model version on
    round_outcome: dict[str, str]  # per survivor: the first averaging outcome it logged after the kill
    logs_after: dict[str, str]
    records_after: dict[str, list[dict]]


@pytest.fixture(scope="module")
def killed_mid_round(swarm: Swarm) -> KilledMidRound:
    victim = swarm.members["trainer-a2"]
    survivors = [m for m in swarm.trainers() if m is not victim]
    partner = swarm.members["trainer-a1"]
    since = {m.name: m.log_size() for m in swarm.trainers()}

    def ready() -> bool:  # the victim and its partner in step; all three trainers in an all-reduce again
        in_round = all("Averaged gradients with 3 peers" in m.log_since(since[m.name]) for m in swarm.trainers())
        return in_round and _epoch(victim) == _epoch(partner)

    _wait(ready, 240, "three trainers in one all-reduce", swarm)
    # The hook: a trainer logs "Beginning optimizer step #N" when the swarm has gathered its target batch and the
    # all-reduce of the group it matched with (pre-scheduled 1.5 s earlier) starts; the others start it too.
    swarm.notes.setdefault("killed", []).append(victim.name)
    offsets = {m.name: m.log_size() for m in survivors}
    def step_of(line: str) -> int:
        return int(line.rsplit("#", 1)[1].split()[0])

    # the kill must hit a round: only a step trainer-a1 is at too (one CI run caught it a version behind: it was not in
    # that round; trainer-b1 has lagged a version or more since the heal and joins the same all-reduces one late);
    # the survivors' versions are read right before the kill (read after it, a CI run found the partner already one
    # version on: the round can end for the others within the kill's few milliseconds)
    at_hook: dict[str, int] = {}

    def partner_in_step(line: str) -> bool:
        at_hook.update({m.name: _epoch(m) for m in survivors})
        return at_hook[partner.name] == step_of(line)

    kill_time, line = _kill_at_log_line(victim, "Beginning optimizer step #", timeout=180, only_if=partner_in_step)
    step = step_of(line)
    epochs_at_kill = dict(at_hook)
    recovered: dict[str, float] = {}

    def past_the_step() -> bool:
        for m in survivors:
            if m.name not in recovered:
                later = [r for r in m.records() if r["time"] > kill_time and r["epoch"] > epochs_at_kill[m.name]]
                if later:
                    recovered[m.name] = later[0]["time"] - kill_time
        return len(recovered) == len(survivors)

    _wait(past_the_step, AVERAGING_TIMEOUT + 4 * SLACK_S, "survivors one model version on", swarm, interval=0.2)
    swarm.notes["epochs at the kill (victim's step, survivors)"] = [step, epochs_at_kill]
    swarm.notes["kill -> survivors one model version on s"] = {name: round(s, 1) for name, s in recovered.items()}
    # and they keep stepping, together
    _wait(lambda: min(_epoch(m) for m in survivors) >= step + 3, 240, "survivors three steps past the kill", swarm)
    swarm.notes["kill -> survivors 3 steps on s"] = round(time.time() - kill_time, 1)
    # and average with each other again: trainer-b1 may be a version behind at the kill and catch up by a state
    # download rather than an all-reduce, which can take a few more rounds on two busy cores
    together = lambda: all("Averaged gradients with 2 peers" in m.log_since(offsets[m.name]) for m in survivors)  # noqa: E731
    try:
        _wait(together, 180, "survivors in one all-reduce", swarm)
        swarm.notes["kill -> survivors averaged together s"] = round(time.time() - kill_time, 1)
    except TimeoutError:
        swarm.notes["kill -> survivors averaged together s"] = None  # the test says so, with the logs
    outcomes = ("Averaged gradients with", "Averaging gradients failed", "Skipped averaging", "Skipping pre-scheduled")
    logs_after = {m.name: m.log_since(offsets[m.name]) for m in survivors}
    round_outcome = {}
    for name, text in logs_after.items():
        found = [line for line in text.splitlines() if any(o in line for o in outcomes)]
        round_outcome[name] = found[0].split(": ", 1)[-1] if found else "none"
    swarm.notes["survivors' round at the kill"] = round_outcome
    records_after = {m.name: [r for r in m.records() if r["time"] > kill_time] for m in survivors}
    return KilledMidRound(step, kill_time, epochs_at_kill, recovered, round_outcome, logs_after, records_after)


def test_trainer_killed_mid_allreduce_does_not_stall_the_others(swarm: Swarm, killed_mid_round: KilledMidRound):
    k = killed_mid_round
    assert swarm.members["trainer-a2"].process.proc.returncode == -9
    for name, seconds in k.recovered_after_s.items():
        assert seconds <= AVERAGING_TIMEOUT + SLACK_S, f"{name} waited {seconds:.0f} s past the averaging timeout"
    for name, records in k.records_after.items():
        assert all(math.isfinite(r["loss"]) for r in records), name
        assert records[-1]["epoch"] >= k.step + 3
        assert "non-finite" not in k.logs_after[name]
        # after the round with the dead peer the two survivors average with each other
        assert "Averaged gradients with 2 peers" in k.logs_after[name], f"{name} after the kill:\n" + k.logs_after[name][-3000:]


# --- the state dir stops taking writes ---


class UnwritableDir:
    """Make `state_dir` refuse new files for this user, root included, and undo it. Not root: chmod a-w on every
    directory of it. Root (chmod does not stop root): the immutable attribute (chattr +i) on every directory, which
    stops root too; where the file system has no such attribute, the state dir is moved aside and a plain file put
    in its place (every write into it then fails with ENOTDIR); `checkpoint_dir` says where the old files are."""

    def __init__(self, state_dir: Path):
        self.state_dir = state_dir
        self.checkpoint_dir = state_dir
        self.dirs = [state_dir, *sorted(p for p in state_dir.rglob("*") if p.is_dir())]
        self.method = "none"

    def apply(self) -> None:
        """Raises if this user can still create a file in the state dir afterwards."""
        if os.geteuid() != 0:
            self.method = "chmod a-w"
            for d in self.dirs:
                d.chmod(0o555)
        elif shutil.which("chattr") and subprocess.run(["chattr", "+i", *map(str, self.dirs)], capture_output=True).returncode == 0:
            self.method = "chattr +i"
        else:
            subprocess.run(["chattr", "-i", *map(str, self.dirs)], capture_output=True)  # where it half worked
            self.method = "a file in place of the state dir"
            self.checkpoint_dir = self.state_dir.with_name(self.state_dir.name + ".moved")
            self.state_dir.rename(self.checkpoint_dir)
            self.state_dir.write_text("not a directory")
        with pytest.raises(OSError):  # the fault is real for this user
            (self.state_dir / "probe").write_text("x")

    def undo(self) -> None:
        if self.method == "chmod a-w":
            for d in self.dirs:
                d.chmod(0o755)
        elif self.method == "chattr +i":
            subprocess.run(["chattr", "-i", *map(str, self.dirs)], capture_output=True)
        elif self.method.startswith("a file"):
            self.state_dir.unlink()
            self.checkpoint_dir.rename(self.state_dir)
            self.checkpoint_dir = self.state_dir
        self.method = "none"


@dataclass
class DiskFault:
    method: str
    state_dir: Path  # where the peer writes (the checkpoint may have been moved aside, see UnwritableDir)
    checkpoint: Path
    digest_at_fault: str
    digest_after: str
    micro_batches_at_fault: int
    due: int  # past a save point after the fault
    records_after: list[dict]
    log_after: str
    exit_code: int | None


def _tracebacks(log: str) -> list[str]:
    """The traceback blocks in a peer's log: from 'Traceback' to the next timestamped log line."""
    blocks, current = [], None
    for line in log.splitlines():
        if line.startswith("Traceback (most recent call last)"):
            current = [line]
            blocks.append(current)
        elif current is not None and len(line) > 9 and line[2] == ":" and line[5] == ":" and line[8] == " ":
            current = None
        elif current is not None:
            current.append(line)
    return ["\n".join(block) for block in blocks]


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def disk_fault(swarm: Swarm) -> DiskFault:
    m = swarm.members["trainer-a1"]
    checkpoint = m.state_dir / CHECKPOINT_NAME
    _wait(lambda: checkpoint.exists() and len(m.records()) >= 2, 240, "a first trainer checkpoint", swarm)
    fault = UnwritableDir(m.state_dir)
    offset = m.log_size()
    try:
        fault.apply()
        checkpoint = fault.checkpoint_dir / CHECKPOINT_NAME
        digest = _sha256(checkpoint)  # after the fault: a save in flight may have landed just before it
        at_fault = m.records()[-1]["micro_batches"]
        swarm.notes["state-dir fault"] = fault.method
        # the trainer saves every 10 micro-batches: train through a save point, then stop it (it saves again on leaving)
        due = (at_fault // 10 + 1) * 10 + 2
        wait_for_stats(m.stats, lambda r: r[-1]["micro_batches"] >= due, 240, [m.process])
        code = m.process.stop(timeout=90)
        log_after = m.log_since(offset)
        records_after = [r for r in m.records() if r["micro_batches"] > at_fault]
        digest_after = _sha256(checkpoint)
        return DiskFault(fault.method, m.state_dir, checkpoint, digest, digest_after, at_fault, due, records_after, log_after, code)
    finally:
        fault.undo()


def test_unwritable_state_dir_keeps_training_and_the_last_good_checkpoint(swarm: Swarm, disk_fault: DiskFault):
    d = disk_fault
    # it trained on through the failed save, until it was asked to stop
    assert d.records_after and d.records_after[-1]["micro_batches"] >= d.due
    assert all(math.isfinite(r["loss"]) for r in d.records_after)
    # each failed save (the periodic one, the one on leaving) is one clear line: what, where, why
    failed = [line for line in d.log_after.splitlines() if "Could not save the trainer checkpoint" in line]
    assert len(failed) >= 2 and all(" ERROR " in line and str(d.state_dir / CHECKPOINT_NAME) in line for line in failed), failed
    assert "Trainer did not shut down cleanly" not in d.log_after
    # the last good checkpoint is untouched and loads with the project's own loader, into the model
    assert d.digest_after == d.digest_at_fault
    config = load_config(str(TEST_CONFIG))
    saved = read_trainer_state(d.checkpoint, config.run_prefix)
    assert saved is not None and 0 < saved.micro_batches <= d.micro_batches_at_fault
    HRMSMoE(config.model, LocalExperts.from_config(config.model)).load_trunk_state_dict(saved.trunk)
    assert all(bool(t.isfinite().all()) for t in saved.trunk.values() if t.is_floating_point())


def test_unwritable_state_dir_costs_no_traceback_and_the_peer_stops_cleanly(disk_fault: DiskFault):
    state_dir = str(disk_fault.state_dir)
    about_the_disk = [block for block in _tracebacks(disk_fault.log_after) if state_dir in block]
    assert not about_the_disk, about_the_disk[:2]
    assert disk_fault.exit_code == 0
