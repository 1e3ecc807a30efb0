"""Trainer: runs the trunk on its data shard, routes MoE tokens to remote experts and steps with the swarm.

hivemind.Optimizer accumulates gradients until the swarm reaches `target_batch_size`, all-reduces them with
the other trainers and steps; a trainer whose epoch lags downloads the current state from peers first. Both
its gradient and its state averaging run through our robust reducer (`RobustOptimizer`): the weighted mean
inside hivemind's all-reduce is replaced by the configured aggregator with validation, untrusted weights and bans.
"""

from __future__ import annotations

import gc
import json
import logging
import threading
import time
from functools import partial
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Callable

import hivemind
import torch

from dragon_swarm.averaging.compression import make_compression
from dragon_swarm.averaging.robust_allreduce import RobustAveragingSettings
from dragon_swarm.averaging.robust_optimizer import RobustOptimizer
from dragon_swarm.config import AveragingSection, SwarmConfig
from dragon_swarm.model.dispatch import ExpertDispatcher
from dragon_swarm.model.hrm_smoe import HRMSMoE
from dragon_swarm.monitor.status import PeerState, PeerStatus, TrainingSwitch
from dragon_swarm.state.checkpoint import (
    CheckpointError,
    load_tensors,
    optimizer_state_from_tensors,
    optimizer_state_to_tensors,
    save_tensors_atomic,
)
from dragon_swarm.training.stats import StatsWriter, StepStats

if TYPE_CHECKING:
    from dragon_swarm.swarm.contributions import ContributionCounters

logger = logging.getLogger(__name__)

CHECKPOINT_NAME = "trainer.safetensors"


def warmup_schedule(warmup_steps: int):
    def factor(epoch: int) -> float:
        return min(1.0, (epoch + 1) / max(1, warmup_steps))

    return factor


def robust_settings(averaging: AveragingSection, target_batch_size: int | None = None) -> RobustAveragingSettings:
    # a sender 5x farther from the robust result than the median sender, over a whole round's partition, 3
    # rounds in a row, with one malformed part (NaN/Inf, wrong size) or 2 impossible weight claims, is banned.
    # Judged per round, not per part: in parts holding rare-token embedding rows an honest peer's gradient is large only on its own batch's tokens (16-44x the
    # median per part in the robustness benchmark's clean runs), while over a partition honest peers stay ~1-2x.
    return RobustAveragingSettings(
        aggregator=averaging.aggregator,
        tau=averaging.tau,
        relative_tau=True,
        trim_ratio=averaging.trim_ratio,
        ban_distance_ratio=5.0,
        min_observations=3,
        max_invalid=2,
        # hivemind weighs gradients by the samples a peer accumulated since the last round: an honest peer never
        # holds more than the swarm's target batch plus a few micro-batches of overshoot
        weight_claim_limit=None if target_batch_size is None else 4.0 * target_batch_size,
    )


@dataclass
class VolunteerHooks:
    """What the volunteer-facing side gives the trainer: where to report (status board, contribution counters)
    and the Start/Stop switch. `on_pause`/`on_resume` run when Stop/Start takes effect (the peer uses them to
    take its hosted experts offline and back)."""

    status: PeerStatus
    switch: TrainingSwitch
    counters: ContributionCounters
    on_pause: Callable[[], None] = field(default=lambda: None)
    on_resume: Callable[[], None] = field(default=lambda: None)
    show_contribution: Callable[[], None] = field(default=lambda: None)  # counters -> status board


class Trainer:
    """Construct (restores from the state dir), then `train()` until max_steps or `stop` is set."""

    def __init__(
        self,
        config: SwarmConfig,
        dht: hivemind.DHT,
        dispatcher: ExpertDispatcher,
        train_stream,
        state_dir: Path,
        stats_file: Path | None,
        batch_size: int,
        device: str = "cpu",
        attack: str | None = None,
        hooks: VolunteerHooks | None = None,
    ):
        self.config, self.dht, self.dispatcher = config, dht, dispatcher
        self.train_stream, self.state_dir, self.batch_size, self.device = train_stream, state_dir, batch_size, device
        self.peer_id = dht.peer_id.to_base58()
        self.stats_writer = StatsWriter(stats_file)
        self.hooks = hooks
        self.attacker = ByzantineBehaviour(attack, config.swarm.seed) if attack is not None else None
        torch.manual_seed(config.swarm.seed)  # every fresh trunk starts from the same weights
        self.model = HRMSMoE(config.model, dispatcher).to(device)
        self.step = 0
        self.tokens = 0
        self.skipped_batches = 0
        self._trunk_names = [name for name, _ in self.model.named_trunk_parameters()]
        self.momentum: dict[str, torch.Tensor] = {}  # worker momentum per trunk parameter (training.worker_momentum)
        saved = self._read_checkpoint()
        if saved is not None:
            # weights go in before the optimizer is built: hivemind keeps its own (offloaded) copy of them
            self.model.load_trunk_state_dict(saved[0])
        t = config.training
        self.optimizer = RobustOptimizer(
            robust=robust_settings(config.averaging, config.training.target_batch_size),
            dht=dht,
            run_id=config.run_prefix,
            target_batch_size=t.target_batch_size,
            batch_size_per_step=batch_size,
            optimizer=partial(torch.optim.AdamW, lr=t.lr, betas=t.betas, weight_decay=t.weight_decay),
            params=list(self.model.trunk_parameters()),
            scheduler=partial(torch.optim.lr_scheduler.LambdaLR, lr_lambda=warmup_schedule(t.warmup_steps)),
            matchmaking_time=config.averaging.matchmaking_time,
            averaging_timeout=config.averaging.averaging_timeout,
            load_state_timeout=config.averaging.load_state_timeout,
            grad_compression=make_compression(config.averaging.compression),
            verbose=True,
        )
        self._reported_bans: set[str] = set()
        if saved is not None:
            trunk, optimizer_state, counters, momentum = saved
            self.momentum = {k: v for k, v in momentum.items() if k in self._trunk_names}
            optimizer_state["state"]["local_epoch"] = int(counters["local_epoch"])
            self.optimizer.load_state_dict(optimizer_state)
            self.step, self.tokens = int(counters["step"]), int(counters["tokens"])
            logger.info(f"Resumed trainer at step {self.step}, epoch {self.optimizer.local_epoch}, {self.tokens} tokens")

    # --- state ---

    @property
    def checkpoint_path(self) -> Path:
        return self.state_dir / CHECKPOINT_NAME

    def save(self) -> None:
        trunk = self.model.trunk_state_dict()
        if not all(bool(torch.isfinite(t).all()) for t in trunk.values() if t.is_floating_point()):
            # never overwrite the last good checkpoint with a poisoned model
            logger.error(f"Trunk has non-finite weights at step {self.step}; keeping the previous checkpoint")
            return
        optimizer_state = self.optimizer.state_dict()
        local_epoch = optimizer_state["state"].pop("local_epoch", self.optimizer.local_epoch)
        optim_tensors, optim_rest = optimizer_state_to_tensors(optimizer_state)
        tensors = {f"trunk.{k}": v for k, v in trunk.items()}
        tensors.update(optim_tensors)
        tensors.update({f"momentum.{k}": v for k, v in self.momentum.items()})
        metadata = {
            "optimizer": json.dumps(optim_rest),
            "counters": json.dumps({"step": self.step, "tokens": self.tokens, "local_epoch": int(local_epoch)}),
            "swarm": self.config.run_prefix,
            "peer_id": self.peer_id,
        }
        save_tensors_atomic(self.checkpoint_path, tensors, metadata)

    def _read_checkpoint(self):
        """(trunk, optimizer state, counters, worker momentum) from the state dir; a corrupt or foreign file is reported, not used."""
        if not self.checkpoint_path.exists():
            return None
        try:
            tensors, metadata = load_tensors(self.checkpoint_path)
            if metadata.get("swarm") != self.config.run_prefix:
                logger.error(
                    f"{self.checkpoint_path} belongs to swarm {metadata.get('swarm')}, not {self.config.run_prefix}; starting fresh"
                )
                return None
            counters = json.loads(metadata["counters"])
            trunk = {k[len("trunk.") :]: v for k, v in tensors.items() if k.startswith("trunk.")}
            momentum = {k[len("momentum.") :]: v for k, v in tensors.items() if k.startswith("momentum.")}
            optimizer_state = optimizer_state_from_tensors(tensors, json.loads(metadata["optimizer"]))
            self.model.load_trunk_state_dict(trunk)  # checks names and shapes before the optimizer exists
        except (CheckpointError, KeyError, ValueError, RuntimeError) as e:
            logger.error(f"Trainer checkpoint unusable, starting fresh: {e}")
            return None
        return trunk, optimizer_state, counters, momentum

    # --- training ---

    def sync_with_swarm(self, timeout: float = 15.0) -> None:
        """Download the swarm's current state before contributing, if the swarm is ahead of this peer."""
        tracker = self.optimizer.tracker
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and tracker.global_progress.num_peers == 0:
            time.sleep(0.5)  # progress records of other trainers arrive in the background
        swarm_epoch, local_epoch = tracker.global_progress.epoch, self.optimizer.local_epoch
        if swarm_epoch > local_epoch:
            logger.info(f"Swarm is at epoch {swarm_epoch}, this peer at {local_epoch}: downloading state from peers")
            self._set_state("SYNCING")
            self.optimizer.load_state_from_peers()
            logger.info(f"State downloaded: now at epoch {self.optimizer.local_epoch}")

    def train(self, max_steps: int | None, stop: threading.Event, save_every: int = 10) -> None:
        seq_len = self.config.model.seq_len
        clip = self.config.training.clip_grad_norm
        params = list(self.model.trunk_parameters())
        while not stop.is_set() and (max_steps is None or self.step < max_steps):
            if self.hooks is not None and self.hooks.switch.paused:
                self._pause_until_resumed(stop)
                continue
            self._set_state("TRAINING")
            started = time.perf_counter()
            inputs, targets = self.train_stream.batch(self.config.swarm.seed, self.peer_id, self.step, self.batch_size, seq_len)
            inputs, targets = inputs.to(self.device), targets.to(self.device)
            if self.attacker is not None:
                targets = self.attacker.corrupt_targets(targets)
            loss, ce, aux = self.model.compute_loss(inputs, targets)
            loss.backward()
            claimed_batch = self.batch_size
            if self.attacker is not None:
                self.attacker.corrupt_gradients(params, int(self.optimizer.tracker.global_progress.num_peers))
                claimed_batch = self.attacker.claimed_batch(self.batch_size)
                grad_norm = torch.zeros(())  # attackers neither clip nor filter what they send
            else:
                grad_norm = torch.nn.utils.clip_grad_norm_(params, clip)
                if torch.isfinite(grad_norm):
                    self._apply_worker_momentum(params)
            if self.attacker is None and not (torch.isfinite(loss) and torch.isfinite(grad_norm)):
                # a poisoned micro-batch (bad expert output, overflow) must not reach the swarm's average
                self.skipped_batches += 1
                self.optimizer.zero_grad()
                logger.warning(f"Step {self.step}: non-finite loss or gradient, micro-batch dropped ({self.skipped_batches} so far)")
                self.step += 1
                continue
            if self.optimizer.tracker.ready_to_update_epoch:
                self._set_state("AVERAGING")  # this step() all-reduces with the swarm
            self.optimizer.step(batch_size=claimed_batch)
            self.optimizer.zero_grad()
            self.step += 1
            self.tokens += inputs.numel()
            if self.hooks is not None:
                self.hooks.counters.add_batch(tokens=inputs.numel())
            elapsed = time.perf_counter() - started
            reputation = self.reputation()
            stats = StepStats(
                step=self.step,
                epoch=int(self.optimizer.local_epoch),
                loss=float(ce.item()),
                aux_loss=float(aux.item()),
                tokens=self.tokens,
                samples_per_second=self.batch_size / elapsed,
                tokens_per_second=inputs.numel() / elapsed,
                peers=int(self.optimizer.tracker.global_progress.num_peers),
                experts_online=int(getattr(self.dispatcher, "online_experts", lambda: -1)()),
                expert_failures=int(getattr(self.dispatcher, "failures", 0)),
                banned_peers=sorted(reputation.get("banned", {})),
                rejected_parts=sum(int(p.get("invalid", 0)) for p in reputation.get("peers", {}).values()),
                time=time.time(),
            )
            self.stats_writer.write(stats)
            self._report(stats)
            logger.info(
                f"step {stats.step} epoch {stats.epoch} loss {stats.loss:.3f} "
                f"{stats.tokens_per_second:.0f} tokens/s, {stats.peers} trainer(s), {stats.experts_online} experts online"
            )
            if self.step % save_every == 0:
                self.save()

    def _apply_worker_momentum(self, params: list[torch.nn.Parameter]) -> None:
        """Replace each gradient by this worker's momentum (training.worker_momentum, see config.py)."""
        beta = self.config.training.worker_momentum
        if beta <= 0:
            return
        for name, p in zip(self._trunk_names, params):
            if p.grad is None:
                p.grad = torch.zeros_like(p)
            m = self.momentum.get(name)
            if m is None:
                m = self.momentum[name] = p.grad.detach().clone()  # start from the first gradient, not from zero
            else:
                m.mul_(beta).add_(p.grad, alpha=1 - beta)
            p.grad.copy_(m)

    # --- volunteer-facing reporting ---

    def _set_state(self, state: str) -> None:
        if self.hooks is not None:
            self.hooks.status.set_state(PeerState(state))

    def _report(self, stats: StepStats) -> None:
        if self.hooks is None:
            return
        status, tracker = self.hooks.status, self.optimizer.tracker
        self.hooks.counters.set_loss(stats.loss)
        status.record_step(stats.step, stats.loss, stats.tokens_per_second, when=stats.time)
        status.update_model(
            global_epoch=int(tracker.global_epoch),
            local_epoch=int(self.optimizer.local_epoch),
            samples_accumulated=int(tracker.global_progress.samples_accumulated),
            target_batch_size=int(tracker.target_batch_size),
        )
        self.hooks.show_contribution()

    def _pause_until_resumed(self, stop: threading.Event) -> None:
        """Stop was pressed: the last step is done; save, let the peer take its experts offline, free what can be
        freed, and wait for Start (or for the peer to stop)."""
        self._set_state("IDLE")
        logger.info(f"Paused at step {self.step}: state saved, waiting for Start")
        self.save()
        self.hooks.on_pause()
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        if self.hooks.switch.wait_until_running(stop):
            logger.info(f"Resuming training at step {self.step}")
            self.hooks.on_resume()

    def reputation(self) -> dict:
        """The robust averager's view of other trainers (rejections, distances, bans); logs each new ban once."""
        try:
            snapshot = self.optimizer.grad_averager.get_reputation(timeout=5)
        except Exception as e:  # the averager process may be busy or gone; stats must not stop training
            logger.debug(f"Reputation unavailable: {e}")
            return {}
        for peer, seconds_left in snapshot.get("banned", {}).items():
            if peer not in self._reported_bans:
                record = snapshot.get("peers", {}).get(peer, {})
                logger.warning(
                    f"Banned trainer {peer} for {seconds_left:.0f} s: {record.get('ban_reason') or 'no reason kept'} "
                    f"({record.get('invalid', 0)} invalid part(s), distance {record.get('distance_ema') or 0:.1f}x)"
                )
        self._reported_bans = set(snapshot.get("banned", {}))
        # a banned trainer's rounds fail, so it steps alone and runs ahead: its progress must not move our epoch
        self.optimizer.tracker.ignore_peers(self._reported_bans)
        return snapshot

    def shutdown(self) -> None:
        try:
            self.save()
        finally:
            self.optimizer.shutdown()


class ByzantineBehaviour:
    """TEST/BENCHMARK ONLY (`--attack NAME`): turns this trainer into an attacker of the swarm's averaging.

    The attacker does not see honest peers' gradients, so attacks that need their statistics (ALIE, IPM)
    estimate them from this peer's own recent honest gradients.
    """

    HISTORY = 8

    def __init__(self, attack_name: str, seed: int):
        from dragon_swarm import attacks

        self._attacks = attacks
        self.attack = attacks.parse_attack(attack_name)
        self.rng = torch.Generator().manual_seed(seed)  # colluding attackers share the swarm seed
        self.history: list[torch.Tensor] = []
        logger.warning(f"BYZANTINE TEST MODE: this trainer runs the '{self.attack.value}' attack")

    def corrupt_targets(self, targets: torch.Tensor) -> torch.Tensor:
        if self.attack is self._attacks.Attack.LABEL_SHUFFLE:
            return self._attacks.corrupt_targets(targets, self.rng)
        return targets

    def corrupt_gradients(self, params: list[torch.nn.Parameter], num_peers: int) -> None:
        if self.attack is self._attacks.Attack.LABEL_SHUFFLE:
            return
        for p in params:  # a parameter without a gradient this step still gets one sent (zeros), as hivemind does
            if p.grad is None:
                p.grad = torch.zeros_like(p)
        with_grad = list(params)
        flat = torch.cat([p.grad.reshape(-1) for p in with_grad])
        self.history = (self.history + [flat.clone()])[-self.HISTORY :]
        num_peers = max(num_peers, 2)
        bad = self._attacks.byzantine_gradient(
            self.attack, flat, torch.stack(self.history), self.rng, num_peers, max(1, (num_peers - 1) // 2)
        )
        offset = 0
        for p in with_grad:
            p.grad.copy_(bad[offset : offset + p.numel()].view_as(p.grad))
            offset += p.numel()

    def claimed_batch(self, honest_batch: int) -> int:
        return int(self._attacks.claimed_weight(self.attack, honest_batch))
