"""Local-expert mode (`training.mode: local_experts`): train locally, synchronise rarely (DiLoCo, for an MoE).

A trainer holds the dense trunk and the experts it hosts (placement chooses them, as for any host) and routes its
tokens only among those experts: the gate is renormalised over them (`alive_mask`). It trains everything locally,
the trunk with AdamW and each held expert with the expert's own AdamW (the one its host uses), without a single
network call per micro-batch. Every `training.sync_every` micro-batches it makes an **outer step**:

* the trunk: the pseudo-gradient (start-of-round weights minus current) is all-reduced with the other trainers
  through the robust reducer (validation, CenteredClip, bans: unchanged), compressed with
  `training.outer_compression` (8-bit blockwise by default); every participant then applies the same Nesterov SGD
  step (`outer_lr`, `outer_momentum`, OpenDiLoCo's 0.7 / 0.9). The all-reduce runs with `identical_results`: every
  member receives the same bytes, so trainers that started the round from the same weights end it with bit-identical
  weights and momentum, and only the pseudo-gradient has to travel (a third of averaging start, pseudo-gradient and
  momentum). A trainer that fell out of step (its round failed or came back partial, it stepped alone while others
  were behind) finds out at the next round's barrier, where every trainer announces a digest of its round start: one
  whose digest is not the most common downloads the round's state from a trainer that holds it;
* the held experts: each holder freezes a snapshot of them at the round boundary and merges its weights with the
  other holders' snapshots of the same round (`moe.replica_sync`: CenteredClip over the weights in peer-id order,
  each sent as its 8-bit delta from the round start, `moe.round_delta`; each holder keeps its own AdamW moments, as
  DiLoCo keeps inner optimizer state local), so the holders of
  an expert reach the same weights; run here, between micro-batches, so no merge lands between a forward and its
  backward.

With `training.outer_overlap` the round's network part (barrier, all-reduce, expert merges) runs in the background
while the next round trains, and is applied at the first micro-batch after it ends (Streaming DiLoCo's overlapped
outer step): the round starts follow the same arithmetic (bit-identical across trainers); the weights move to the
new start plus the progress made since the boundary, which goes out with the next round (`OuterOptimizer.rebase`).

The held experts are still served over hivemind's expert RPC, so stock clients and remote-expert trainers use them.
The model version (epoch) counts outer steps.
"""

from __future__ import annotations

import hashlib
import logging
import threading
import time
from concurrent.futures import Future
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping

import hivemind
from hivemind.compression import CompressionInfo
from hivemind.utils import get_dht_time
import torch

from dragon_swarm.averaging.ban_store import BANS_FILE, bans_from_snapshot, load_bans, save_bans, seed_book
from dragon_swarm.averaging.compression import make_compression
from dragon_swarm.averaging.robust_allreduce import RobustDecentralizedAverager, silent_peer_timeouts
from dragon_swarm.averaging.settings import RobustAveragingSettings
from dragon_swarm.config import SwarmConfig
from dragon_swarm.events import EventBus, PauseGate, PeerState, StateChanged, StepReport
from dragon_swarm.model.hrm_smoe import HRMSMoE
from dragon_swarm.moe.backend import ExpertBackend
from dragon_swarm.moe.expert_uids import expert_uid
from dragon_swarm.moe.hosting import FrozenRound
from dragon_swarm.training.checkpoint import CHECKPOINT_NAME, TrainerState, read_trainer_state, save_trainer_state_or_log
from dragon_swarm.training.contribution import GradientContribution, HonestContribution
from dragon_swarm.training.evaluation import EVAL_FORWARD_SEQUENCES, eval_batches, evaluate_loss
from dragon_swarm.training.versions import VersionKeeper
from dragon_swarm.training.optim import decay_param_groups
from dragon_swarm.training.trainer import warmup_schedule

logger = logging.getLogger(__name__)

# the longest an outer round's matchmaking waits (x averaging.matchmaking_time): the group forms as soon as every
# trainer the barrier saw has joined; this bounds the wait for one that does not come
OUTER_MATCHMAKING_FACTOR = 3.0

# overlapped rounds: a round applied more than this share of a round after its boundary means this trainer runs that
# far ahead of the swarm (it reached the barrier first and trained on while it waited for the others); its next
# round runs to its end, which brings it back in step. Without it trainers drift apart by differences in CPU share,
# up to a round: in an 800-micro-batch benchmark rounds came to be applied 22-34 of 50 micro-batches late
REALIGN_LATE_FRACTION = 0.25


def round_runs_to_end(first: bool, final: bool, last_applied_late: int, sync_every: int) -> str | None:
    """Why an overlapped trainer's round must run to its end before training goes on (None: it runs in the
    background): its first round (trainers start seconds to minutes apart), the last of a bounded run (the trainer
    stops at the swarm's start), or the previous round applied too late (`REALIGN_LATE_FRACTION`)."""
    if first:
        return "this trainer's first round"
    if final:
        return "the last round of this run"
    if last_applied_late > REALIGN_LATE_FRACTION * sync_every:
        return f"the previous round applied {last_applied_late} micro-batch(es) after its boundary: this trainer is ahead of the swarm"
    return None


def presence_key(config: SwarmConfig) -> str:
    """The DHT key under which local-expert trainers announce the outer round they have reached (one subkey each)."""
    return f"{config.run_prefix}_outer_trainers"


def announce_trainer(dht: hivemind.DHT, config: SwarmConfig, round_number: int, digest: str = "") -> None:
    """Value: [the outer round this trainer has reached (-1: it left), the digest of that round's start]. A trainer
    at round r counts as behind for the others' barrier of any later round: they wait for it (up to the averaging
    timeout), so a peer announces itself as soon as it has joined the DHT, before it loads its experts and trunk."""
    ttl = 10 * OUTER_MATCHMAKING_FACTOR * config.averaging.matchmaking_time + 60.0
    dht.store(presence_key(config), subkey=dht.peer_id.to_base58(), value=[round_number, digest], expiration_time=get_dht_time() + ttl)


class HeldExperts:
    """ExpertDispatcher over the experts this peer hosts, called in-process with autograd (no RPC)."""

    def __init__(self, prefix: str, num_layers: int, num_experts: int, backends: Mapping[str, ExpertBackend]):
        self.prefix, self.num_layers, self.num_experts = prefix, num_layers, num_experts
        self.backends = dict(backends)
        self.used: set[str] = set()  # experts that took part in the current micro-batch
        # the set one micro-batch (or evaluation) uses from start to end, locked by the trainer; a takeover or
        # rebalancing that swaps `backends` meanwhile takes effect at the next one
        self.pinned: dict[str, ExpertBackend] | None = None

    def set_backends(self, backends: Mapping[str, ExpertBackend]) -> None:
        self.backends = dict(backends)  # one assignment: the training thread sees the old or the new set

    def current(self) -> dict[str, ExpertBackend]:
        return self.pinned if self.pinned is not None else self.backends

    def alive_mask(self, layer: int) -> torch.Tensor:
        backends = self.current()
        return torch.tensor([expert_uid(self.prefix, layer, i) in backends for i in range(self.num_experts)], dtype=torch.bool)

    def dispatch(self, layer: int, inputs: dict[int, torch.Tensor]) -> dict[int, torch.Tensor]:
        backends, outputs = self.current(), {}
        for index, tokens in inputs.items():
            uid = expert_uid(self.prefix, layer, index)
            backend = backends.get(uid)
            if backend is not None:
                outputs[index] = backend.module(tokens)
                self.used.add(uid)
        return outputs

    def online_experts(self) -> int:
        return len(self.backends)


class OuterOptimizer:
    """Nesterov SGD on pseudo-gradients (DiLoCo's outer optimizer): pure tensor arithmetic, tested directly.

    Start and momentum live on the CPU in float32 and the step is computed there, one rounded operation at a time:
    trainers on different devices that apply the same averaged pseudo-gradient to the same start get the same bits.

    `warmup_rounds`: the first rounds ramp from plain averaging (lr 1, no momentum: round 1) to `lr` and `momentum`
    linearly, reached at round `warmup_rounds` + 1. Early pseudo-gradients are large and point in directions that stop
    mattering a few rounds later; at full Nesterov (0.7 / 0.9 extrapolates 1.33x at once, up to 7x as momentum builds)
    the first rounds overshoot and the held-out loss jumps after each of them (`benchmarks/wan.py`, README)."""

    def __init__(self, params: list[torch.nn.Parameter], lr: float, momentum: float, warmup_rounds: int = 0, overlap: bool = False):
        self.params, self.lr, self.momentum, self.warmup_rounds = params, lr, momentum, warmup_rounds
        self.start = [self._cpu(p) for p in params]
        self.velocity = [torch.zeros_like(s) for s in self.start]
        # where the local progress of the round in training is measured from: the round start, or with overlapped
        # rounds the weights at the last boundary (the start plus the progress still being averaged)
        self.base = [s.clone() for s in self.start] if overlap else self.start

    @staticmethod
    def _cpu(p: torch.Tensor) -> torch.Tensor:
        return p.detach().to("cpu", torch.float32, copy=True)

    def schedule(self, round_number: int) -> tuple[float, float]:
        """(lr, momentum) of outer round `round_number` (1 is the first): the same on every trainer of that round."""
        ramp = min(1.0, (round_number - 1) / self.warmup_rounds) if self.warmup_rounds > 0 else 1.0
        return 1.0 + (self.lr - 1.0) * ramp, self.momentum * ramp

    def pseudo_gradient(self) -> list[torch.Tensor]:
        """The local progress since `base`: what this trainer contributes to the round that ends now."""
        return [b - self._cpu(p) for b, p in zip(self.base, self.params)]

    @torch.no_grad()
    def step(self, pseudo_gradient: list[torch.Tensor], round_number: int | None = None, carry: list[torch.Tensor] | None = None) -> None:
        """One Nesterov step along `pseudo_gradient` from the round's start: the next round's start. `round_number`
        picks the warm-up's lr and momentum (None: the full ones). The weights move to the new start, minus `carry`
        (see `rebase`)."""
        lr, momentum = self.schedule(round_number) if round_number is not None else (self.lr, self.momentum)
        for s, v, g in zip(self.start, self.velocity, pseudo_gradient):
            v.mul_(momentum).add_(g)
            s.sub_((g + v * momentum) * lr)
        self.rebase(carry)

    @torch.no_grad()
    def rebase(self, carry: list[torch.Tensor] | None = None) -> None:
        """The weights become the round start minus `carry`, local progress that no round has carried yet
        (overlapped rounds: what was trained while the last round averaged; None: none); it goes out with the next
        pseudo-gradient, which counts from the start again."""
        for i, (p, s) in enumerate(zip(self.params, self.start)):
            p.copy_(s if carry is None else s - carry[i])
            if self.base[i] is not s:
                self.base[i].copy_(s)

    @torch.no_grad()
    def mark_boundary(self) -> None:
        """Overlapped rounds: the progress so far has just gone out with a round (not applied yet); the next
        pseudo-gradient counts from the weights now."""
        for i, p in enumerate(self.params):
            if self.base[i] is not self.start[i]:
                self.base[i].copy_(p.detach())

    @torch.no_grad()
    def load(self, start: list[torch.Tensor], velocity: list[torch.Tensor]) -> None:
        """Take a round start and momentum from elsewhere (a peer's state): the weights jump to that start."""
        for s, v, new_s, new_v in zip(self.start, self.velocity, start, velocity):
            s.copy_(new_s)
            v.copy_(new_v)
        self.rebase()

    def digest(self) -> str:
        """A short digest of the round start: trainers in step have the same one."""
        h = hashlib.sha256()
        for s in self.start:
            h.update(s.numpy().tobytes())
        return h.hexdigest()[:16]


# a trainer that stops right after a round keeps serving its snapshots until the holders it merged with have fetched
# them, at most this long (a holder still in the round's all-reduce on a busy machine may need a while)
LAST_ROUND_WAIT_S = 30.0
SPREAD_CHUNKS = 64  # the pseudo-gradient travels in this many chunks, in `SpreadLayout` order


class SpreadLayout:
    """The order in which the pseudo-gradient's chunks travel: hivemind gives each group member one contiguous
    partition to reduce, and a member bans only from the parts it reduces. Laid out parameter by parameter, a member
    could draw, say, embedding rows no trainer touched this round, where every pseudo-gradient (a sign-flipped one
    too) is zero, and never see an attacker. Chunks in bit-reversed order make any contiguous share of the vector a
    sample of the whole model. Pure."""

    def __init__(self, shapes: list[torch.Size], chunks: int = SPREAD_CHUNKS):
        self.shapes = shapes
        self.sizes = [int(torch.Size(s).numel()) for s in shapes]
        total = sum(self.sizes)
        chunks = max(1, min(chunks, total))
        base, extra = divmod(total, chunks)  # as tensor_split: the first `extra` chunks one value longer
        self.chunk_sizes = [base + (1 if i < extra else 0) for i in range(chunks)]
        bits = max(1, (chunks - 1).bit_length())
        # position k of the travelling list holds chunk order[k]
        self.order = sorted(range(chunks), key=lambda i: int(format(i, f"0{bits}b")[::-1], 2))

    def empty(self) -> list[torch.Tensor]:
        return [torch.zeros(self.chunk_sizes[i]) for i in self.order]

    def pack(self, tensors: list[torch.Tensor]) -> list[torch.Tensor]:
        chunks = torch.cat([t.detach().reshape(-1) for t in tensors]).split(self.chunk_sizes)
        return [chunks[i] for i in self.order]

    def unpack(self, travelled: list[torch.Tensor]) -> list[torch.Tensor]:
        chunks: list[torch.Tensor] = [torch.empty(0)] * len(self.order)
        for position, i in enumerate(self.order):
            chunks[i] = travelled[position].reshape(-1)
        flat = torch.cat(chunks)
        return [part.reshape(shape) for part, shape in zip(flat.split(self.sizes), self.shapes)]


def majority_digest(own: str, others: list[str]) -> str:
    """The round start most trainers at a round hold (ours counted too); ties go to the smallest digest, so every
    trainer picks the same one. Pure."""
    counts: dict[str, int] = {}
    for d in [own, *others]:
        counts[d] = counts.get(d, 0) + 1
    return min(counts, key=lambda d: (-counts[d], d))


STATE_CHUNK_TIMEOUT_S = 10.0  # a trunk download gives up on a peer that sends no chunk for this long
SHUTDOWN_ROUND_WAIT_S = 5.0  # a trainer that stops lets a round in the background end this long, then drops it


@dataclass(frozen=True)
class PreparedRound:
    """What a round boundary fixed: the round's number, this trainer's pseudo-gradient, the digest of the start it
    is measured against (announced at the barrier), the tag and snapshots of the held experts."""

    round_number: int
    own: list[torch.Tensor]
    digest: str
    tag: str
    frozen: FrozenRound | None
    started: float
    patience: float  # seconds the barrier waits for the others beyond the averaging timeout


@dataclass(frozen=True)
class RoundOutcome:
    """What a round's network part brought back: the pseudo-gradient to step with (the swarm's average, or our own
    when the round failed), the group's size, the share of values averaged, the experts merged, its seconds."""

    round_number: int
    pseudo: list[torch.Tensor]
    peers: int
    received: float
    merged: int
    seconds: float


class _InFlightRound:
    """A round's network part on a daemon thread: a trainer that stops never waits for it at interpreter exit."""

    def __init__(self, run, prepared: PreparedRound, micro_batches: int):
        self.prepared, self.micro_batches = prepared, micro_batches  # the trainer's micro-batches at the boundary
        self._future: Future = Future()
        threading.Thread(target=self._run, args=(run, prepared), name=f"outer-round-{prepared.round_number}", daemon=True).start()

    def _run(self, run, prepared: PreparedRound) -> None:
        try:
            self._future.set_result(run(prepared))
        except BaseException as e:  # re-raised in the training thread by `result`
            self._future.set_exception(e)

    def done(self) -> bool:
        return self._future.done()

    def result(self) -> RoundOutcome:
        return self._future.result()

    def wait(self, timeout: float) -> None:
        try:
            self._future.exception(timeout=timeout)
        except Exception:
            pass


class LocalExpertsTrainer:
    """Same interface as `training.trainer.Trainer` (`sync_with_swarm`, `train`, `save`, `shutdown`)."""

    def __init__(
        self,
        config: SwarmConfig,
        dht: hivemind.DHT,
        hosting,
        train_stream,
        state_dir: Path,
        batch_size: int,
        device: str = "cpu",
        bus: EventBus | None = None,
        gate: PauseGate | None = None,
        contribution: GradientContribution | None = None,
        val_stream=None,
        keep_versions: int = 0,
    ):
        t, m = config.training, config.model
        self.config, self.dht, self.hosting = config, dht, hosting
        self.train_stream, self.state_dir, self.batch_size, self.device = train_stream, state_dir, batch_size, device
        self.bus = bus if bus is not None else EventBus()
        self.gate = gate if gate is not None else PauseGate()
        self.contribution = contribution  # None: honest. A Byzantine one rewrites the pseudo-gradient (tests only)
        self.peer_id = dht.peer_id.to_base58()
        self.dispatcher = HeldExperts(config.expert_prefix, m.num_moe_layers, m.num_experts, hosting.backends)
        hosting.listeners.append(self.dispatcher.set_backends)
        torch.manual_seed(config.swarm.seed)  # every fresh trunk starts from the same weights
        self.model = HRMSMoE(m, self.dispatcher).to(device)
        self.trunk_params = list(self.model.named_trunk_parameters())
        self.params = [p for _, p in self.trunk_params]
        self.micro_batches = self.tokens = self.skipped_batches = 0
        self.epoch = 0
        self.versions = VersionKeeper(state_dir, keep_versions, config.run_prefix, self.peer_id)  # `--keep-versions`
        self.val_stream = val_stream  # held-out loss after outer steps (`training.evaluation`); None: none
        self._eval_set = None
        self._pending_eval: tuple[float | None, float | None] = (None, None)  # reported with the next micro-batch
        self.inner = torch.optim.AdamW(decay_param_groups(self.trunk_params, t.weight_decay), lr=t.lr, betas=tuple(t.betas))
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.inner, warmup_schedule(t.warmup_steps))
        saved = read_trainer_state(self.checkpoint_path, config.run_prefix)
        if saved is not None:
            self._restore(saved)
        self.overlap = t.outer_overlap
        self.outer = OuterOptimizer(self.params, t.outer_lr, t.outer_momentum, t.outer_warmup_rounds, overlap=self.overlap)
        if saved is not None:
            for v, name in zip(self.outer.velocity, (n for n, _ in self.trunk_params)):
                if name in saved.momentum and saved.momentum[name].shape == v.shape:
                    v.copy_(saved.momentum[name])
        self._lock = threading.Lock()  # the averager's state download reads the trunk from its own thread
        self.last_round_peers = 0
        # set at a round's barrier when this trainer's round start is not the swarm's (see `_wait_for_others`)
        self.out_of_step = False
        self._in_flight: _InFlightRound | None = None  # overlapped rounds: the round averaging in the background
        self._closing = threading.Event()  # set by `shutdown`: a round in the background gives up
        self._last_boundary = time.perf_counter()  # the last round boundary (or the start of training)
        self._rounds_started = 0  # outer rounds this trainer has started since it was built
        self._last_applied_late = 0  # micro-batches between the last overlapped round's boundary and its application
        self.layout = SpreadLayout([s.shape for s in self.outer.start])
        robust = RobustAveragingSettings.from_config(config.averaging, t.target_batch_size)
        self.averager = _OuterAverager(
            self.layout.empty(),
            dht,
            trainer=self,
            settings=robust,
            reputation=seed_book(robust.make_reputation_book(), load_bans(state_dir / BANS_FILE)),
            prefix=f"{config.run_prefix}_outer",
            start=True,
            min_matchmaking_time=OUTER_MATCHMAKING_FACTOR * config.averaging.matchmaking_time,
            request_timeout=min(3.0, 0.9 * config.averaging.matchmaking_time),
            allreduce_timeout=config.averaging.averaging_timeout,
            # a member that never sends (matchmaking put it in a group its own side gave up on) is dropped, not waited
            # for until the round fails for all
            silent_member_timeouts=silent_peer_timeouts(config.averaging.averaging_timeout),
            compression=make_compression(t.outer_compression),
            identical_results=True,  # the same averaged bytes on every member: the trunks stay bit-identical
            allow_state_sharing=True,
        )

    # --- state ---

    @property
    def checkpoint_path(self) -> Path:
        return self.state_dir / CHECKPOINT_NAME

    def _restore(self, saved: TrainerState) -> None:
        try:
            self.model.load_trunk_state_dict(saved.trunk)
            self.inner.load_state_dict(saved.optimizer)
        except (RuntimeError, KeyError, ValueError) as e:
            logger.error(f"Trainer checkpoint does not fit this model or optimizer, starting fresh: {e}")
            return
        self.micro_batches, self.tokens, self.epoch = saved.micro_batches, saved.tokens, saved.local_epoch
        logger.info(f"Resumed local-expert trainer at micro-batch {self.micro_batches}, epoch {self.epoch}, {self.tokens:,} tokens")

    @contextmanager
    def _weights_at_round_start(self):
        """The trunk holds the round start (what every trainer agrees on), not the half-trained current weights,
        until the block ends."""
        with torch.no_grad(), self._lock:
            current = [p.detach().clone() for p in self.params]
            for p, s in zip(self.params, self.outer.start):
                p.copy_(s)
            try:
                yield
            finally:
                for p, c in zip(self.params, current):
                    p.copy_(c)

    def _state(self) -> TrainerState:
        with self._weights_at_round_start():
            trunk = self.model.trunk_state_dict()
        momentum = {name: v for (name, _), v in zip(self.trunk_params, self.outer.velocity)}
        return TrainerState(trunk, self.inner.state_dict(), momentum, self.micro_batches, self.tokens, self.epoch)

    def save(self) -> bool:
        """True when the checkpoint was written. A disk that refuses (full, read-only, gone) costs one error line
        and training goes on: the write is atomic, so the last good checkpoint stays as it was."""
        try:  # bans survive a restart (`averaging.ban_store`)
            save_bans(self.state_dir / BANS_FILE, bans_from_snapshot(self.averager.get_reputation(timeout=5)))
        except Exception as e:
            logger.debug(f"Saving bans failed: {e}")
        return save_trainer_state_or_log(self.checkpoint_path, self._state(), self.config.run_prefix, self.peer_id)

    def current_state(self) -> tuple[dict, list[torch.Tensor]]:
        """What a late joiner downloads: the start of the current round and the outer momentum."""
        with self._lock:
            return {"epoch": self.epoch}, [s.clone() for s in self.outer.start] + [v.clone() for v in self.outer.velocity]

    # --- training ---

    def sync_with_swarm(self, timeout: float = 15.0) -> None:
        """A late joiner takes the trunk from a trainer that is ahead (validated: shapes, finite values)."""
        try:
            self._announce_presence(self.epoch)  # others count this trainer in their next round from now on
        except Exception as e:
            logger.debug(f"Announcing this trainer failed: {e}")
        self._download_state(timeout, newer_only=True)

    def _download_state(self, timeout: float, newer_only: bool, carry: list[torch.Tensor] | None = None) -> bool:
        """Take the round start and momentum of the trainer that declares the highest priority (its epoch, plus a
        half for a trainer in step with the swarm's majority); `newer_only`: only from a later epoch than ours.
        `carry`: this trainer's progress not in any round start yet (overlapped rounds), kept on top."""
        deadline, n = time.monotonic() + timeout, len(self.params)
        while True:
            loaded = self.averager.load_state_from_peers(timeout=timeout)
            # None: nobody to download from (the first trainer, or all are at its epoch), or every download failed
            # (a stream reset over a real link ends a download early): a joiner goes on, a trainer out of step,
            # whose round had others in it, asks again
            if loaded is None and newer_only:
                return False
            why = "no peer answered" if loaded is None else None
            if loaded is not None:
                metadata, tensors = loaded
                epoch = int(metadata.get("epoch", 0)) if isinstance(metadata, dict) else 0
                if epoch <= self.epoch if newer_only else epoch < self.epoch:
                    if newer_only:
                        return False
                    why = f"the best peer is at epoch {epoch}"  # still finishing this round's step
                elif len(tensors) != 2 * n or any(t.shape != p.shape for t, p in zip(tensors, self.params * 2)):
                    why = f"{len(tensors)} tensors that do not fit this trunk"
                elif not all(bool(torch.isfinite(t).all()) for t in tensors):
                    why = "NaN/Inf values"
            if why is None:
                break
            if time.monotonic() > deadline:
                logger.warning(f"Could not download the swarm's trunk within {timeout:.0f} s: {why}")
                return False
            logger.debug(f"Trunk download: {why}; asking again")
            time.sleep(1.0)
        self.bus.publish(StateChanged(PeerState.SYNCING))
        with torch.no_grad(), self._lock:
            self.outer.load([t.float() for t in tensors[:n]], [t.float() for t in tensors[n:]])
            self.outer.rebase(carry)
            self.epoch = epoch
        self.averager.state_sharing_priority = float(self.epoch)
        logger.info(f"Downloaded the trunk from a peer: now at epoch {epoch}")
        return True

    def train(self, max_micro_batches: int | None, stop: threading.Event, save_every: int = 10) -> None:
        self._last_boundary = time.perf_counter()  # the first round's length leaves out a state download before it
        while not stop.is_set() and (max_micro_batches is None or self.micro_batches < max_micro_batches):
            if self.gate.paused:
                self.bus.publish(StateChanged(PeerState.IDLE))
                self.save()
                self.gate.wait_until_running(stop)
                continue
            self.bus.publish(StateChanged(PeerState.TRAINING))
            self.train_micro_batch()
            self.apply_finished_round()
            if self.micro_batches % self.config.training.sync_every == 0:
                last = max_micro_batches is not None and self.micro_batches >= max_micro_batches
                self.outer_step(final=last)
                if last:
                    # the other holders of our experts may still be fetching this round's snapshots
                    if self.hosting is not None:
                        self.hosting.stop_placement()  # a peer on its way out takes no expert on
                        self.hosting.wait_for_round_partners(self._round_tag(self.epoch), LAST_ROUND_WAIT_S, stop)
            if self.micro_batches % save_every == 0:
                self.save()

    def _pin_experts(self, held: ExitStack) -> dict[str, ExpertBackend]:
        """Lock the held experts for one micro-batch (or evaluation) and pin them for its dispatch. A placement change
        that hands the experts over while this waits for their locks leaves the old ones behind: take the new set."""
        while True:
            backends = self.dispatcher.backends
            attempt = ExitStack()
            for uid in sorted(backends):
                attempt.enter_context(backends[uid].lock)
            if self.dispatcher.backends is backends:
                held.enter_context(attempt)
                self.dispatcher.pinned = backends
                held.callback(setattr, self.dispatcher, "pinned", None)
                return backends
            attempt.close()

    def train_micro_batch(self) -> StepReport | None:
        started = time.perf_counter()
        t = self.config.training
        inputs, targets = self.train_stream.batch(self.config.swarm.seed, self.peer_id, self.micro_batches, self.batch_size, self.config.model.seq_len)
        inputs, targets = inputs.to(self.device), targets.to(self.device)
        self.dispatcher.used.clear()
        with ExitStack() as held:  # the host's runtime and replica sync wait while this micro-batch uses the experts
            backends = self._pin_experts(held)
            loss, ce, aux = self.model.compute_loss(inputs, targets)
            loss.backward()
            finite = bool(torch.isfinite(loss)) and all(p.grad is None or bool(torch.isfinite(p.grad).all()) for p in self.params)
            if finite:
                torch.nn.utils.clip_grad_norm_(self.params, t.clip_grad_norm)
                self.inner.step()
                self.scheduler.step()
                for uid in self.dispatcher.used:
                    backends[uid].on_backward(inputs.numel(), caller_trusted=True)  # clip, AdamW step, update count
            else:
                for uid in self.dispatcher.used:
                    backends[uid].optimizer.zero_grad(set_to_none=True)
            self.inner.zero_grad(set_to_none=True)
        self.micro_batches += 1
        if not finite:
            self.skipped_batches += 1
            logger.warning(f"Micro-batch {self.micro_batches}: non-finite loss or gradient, dropped ({self.skipped_batches} so far)")
            return None
        self.tokens += inputs.numel()
        elapsed = time.perf_counter() - started
        report = StepReport(
            micro_batches=self.micro_batches, epoch=self.epoch, loss=float(ce.item()), aux_loss=float(aux.item()),
            tokens=self.tokens, batch_tokens=inputs.numel(), samples_per_second=self.batch_size / elapsed,
            tokens_per_second=inputs.numel() / elapsed, peers=self.last_round_peers,
            experts_online=self.dispatcher.online_experts(), expert_failures=0, banned_peers=self._banned(),
            rejected_parts=0, global_epoch=self.epoch, samples_accumulated=0, target_batch_size=t.target_batch_size,
            val_loss=self._pending_eval[0], eval_seconds=self._pending_eval[1],
        )  # fmt: skip
        self._pending_eval = (None, None)
        self.bus.publish(report)
        logger.info(
            f"micro-batch {report.micro_batches} epoch {report.epoch} loss {report.loss:.3f} "
            f"{report.tokens_per_second:.0f} tokens/s, {report.experts_online} held experts"
        )
        return report

    def outer_step(self, final: bool = False) -> None:
        """The round boundary. Synchronous rounds: all-reduce the trunk's pseudo-gradient with the other trainers,
        apply Nesterov, merge the held experts with their other holders, then go on training. Overlapped rounds
        (`training.outer_overlap`): start the round in the background and go on training; the training loop applies
        it at the first micro-batch after it ends (`apply_finished_round`), a few micro-batches into the next round
        (a round still running at the next boundary is waited for there). Some overlapped rounds run to their end
        before training goes on (`round_runs_to_end`): this trainer's first, the last of a bounded run, and one after
        a round applied late. A failed round applies this trainer's own pseudo-gradient."""
        if not self.overlap:
            self.bus.publish(StateChanged(PeerState.AVERAGING))
            self._finish_round(self._run_round(self._prepare_round(self.outer.pseudo_gradient())))
            return
        if self._in_flight is not None:  # it has taken longer than a whole round
            self.bus.publish(StateChanged(PeerState.AVERAGING))
            self.apply_finished_round(wait=True)
        reason = round_runs_to_end(self._rounds_started == 0, final, self._last_applied_late, self.config.training.sync_every)
        own = self.outer.pseudo_gradient()
        with self._lock:
            self.outer.mark_boundary()
        prepared = self._prepare_round(own)
        self._rounds_started += 1
        if reason is None:
            self._in_flight = _InFlightRound(self._run_round, prepared, self.micro_batches)
            return
        self.bus.publish(StateChanged(PeerState.AVERAGING))
        logger.info(f"Outer round {prepared.round_number} runs to its end before training goes on: {reason}")
        self._last_applied_late = 0
        self._finish_round(self._run_round(prepared))

    def apply_finished_round(self, wait: bool = False) -> bool:
        """Overlapped rounds: apply the round running in the background if it has ended (`wait`: wait for it). The
        weights move to the new start plus the progress made since its boundary, which goes out with the next
        round. True when a round was applied."""
        in_flight = self._in_flight
        if in_flight is None or not (wait or in_flight.done()):
            return False
        started = time.perf_counter()
        self._in_flight = None
        try:
            outcome = in_flight.result()
        except Exception as e:  # a failed round must not stop training
            logger.warning(f"Outer round {in_flight.prepared.round_number} failed ({type(e).__name__}: {e}); stepping alone")
            outcome = RoundOutcome(in_flight.prepared.round_number, in_flight.prepared.own, 1, 1.0, 0, 0.0)
        waited = time.perf_counter() - started
        late = self._last_applied_late = self.micro_batches - in_flight.micro_batches
        self._finish_round(outcome, carry=self.outer.pseudo_gradient(), note=f" (in the background; applied {late} micro-batch(es) later, training waited {waited:.1f} s)")
        return True

    def _prepare_round(self, own: list[torch.Tensor]) -> PreparedRound:
        """At the boundary, in the training thread: what this trainer sends (the averager's tensors) and its held
        experts frozen as the round left them."""
        round_number = self.epoch + 1
        shift = self.contribution.round_start_shift(round_number) if self.contribution is not None else 0.0
        if shift:  # TEST ONLY (`off_start`): this trainer's round start becomes one nobody else holds
            with self._lock:
                for s in self.outer.start:
                    s.add_(shift)
        sent = own
        if self.contribution is not None and not isinstance(self.contribution, HonestContribution):
            sent = self._tampered(own)
        with self.averager.get_tensors() as tensors:
            for slot, value in zip(tensors, self.layout.pack(sent)):
                slot.copy_(value)
        tag = self._round_tag(round_number)
        frozen = self.hosting.freeze_round(tag) if self.hosting is not None else None
        now = time.perf_counter()
        # an overlapped round waits in the background: trainers that reach the boundary up to a round later (one
        # that started late keeps its lag, nobody waits for it at a boundary) are worth waiting for, and the wait
        # costs nothing until the next boundary
        round_s, self._last_boundary = now - self._last_boundary, now
        return PreparedRound(round_number, own, self.outer.digest(), tag, frozen, now, round_s if self.overlap else 0.0)

    def _run_round(self, prepared: PreparedRound) -> RoundOutcome:
        """The network part of a round: the barrier, the trunk's all-reduce, the held experts' merge. Touches neither
        the weights nor the round start, so it can run while the next round trains."""
        group = None
        others = self._wait_for_others(prepared.round_number, prepared.digest, prepared.patience)
        if (others is None or others > 0) and not self._closing.is_set():
            try:
                # everyone the barrier saw is on its way: the group forms as soon as they are all in, and only a
                # trainer that does not show up costs the matchmaking time
                self.averager.set_target_group_size(None if others is None else others + 1)
                # a follower that gives up while its leader is still assembling the group leaves a member that never
                # sends: everybody else then waits out the all-reduce timeout. After the barrier, waiting is cheap
                group = self.averager.step(timeout=self.config.averaging.averaging_timeout, allow_retries=False)
            except Exception as e:  # a failed round must not stop training
                logger.warning(f"Outer round {prepared.round_number}: all-reduce failed ({type(e).__name__}: {e}); stepping alone")
        pseudo = prepared.own
        if group:
            with self.averager.get_tensors() as tensors:
                pseudo = self.layout.unpack([t.clone() for t in tensors])
        if not all(bool(torch.isfinite(t).all()) for t in pseudo):
            logger.error(f"Outer round {prepared.round_number}: non-finite average refused; stepping with this trainer's own pseudo-gradient")
            pseudo = prepared.own
        received = self.averager.last_round_received_fraction if group else 1.0
        merged = 0
        if self.hosting is not None and prepared.frozen is not None and not self._closing.is_set():
            merged = self.hosting.merge_frozen(prepared.tag, prepared.frozen)
        seconds = time.perf_counter() - prepared.started
        return RoundOutcome(prepared.round_number, pseudo, len(group) if group else 1, received, merged, seconds)

    def _finish_round(self, outcome: RoundOutcome, carry: list[torch.Tensor] | None = None, note: str = "") -> None:
        """In the training thread: the round's Nesterov step (the new model version); the weights move to the new
        start minus `carry`, the progress made since the round's boundary (overlapped rounds)."""
        with self._lock:
            self.outer.step(outcome.pseudo, round_number=outcome.round_number, carry=carry)
            self.epoch = outcome.round_number
        self.last_round_peers = outcome.peers
        if self.out_of_step:  # the round's barrier showed that our start was not the swarm's: take theirs
            self.out_of_step = not self._download_state(timeout=self.config.averaging.averaging_timeout, newer_only=False, carry=carry)
        # one behind the others' half: a trainer out of step never serves its state before one in step does
        self.averager.state_sharing_priority = self.epoch + (0.0 if self.out_of_step else 0.5)
        # a reducer that did not answer in time leaves this trainer's own values in its part: the trunk differs
        # there, and the next round's barrier finds it out (digests) and the state download brings it back
        partial = f" ({outcome.received:.1%} of values; the rest kept this trainer's own)" if outcome.received < 1.0 else ""
        logger.info(
            f"Outer step {self.epoch}: trunk averaged with {self.last_round_peers - 1} other trainer(s){partial}, "
            f"{outcome.merged} held expert(s) merged with their other holders, {outcome.seconds:.1f} s{note}"
        )
        self.versions.maybe_keep(self.epoch, self._state)
        every = self.config.training.eval_every
        if self.val_stream is not None and every > 0 and self.epoch % every == 0:
            self._pending_eval = self._evaluate()

    def _round_tag(self, epoch: int) -> str:
        """The name the held experts' snapshots of the round that ended at model version `epoch` go by."""
        return f"{self.config.run_prefix}-r{epoch}"

    def _evaluate(self) -> tuple[float | None, float | None]:
        """Held-out loss of the model version just agreed on (the start of the new round), forward only, with the
        experts this trainer holds."""
        started = time.perf_counter()
        try:
            if self._eval_set is None:
                t, m = self.config.training, self.config.model
                self._eval_set = eval_batches(
                    self.val_stream.tokens, m.seq_len, t.eval_batches, self.config.swarm.seed, chunk_size=EVAL_FORWARD_SEQUENCES
                )
            with ExitStack() as held:
                self._pin_experts(held)
                held.enter_context(self._weights_at_round_start())
                loss = evaluate_loss(self.model, self._eval_set, self.device)
        except Exception as e:  # evaluation is a view of training: it must never stop it
            logger.warning(f"Held-out evaluation at model version {self.epoch} failed: {type(e).__name__}: {e}")
            return None, None
        seconds = time.perf_counter() - started
        logger.info(f"held-out loss {loss:.3f} at model version {self.epoch} ({seconds * 1000:.0f} ms)")
        return loss, seconds

    def _wait_for_others(self, round_number: int, digest: str, patience: float = 0.0) -> int | None:
        """The round's barrier: announce that this trainer reached `round_number` (with its round start's digest),
        then wait (up to the averaging timeout) until every other local-expert trainer that announced itself recently
        has reached it too, so all of them enter matchmaking within a poll of each other; hivemind's matchmaking alone
        splits trainers that arrive seconds apart. Compares digests with the trainers at the same round: when ours is
        not the most common, sets `out_of_step` (the outer step then downloads the swarm's state). Returns how many
        others will be in the round (0: step alone, no matchmaking wait; None: unknown, try the round). Trainers this
        one bans are neither waited for nor counted. Entries are unsigned: a forged one costs a wait or a state
        download, nothing more."""
        deadline = time.monotonic() + self.config.averaging.averaging_timeout + patience
        waited_for: set[str] = set()
        banned = set(self._banned())
        while True:
            try:
                self._announce_presence(round_number, digest)
                rounds = {peer: entry for peer, entry in self._announced_rounds().items() if peer not in banned}
            except Exception as e:
                logger.debug(f"Trainer presence lookup failed: {e}")
                return None  # try the round anyway
            behind = {peer for peer, (reached, _) in rounds.items() if 0 <= reached < round_number}
            ready = [peer for peer, (reached, _) in rounds.items() if reached >= round_number]
            if not behind or time.monotonic() > deadline:
                if behind:
                    logger.warning(
                        f"Outer round {round_number}: {len(behind)} trainer(s) still behind after the averaging timeout; going on without them"
                    )
                elif waited_for:
                    logger.info(f"Outer round {round_number}: waited for {len(waited_for)} trainer(s) to reach the round")
                peers_digests = [d for reached, d in rounds.values() if reached == round_number and d]
                swarm_digest = majority_digest(digest, peers_digests)
                if swarm_digest != digest:
                    agree = sum(d == swarm_digest for d in peers_digests)
                    logger.warning(
                        f"Outer round {round_number}: this trainer's round start differs from that of {agree} of "
                        f"{len(peers_digests)} other trainer(s); taking the swarm's state after the round"
                    )
                    self.out_of_step = True
                return len(ready)
            waited_for |= behind
            if self._closing.wait(0.5):
                return 0

    def _announce_presence(self, round_number: int, digest: str = "") -> None:
        announce_trainer(self.dht, self.config, round_number, digest)

    def _announced_rounds(self) -> dict[str, tuple[int, str]]:
        found = self.dht.get(presence_key(self.config), latest=True)
        entries = found.value if found is not None and isinstance(found.value, dict) else {}
        now, rounds = get_dht_time(), {}
        for subkey, item in entries.items():
            value = item.value
            if subkey == self.peer_id or item.expiration_time <= now or not isinstance(value, (list, tuple)) or len(value) != 2:
                continue
            reached, digest = value
            if isinstance(reached, int) and isinstance(digest, str):
                rounds[str(subkey)] = (reached, digest)
        return rounds

    def _tampered(self, pseudo: list[torch.Tensor]) -> list[torch.Tensor]:
        """TEST/BENCHMARK ONLY: an injected Byzantine contribution rewrites the pseudo-gradient as it would a
        gradient (it reads and writes `.grad`)."""
        saved = [p.grad for p in self.params]
        for p, g in zip(self.params, pseudo):
            p.grad = g.to(p.device, copy=True)
        self.contribution.prepare(self.trunk_params, torch.tensor(0.0), self.batch_size, self.last_round_peers)
        tampered = [p.grad.detach().to("cpu", torch.float32, copy=True) for p in self.params]
        for p, g in zip(self.params, saved):
            p.grad = g
        return tampered

    def _banned(self) -> tuple[str, ...]:
        try:
            return tuple(sorted(self.averager.get_reputation(timeout=5).get("banned", {})))
        except Exception:
            return ()

    def shutdown(self) -> None:
        self._closing.set()
        if self._in_flight is not None:  # its result is not applied: the checkpoint holds the last agreed start
            self._in_flight.wait(SHUTDOWN_ROUND_WAIT_S)
        try:
            self.save()
            self._announce_presence(-1)  # nobody waits for a trainer that left
        except Exception as e:
            logger.warning(f"Saving or leaving the outer rounds failed: {e}")
        finally:
            self.averager.shutdown()


class _OuterAverager(RobustDecentralizedAverager):
    """The outer round's averager; a late joiner downloads the trunk from it (`get_current_state`)."""

    def __init__(self, averaged_tensors, dht, *, trainer: LocalExpertsTrainer, start: bool = False, **kwargs):
        self._trainer = trainer
        super().__init__(averaged_tensors, dht, start=False, **kwargs)
        # hivemind reads this only for state downloads (the all-reduce's timeouts come from the constructor): without
        # it a download allows `request_timeout` (tuned for matchmaking: 1.8 s) per chunk, and a chunk of the trunk
        # behind a busy home uplink takes longer. Set before the averager's process forks
        self.next_chunk_timeout = STATE_CHUNK_TIMEOUT_S
        if start:
            self.run_in_background(await_ready=True)

    def get_current_state(self):
        metadata, tensors = self._trainer.current_state()
        return metadata, tensors, [CompressionInfo.from_tensor(t) for t in tensors]

