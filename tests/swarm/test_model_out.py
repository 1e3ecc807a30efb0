"""Getting the model out of a real loopback swarm, and back in: export from the live swarm, generate from the file and
from the swarm, then start a new swarm from the file (rollback).

One scenario per module: a bootstrap, a host of every expert and a trainer (with a dashboard, so the test can press
Stop: a paused trainer still answers state downloads, and its experts stop changing, so what the export wrote can be
compared with what the peers hold). Every peer is stopped at teardown, also when a test fails.
"""

from __future__ import annotations

import socket
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from benchmarks.local_peers import PeerProcess, read_stats, wait_for_stats
from dragon_swarm import generate
from dragon_swarm.config import load_config
from dragon_swarm.moe.expert_state import make_template
from dragon_swarm.moe.expert_uids import all_expert_uids, parse_uid
from dragon_swarm.moe.registry import find_replicas
from dragon_swarm.moe.state_service import ExpertStateService
from dragon_swarm.state.checkpoint import load_tensors
from dragon_swarm.swarm.dht_node import start_dht
from dragon_swarm.training.checkpoint import TrainerState, read_trainer_state
from dragon_swarm.training.versions import version_path
from tests.swarm.paths import TEST_CONFIG

pytestmark = pytest.mark.swarm

STEPS = 12
PROMPT = ["--prompt", "ROMEO:", "--max-new-tokens", "12", "--seed", "5", "--top-k", "20"]


@dataclass
class Scenario:
    log_dir: Path
    model_file: Path
    export: PeerProcess
    metadata: dict[str, str]
    file_tensors: dict[str, torch.Tensor]
    trainer_state: TrainerState  # what the paused trainer saved: its current trunk
    trainer_dir: Path
    host_experts: dict[str, dict[str, torch.Tensor]]  # fetched from the host after the export
    live_text: str
    live: PeerProcess
    rollback: PeerProcess
    rollback_stats: Path
    rollback_dir: Path


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _fetch_host_experts(initial_peers: list[str]) -> dict[str, dict[str, torch.Tensor]]:
    """Every expert as the host holds it now, over the expert state service (what a joining replica downloads)."""
    config = load_config(TEST_CONFIG)
    m = config.model
    uids = all_expert_uids(config.expert_prefix, m.num_moe_layers, m.num_experts)
    dht = start_dht(initial_peers=initial_peers, client_mode=True)
    service = ExpertStateService(dht, f"{config.run_prefix}.experts", lambda uid: None)
    service.start()
    try:
        template = make_template(m.d_model, m.expert_hidden, config.training)
        replicas = find_replicas(dht, uids)
        return {uid: service.fetch(replicas[uid][0].record.peer_id, uid, template, 30.0).module for uid in uids}
    finally:
        service.shutdown()
        dht.shutdown()


@pytest.fixture(scope="module")
def scenario(module_launcher) -> Scenario:
    log_dir = module_launcher.log_dir
    initial_peers = module_launcher.bootstrap().initial_peers()

    def peer(name: str, *extra: str) -> PeerProcess:
        args = ["-c", str(TEST_CONFIG), "--initial-peers", *initial_peers, "--state-dir", str(log_dir / name), *extra]
        return module_launcher.start(name, args)

    # started together: a trainer waits for the experts to come online before its first micro-batch
    host = peer("host", "--no-train", "--experts", "all")
    port, stats = _free_port(), log_dir / "trainer.jsonl"
    trainer = peer("trainer", "--no-host", "--stats-file", str(stats), "--dashboard", str(port), "--keep-versions", "50")
    host.wait_for_log("Serving 8 expert(s)", timeout=120)
    wait_for_stats(stats, lambda r: r[-1]["micro_batches"] >= STEPS and r[-1]["epoch"] >= 2, timeout=240, processes=[trainer, host])
    urllib.request.urlopen(urllib.request.Request(f"http://127.0.0.1:{port}/api/stop", data=b"", method="POST"), timeout=10)
    trainer.wait_for_log("Paused at micro-batch", timeout=60)
    time.sleep(2.5)  # longer than experts.update_period: the host applies what the last backward passes sent

    # the export, sampling from the live swarm and the test's own look at the host's experts, all at once: the
    # swarm is paused, so they all see the same model
    model_file = log_dir / "out" / "model.safetensors"
    export = module_launcher.start(
        "export", ["--initial-peers", *initial_peers, "-c", str(TEST_CONFIG), "--out", str(model_file)], module="dragon_swarm.export"
    )
    live = module_launcher.start(
        "generate-live", ["--initial-peers", *initial_peers, "-c", str(TEST_CONFIG), *PROMPT], module="dragon_swarm.generate"
    )
    host_experts = _fetch_host_experts(initial_peers)
    export.wait(timeout=180)
    live.wait(timeout=180)
    trainer_state = read_trainer_state(log_dir / "trainer" / "trainer.safetensors", load_config(TEST_CONFIG).run_prefix)
    assert trainer_state is not None, trainer.stderr()[-2000:]
    assert export.proc.returncode == 0, export.stderr()[-3000:]
    file_tensors, metadata = load_tensors(model_file)
    for process in (trainer, host):
        process.stop(timeout=30)  # the old swarm goes away before the new one starts (2 cores)

    # rollback: a new swarm from the exported file, in a fresh state dir
    rollback_dir, rollback_stats = log_dir / "rollback", log_dir / "rollback.jsonl"
    rollback = module_launcher.start("rollback", [
        "-c", str(TEST_CONFIG), "--new-swarm", "--init-from", str(model_file), "--state-dir", str(rollback_dir),
        "--experts", "all", "--max-steps", "2", "--stats-file", str(rollback_stats),
    ])  # fmt: skip
    rollback.wait(timeout=180)
    return Scenario(
        log_dir, model_file, export, metadata, file_tensors, trainer_state, log_dir / "trainer", host_experts,
        live.stdout(), live, rollback, rollback_stats, rollback_dir,
    )  # fmt: skip


def test_exported_trunk_is_the_trainers(scenario: Scenario):
    version = int(scenario.metadata["model_version"])
    assert version == scenario.trainer_state.local_epoch >= 2, scenario.export.stderr()[-2000:]
    for name, tensor in scenario.trainer_state.trunk.items():
        assert torch.allclose(scenario.file_tensors[name], tensor, atol=1e-6), name
    # the trainer kept this version (--keep-versions), with the same trunk
    kept = read_trainer_state(version_path(scenario.trainer_dir, version), load_config(TEST_CONFIG).run_prefix)
    assert kept is not None and kept.local_epoch == version
    assert all(torch.allclose(kept.trunk[k], v, atol=1e-6) for k, v in scenario.trainer_state.trunk.items())
    assert scenario.metadata["trunk_from"].startswith("trainer ") and scenario.metadata["experts_missing"] == "[]"


def test_exported_experts_are_the_hosts(scenario: Scenario):
    assert len(scenario.host_experts) == 8
    for uid, weights in scenario.host_experts.items():
        _, layer, index = parse_uid(uid)
        for name, tensor in weights.items():
            assert torch.allclose(scenario.file_tensors[f"dispatcher.experts.{layer}.{index}.{name}"], tensor, atol=1e-6), (uid, name)
    # and the host really trained them: not the seeded init any more
    from dragon_swarm.export import fresh_expert_state

    uid = next(iter(scenario.host_experts))
    fresh = fresh_expert_state(uid, load_config(TEST_CONFIG))
    assert not torch.allclose(fresh["w_up.weight"], scenario.host_experts[uid]["w_up.weight"])


def test_generate_is_deterministic_and_live_matches_the_file(scenario: Scenario, capsys):
    texts = []
    for _ in range(2):
        assert generate.main(["--model", str(scenario.model_file), *PROMPT]) == 0
        texts.append(capsys.readouterr().out)
    assert texts[0] == texts[1] and texts[0].startswith("ROMEO:")
    assert scenario.live.proc.returncode == 0, scenario.live.stderr()[-2000:]
    assert scenario.live_text == texts[0]  # the paused swarm's model is the file's: same text under the same seed


def test_rollback_continues_from_the_files_version(scenario: Scenario):
    version = int(scenario.metadata["model_version"])
    assert scenario.rollback.proc.returncode == 0, scenario.rollback.stderr()[-3000:]
    records = read_stats(scenario.rollback_stats)
    assert [r["micro_batches"] for r in records] == [1, 2]
    assert all(r["epoch"] >= version for r in records), records
    log = scenario.rollback.stderr()
    assert f"Resumed trainer at micro-batch 0, epoch {version}" in log
    assert "resumed from this peer's copy" in log  # the host's experts came from the file
    saved = read_trainer_state(scenario.rollback_dir / "trainer.safetensors", load_config(TEST_CONFIG).run_prefix)
    assert saved is not None and saved.local_epoch >= version
    if saved.local_epoch == version:  # no swarm step in 2 micro-batches: the trunk is still exactly the file's
        assert all(torch.equal(scenario.file_tensors[k], v) for k, v in saved.trunk.items())
    assert load_file(str(scenario.model_file))  # the file is untouched and still readable
