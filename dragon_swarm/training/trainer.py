"""Trainer: runs the trunk on its data shard, routes MoE tokens to remote experts and steps with the swarm.

hivemind.Optimizer accumulates gradients until the swarm reaches `target_batch_size`, all-reduces them with
the other trainers and steps; a trainer whose epoch lags downloads the current state from peers first. Both
its gradient and its state averaging run through our robust reducer (`RobustOptimizer`): the weighted mean
inside hivemind's all-reduce is replaced by the configured aggregator with validation, untrusted weights and bans.

The trainer knows nothing of views: it publishes events (`dragon_swarm.events`) on the bus it is given and
follows the pause gate. What it sends after each micro-batch is decided by its `GradientContribution`
(`HonestContribution` unless a test or benchmark injects another).
"""

from __future__ import annotations

import dataclasses
import gc
import logging
import threading
import time
import warnings
from functools import partial
from pathlib import Path

import hivemind
import torch
from hivemind.utils import get_dht_time

from dragon_swarm.averaging.accusations import AccusationBoard
from dragon_swarm.averaging.ban_store import BANS_FILE, bans_from_snapshot, load_bans, save_bans, seed_book
from dragon_swarm.averaging.compression import make_compression
from dragon_swarm.averaging.part_signatures import PartSigner
from dragon_swarm.averaging.robust_optimizer import RobustOptimizer
from dragon_swarm.averaging.settings import RobustAveragingSettings
from dragon_swarm.config import SwarmConfig
from dragon_swarm.events import BanReport, EventBus, Paused, PauseGate, PeerState, Resumed, StateChanged, StepReport
from dragon_swarm.model.dispatch import ExpertDispatcher
from dragon_swarm.model.hrm_smoe import HRMSMoE
from dragon_swarm.training.checkpoint import CHECKPOINT_NAME, TrainerState, read_trainer_state, save_trainer_state_or_log
from dragon_swarm.training.contribution import GradientContribution, HonestContribution
from dragon_swarm.training.evaluation import EVAL_FORWARD_SEQUENCES, eval_batches, evaluate_loss
from dragon_swarm.training.optim import decay_param_groups
from dragon_swarm.training.pipeline import MicroBatchPipeline, weights_version, worth_starting_ahead
from dragon_swarm.training.versions import VersionKeeper
from dragon_swarm.verification.ledger import RoundLedger
from dragon_swarm.verification.service import VerificationService
from dragon_swarm.verification.transcript import ExpertTranscript, RecordingDispatcher

logger = logging.getLogger(__name__)

# hivemind sets the scheduler from the epoch (also right after a state download, before any optimizer step), so
# torch's "scheduler stepped before the optimizer" advice does not apply and only alarms volunteers
warnings.filterwarnings("ignore", message=r"Detected call of `lr_scheduler\.step\(\)` before `optimizer\.step\(\)`")


def warmup_schedule(warmup_steps: int):
    def factor(epoch: int) -> float:
        return min(1.0, (epoch + 1) / max(1, warmup_steps))

    return factor


@dataclasses.dataclass
class _ComputedMicroBatch:
    index: int
    tokens: int
    loss: torch.Tensor
    ce: torch.Tensor
    aux: torch.Tensor
    grads: tuple[torch.Tensor | None, ...]  # one per trunk parameter, in `trunk_params` order
    transcript: ExpertTranscript | None  # what the experts answered (verification), else None


class Trainer:
    """Construct (restores from the state dir), then `train()` until max_micro_batches or `stop` is set."""

    def __init__(
        self,
        config: SwarmConfig,
        dht: hivemind.DHT,
        dispatcher: ExpertDispatcher,
        train_stream,
        state_dir: Path,
        batch_size: int,
        device: str = "cpu",
        bus: EventBus | None = None,
        gate: PauseGate | None = None,
        contribution: GradientContribution | None = None,
        val_stream=None,
        keep_versions: int = 0,
        client_mode: bool = False,
        identity: Path | None = None,
    ):
        self.config, self.dht, self.dispatcher = config, dht, dispatcher
        # the held-out stream (`training.evaluation`); None: no held-out loss
        self.val_stream = val_stream
        self._eval_set: list[tuple[torch.Tensor, torch.Tensor]] | None = None  # built at the first evaluation
        self._next_eval_epoch = 0
        self.last_val_loss: float | None = None
        self.last_val_epoch: int | None = None
        self.train_seconds = self.eval_seconds = 0.0  # this session: what evaluation costs next to training
        self.train_stream, self.state_dir, self.batch_size, self.device = train_stream, state_dir, batch_size, device
        self.bus = bus if bus is not None else EventBus()
        self.gate = gate if gate is not None else PauseGate()
        t = config.training
        self.contribution = contribution or HonestContribution(t.clip_grad_norm, t.worker_momentum)
        self.peer_id = dht.peer_id.to_base58()
        self.versions = VersionKeeper(state_dir, keep_versions, config.run_prefix, self.peer_id)  # `--keep-versions`
        # verification by recomputation: record what the experts answered, so other trainers can replay our rounds
        # (a client-mode trainer serves its record over the connections its all-reduce opened)
        self.verifying = config.verification.enabled
        self.recorder = RecordingDispatcher(dispatcher) if self.verifying else None
        self.ledger = RoundLedger()
        self._ledger_epoch: int | None = None
        self.verification: VerificationService | None = None
        torch.manual_seed(config.swarm.seed)  # every fresh trunk starts from the same weights
        self.model = HRMSMoE(config.model, self.recorder or dispatcher).to(device)
        self.micro_batches = self.tokens = self.skipped_batches = 0
        self.trunk_params = list(self.model.named_trunk_parameters())
        saved = read_trainer_state(self.checkpoint_path, config.run_prefix)
        if saved is not None:
            try:  # weights go in before the optimizer is built: hivemind keeps its own (offloaded) copy of them
                self.model.load_trunk_state_dict(saved.trunk)
            except (RuntimeError, KeyError, ValueError) as e:
                logger.error(f"Trainer checkpoint does not fit this model, starting fresh: {e}")
                saved = None
        # gradient parts are sealed with the identity key, so a NaN part can be proven to every trainer
        signer = PartSigner.from_identity_file(identity) if config.averaging.signed_parts and identity is not None else None
        robust = RobustAveragingSettings.from_config(config.averaging, t.target_batch_size, signing=signer is not None)
        self.optimizer = RobustOptimizer(
            robust=robust,
            reputation=seed_book(robust.make_reputation_book(), load_bans(state_dir / BANS_FILE)),
            signer=signer,
            dht=dht,
            run_id=config.run_prefix,
            target_batch_size=t.target_batch_size,
            batch_size_per_step=batch_size,
            optimizer=partial(torch.optim.AdamW, lr=t.lr, betas=tuple(t.betas)),
            params=decay_param_groups(self.trunk_params, t.weight_decay),
            scheduler=partial(torch.optim.lr_scheduler.LambdaLR, lr_lambda=warmup_schedule(t.warmup_steps)),
            matchmaking_time=config.averaging.matchmaking_time,
            averaging_timeout=config.averaging.averaging_timeout,
            load_state_timeout=config.averaging.load_state_timeout,
            grad_compression=make_compression(config.averaging.compression),
            client_mode=client_mode,  # behind NAT: sends its parts, reduces none (nobody can dial it)
            # hivemind's advice (and its start-up warning): a leader's answer must be awaited for less than the
            # matchmaking time, or two peers asking each other at once can deadlock a round
            averager_opts={"request_timeout": min(3.0, 0.9 * config.averaging.matchmaking_time)},
            # verification replays a round from the weights it started with: hivemind's default applies a background
            # state average in the middle of the next round, which no record could replay
            delay_state_averaging=not self.verifying,
            verbose=True,
        )
        self._reported_bans: set[str] = set()
        self._pipeline: MicroBatchPipeline[_ComputedMicroBatch] | None = None  # `training.micro_batches_in_flight` > 1
        self._last_done: float | None = None  # when the last micro-batch was applied
        self._micro_batch_seconds: float | None = None  # moving average, for `worth_starting_ahead`
        if t.micro_batches_in_flight > 1:
            logger.info(
                f"{t.micro_batches_in_flight} micro-batches in flight: while one waits for its experts, the next computes"
            )
        if saved is not None:
            self._restore(saved)
        self.accusations: AccusationBoard | None = None
        if robust.signed_parts:
            grad_averager = self.optimizer.grad_averager
            self.accusations = AccusationBoard(
                dht, config.run_prefix, take_new=lambda: grad_averager.take_accusations(timeout=5),
                ban=lambda peer, reason: grad_averager.ban_peer(peer, reason, timeout=10),
            )  # fmt: skip
            self.accusations.start()
        if self.verifying:
            seed, seq_len = config.swarm.seed, config.model.seq_len
            self.verification = VerificationService(
                config, dht,
                batch_of_peer=lambda peer: lambda step, size: self.train_stream.batch(seed, peer, step, size, seq_len),
                ban=lambda peer, reason: self.optimizer.grad_averager.ban_peer(peer, reason, timeout=10),
                report_check=self.contribution.report_check,
                reported_epoch=lambda peer: self.optimizer.tracker.reported_epochs.get(peer),
            )  # fmt: skip

    # --- state ---

    @property
    def checkpoint_path(self) -> Path:
        return self.state_dir / CHECKPOINT_NAME

    def _restore(self, saved: TrainerState) -> None:
        names = {name for name, _ in self.trunk_params}
        self.contribution.load_state_tensors({k: v for k, v in saved.momentum.items() if k in names})
        if not saved.optimizer["param_groups"]:  # a trunk without optimizer state (`--init-from`): fresh moments
            saved.optimizer = self.optimizer.state_dict()
        saved.optimizer["state"]["local_epoch"] = saved.local_epoch
        try:
            self.optimizer.load_state_dict(saved.optimizer)
        except (ValueError, KeyError, RuntimeError) as e:  # e.g. saved before parameters were split into groups
            logger.warning(f"Saved optimizer state does not fit ({e}); keeping the weights, starting the optimizer fresh")
        self.micro_batches, self.tokens = saved.micro_batches, saved.tokens
        self.last_val_loss, self.last_val_epoch = saved.val_loss, saved.val_epoch
        every = self.config.training.eval_every
        if saved.val_epoch is not None and every > 0:
            self._next_eval_epoch = (saved.val_epoch // every + 1) * every
        logger.info(f"Resumed trainer at micro-batch {self.micro_batches}, epoch {self.optimizer.local_epoch}, {self.tokens:,} tokens")

    def save(self) -> bool:
        """True when the checkpoint was written. A disk that refuses (full, read-only, gone) costs one error line and
        training goes on: the write is atomic, so the last good checkpoint stays as it was."""
        self._save_bans()
        return save_trainer_state_or_log(self.checkpoint_path, self._state(), self.config.run_prefix, self.peer_id)

    def _state(self) -> TrainerState:
        optimizer_state = self.optimizer.state_dict()
        local_epoch = int(optimizer_state["state"].pop("local_epoch", self.optimizer.local_epoch))
        return TrainerState(
            self.model.trunk_state_dict(), optimizer_state, self.contribution.state_tensors(), self.micro_batches, self.tokens, local_epoch,
            val_loss=self.last_val_loss, val_epoch=self.last_val_epoch,
        )

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
            self.bus.publish(StateChanged(PeerState.SYNCING))
            self.optimizer.load_state_from_peers()
            logger.info(f"State downloaded: now at epoch {self.optimizer.local_epoch}")

    def train(self, max_micro_batches: int | None, stop: threading.Event, save_every: int = 10) -> None:
        """Train until this peer has trained `max_micro_batches` in total (None: no limit) or `stop` is set."""
        try:
            while not stop.is_set() and (max_micro_batches is None or self.micro_batches < max_micro_batches):
                if self.gate.paused:
                    self._close_pipeline()  # nothing computes while paused
                    self._pause_until_resumed(stop)
                    continue
                self.bus.publish(StateChanged(PeerState.TRAINING))
                last = max_micro_batches is not None and self.micro_batches + 1 >= max_micro_batches
                report = self.train_micro_batch(prefetch=not last)
                if report is not None and self.micro_batches % save_every == 0:
                    self.save()
                self.versions.maybe_keep(int(self.optimizer.local_epoch), self._state)
        finally:
            self._close_pipeline()

    def _compute(self, index: int) -> _ComputedMicroBatch:
        """Forward and backward of micro-batch `index` from the current weights; changes no state of the trainer
        (it may run in a pipeline worker thread, see `training.pipeline`)."""
        if self.recorder is not None:
            self.recorder.begin()
        inputs, targets = self.train_stream.batch(
            self.config.swarm.seed, self.peer_id, self.contribution.batch_step(index), self.batch_size,
            self.config.model.seq_len,
        )  # fmt: skip
        inputs, targets = inputs.to(self.device), self.contribution.targets(targets.to(self.device))
        loss, ce, aux = self.model.compute_loss(inputs, targets)
        grads = torch.autograd.grad(loss, [p for _, p in self.trunk_params], allow_unused=True)
        transcript = self.recorder.take() if self.recorder is not None else None
        return _ComputedMicroBatch(index, inputs.numel(), loss.detach(), ce.detach(), aux.detach(), grads, transcript)

    def _next_computed(self, prefetch: bool) -> _ComputedMicroBatch:
        """This micro-batch's forward and backward: here, or from the pipeline when several are in flight."""
        depth = self.config.training.micro_batches_in_flight
        if depth <= 1:
            return self._compute(self.micro_batches)
        if self._pipeline is None:
            params = [p for _, p in self.trunk_params]
            self._pipeline = MicroBatchPipeline(self._compute, depth, lambda: weights_version(params))
        # a micro-batch started before the swarm's next step would be computed again: start ahead only when the step
        # is expected after the ones in flight are applied
        tracker = self.optimizer.tracker
        seconds_to_step = 0.0 if tracker.ready_to_update_epoch else tracker.estimated_next_update_time - get_dht_time()
        prefetch = prefetch and worth_starting_ahead(seconds_to_step, self._micro_batch_seconds, depth - 1)
        return self._pipeline.next(self.micro_batches, prefetch=prefetch)

    def _close_pipeline(self) -> None:
        if self._pipeline is not None:
            if self._pipeline.recomputed:
                logger.info(f"{self._pipeline.recomputed} micro-batch(es) computed again: weights changed while in flight")
            self._pipeline.close()
            self._pipeline = None
            self._last_done = None  # a pause is not a micro-batch's time

    def train_micro_batch(self, prefetch: bool = True) -> StepReport | None:
        """One micro-batch: forward, backward, the contribution, and the swarm optimizer (which all-reduces and
        steps when the swarm has gathered its target batch). None when the micro-batch was dropped. With
        `training.micro_batches_in_flight` > 1 the forward and backward ran in the pipeline (`prefetch`: the next
        ones start meanwhile); everything from the contribution on happens here, in order."""
        started = time.perf_counter()
        computed = self._next_computed(prefetch)
        if self._last_done is not None and self._pipeline is not None:
            started = self._last_done  # in flight, a micro-batch's time is the time since the previous one ended
        epoch_before = int(self.optimizer.local_epoch)
        if self.verification is not None and (self._ledger_epoch != epoch_before or not self.ledger.started_from(self.trunk_params)):
            trunk = self.verification.remember_trunk(epoch_before, self.model.trunk_state_dict())
            self.ledger.begin_round(self.contribution.state_tensors(), trunk)
            self._ledger_epoch = epoch_before
        for (_, param), grad in zip(self.trunk_params, computed.grads):
            if grad is not None:  # as `.backward()`: an unused parameter keeps what zero_grad left
                param.grad = grad
        loss, ce, aux = computed.loss, computed.ce, computed.aux
        tracker = self.optimizer.tracker
        claimed_batch = self.contribution.prepare(self.trunk_params, loss, self.batch_size, int(tracker.global_progress.num_peers))
        if claimed_batch is not None and self.verification is not None:
            self.ledger.add(self.micro_batches, claimed_batch, self.trunk_params, computed.transcript.to_bytes())
        if claimed_batch is None:
            self.skipped_batches += 1
            self.optimizer.zero_grad()
            logger.warning(
                f"Micro-batch {self.micro_batches}: non-finite loss or gradient, dropped ({self.skipped_batches} so far)"
            )
            self.micro_batches += 1
            self._last_done = time.perf_counter()
            return None
        if tracker.ready_to_update_epoch:
            self.bus.publish(StateChanged(PeerState.AVERAGING))  # this step() all-reduces with the swarm
            if self.verification is not None and not self.ledger.empty:  # committed before any part goes out
                self.verification.commit(self.ledger.close(epoch_before))
        step_started = get_dht_time()
        self.optimizer.step(batch_size=claimed_batch)
        self.optimizer.zero_grad()
        if self.verification is not None and int(self.optimizer.local_epoch) > epoch_before:
            self.verification.after_round(epoch_before, self._senders_since(step_started))
        self.micro_batches += 1
        self.tokens += computed.tokens
        self._last_done = time.perf_counter()
        elapsed = self._last_done - started
        self.train_seconds += elapsed
        previous = self._micro_batch_seconds
        self._micro_batch_seconds = elapsed if previous is None else 0.8 * previous + 0.2 * elapsed
        val_loss, eval_seconds = self.maybe_evaluate()
        report = self._step_report(ce, aux, computed.tokens, elapsed, val_loss, eval_seconds)
        self.bus.publish(report)
        logger.info(
            f"micro-batch {report.micro_batches} epoch {report.epoch} loss {report.loss:.3f} "
            f"{report.tokens_per_second:.0f} tokens/s, {report.peers} trainer(s), {report.experts_online} experts online"
        )
        return report

    def maybe_evaluate(self) -> tuple[float | None, float | None]:
        """(held-out loss, seconds) of the current model version when one is due (every `training.eval_every`
        versions, from the first one this trainer sees), else (None, None). Forward only: see `training.evaluation`."""
        every = self.config.training.eval_every
        epoch = int(self.optimizer.local_epoch)
        if self.val_stream is None or every <= 0 or epoch < self._next_eval_epoch:
            return None, None
        # a version skipped by a state download is not evaluated late: the next due one is
        self._next_eval_epoch = (epoch // every + 1) * every
        started = time.perf_counter()
        try:
            if self._eval_set is None:
                t, m = self.config.training, self.config.model
                self._eval_set = eval_batches(
                    self.val_stream.tokens, m.seq_len, t.eval_batches, self.config.swarm.seed, chunk_size=EVAL_FORWARD_SEQUENCES
                )
            loss = evaluate_loss(self.model, self._eval_set, self.device)
        except Exception as e:  # evaluation is a view of training: it must never stop it
            logger.warning(f"Held-out evaluation at model version {epoch} failed: {type(e).__name__}: {e}")
            return None, None
        seconds = time.perf_counter() - started
        self.eval_seconds += seconds
        self.last_val_loss, self.last_val_epoch = loss, epoch
        sequences = sum(len(inputs) for inputs, _ in self._eval_set)
        share = 100.0 * self.eval_seconds / max(self.train_seconds, 1e-9)
        logger.info(
            f"held-out loss {loss:.3f} at model version {epoch}: {sequences} sequences in {seconds * 1000:.0f} ms "
            f"(evaluation so far {self.eval_seconds:.2f} s = {share:.1f}% of {self.train_seconds:.1f} s training)"
        )
        return loss, seconds

    def _step_report(
        self, ce: torch.Tensor, aux: torch.Tensor, batch_tokens: int, elapsed: float,
        val_loss: float | None = None, eval_seconds: float | None = None,
    ) -> StepReport:  # fmt: skip
        reputation = self.reputation()
        tracker = self.optimizer.tracker
        return StepReport(
            micro_batches=self.micro_batches,
            epoch=int(self.optimizer.local_epoch),
            loss=float(ce.item()),
            aux_loss=float(aux.item()),
            tokens=self.tokens,
            batch_tokens=batch_tokens,
            samples_per_second=self.batch_size / elapsed,
            tokens_per_second=batch_tokens / elapsed,
            peers=int(tracker.global_progress.num_peers),
            experts_online=int(getattr(self.dispatcher, "online_experts", lambda: -1)()),
            expert_failures=int(getattr(self.dispatcher, "failures", 0)),
            banned_peers=tuple(sorted(reputation.get("banned", {}))),
            rejected_parts=sum(int(p.get("invalid", 0)) for p in reputation.get("peers", {}).values()),
            global_epoch=int(tracker.global_epoch),
            samples_accumulated=int(tracker.global_progress.samples_accumulated),
            target_batch_size=int(tracker.target_batch_size),
            val_loss=val_loss,
            eval_seconds=eval_seconds,
        )

    def _senders_since(self, started: float) -> list[str] | None:
        """The peers whose values the all-reduce that finished after `started` used; None if there was none."""
        try:
            groups = self.optimizer.grad_averager.recent_groups(timeout=5)
        except Exception as e:  # the averager process may be busy or gone: this round's members stay unknown
            logger.debug(f"Round members unavailable: {e}")
            return None
        finished = [senders for when, senders in groups if when >= started]
        return finished[-1] if finished else None

    def _pause_until_resumed(self, stop: threading.Event) -> None:
        """Stop was pressed: the last step is done; save, tell the peer (it takes its experts offline), free what
        can be freed, and wait for Start (or for the peer to stop)."""
        self.bus.publish(StateChanged(PeerState.IDLE))
        self.save()
        logger.info(f"Paused at micro-batch {self.micro_batches}: state saved, waiting for Start")
        self.bus.publish(Paused())
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        if self.gate.wait_until_running(stop):
            logger.info(f"Resuming training at micro-batch {self.micro_batches}")
            self.bus.publish(Resumed())

    def _save_bans(self) -> None:
        """Bans survive a restart (`averaging.ban_store`)."""
        try:
            snapshot = self.optimizer.grad_averager.get_reputation(timeout=5)
            save_bans(self.state_dir / BANS_FILE, bans_from_snapshot(snapshot))
        except Exception as e:  # the averager may be gone at shutdown; a save must not fail for this
            logger.debug(f"Saving bans failed: {e}")

    def reputation(self) -> dict:
        """The robust averager's view of other trainers (rejections, distances, bans); reports each new ban once."""
        try:
            snapshot = self.optimizer.grad_averager.get_reputation(timeout=5)
        except Exception as e:  # the averager process may be busy or gone; stats must not stop training
            logger.debug(f"Reputation unavailable: {e}")
            return {}
        for peer, seconds_left in snapshot.get("banned", {}).items():
            if peer not in self._reported_bans:
                record = snapshot.get("peers", {}).get(peer, {})
                reason = record.get("ban_reason") or "no reason kept"
                logger.warning(
                    f"Banned trainer {peer} for {seconds_left:.0f} s: {reason} "
                    f"({record.get('invalid', 0)} invalid part(s), distance {record.get('distance_ema') or 0:.1f}x)"
                )
                self.bus.publish(BanReport(peer, float(seconds_left), reason))
        self._reported_bans = set(snapshot.get("banned", {}))
        # a banned trainer's rounds fail, so it steps alone and runs ahead: its progress must not move our epoch
        self.optimizer.tracker.ignore_peers(self._reported_bans)
        return snapshot

    def shutdown(self) -> None:
        try:
            if self.accusations is not None:  # its last tick publishes what our reducer rejected last
                self.accusations.stop()
            if self.verification is not None:  # first: a ban its last check ends in is saved with the others
                self.verification.shutdown()
                self.verification.log_summary(self.train_seconds)
            self.save()
        finally:
            self.optimizer.shutdown()
