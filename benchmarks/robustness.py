"""How much training loss a Byzantine attack costs under each aggregator: one attacked run against the same run
without attackers, on this machine. Prints one JSON object. TEST/BENCHMARK ONLY (it runs ``dragon_swarm.attacks``).

    python -m benchmarks.robustness --simulate --peers 16 --byzantine 7 --attack sign_flip \\
        --aggregator centered_clip --steps 30 [--tau 1.0] [--seed 0] [--clean-cache FILE]
    python -m benchmarks.robustness --peers 4 --byzantine 1 --attack sign_flip --aggregator centered_clip --steps 30
    python -m benchmarks.robustness --peers 5 --byzantine 2 --attack sign_flip --aggregator centered_clip --steps 40 \
        --repeat 5 --seed 11

``--repeat N``: N independent repetitions (seeds ``--seed``, ``--seed + 1``, ...), each with its own clean run;
the JSON gives every ratio, their median and maximum, and each run's report. On the real network each run's
``details.accounting`` says, per honest trainer, which rounds did not average and why, how many seconds after the
attack started it first banned each attacker (and for what), which parts it refused and why, and any honest
peer it banned (``benchmarks.round_accounting``): a bad run can be explained from its JSON alone.

``ratio = final_loss / clean_final_loss``. The clean run is the same run with the Byzantine peers removed: the
same ``N - F`` honest peers (``peer0 .. peer{N-F-1}``, the same data shards and seeds), the same aggregator with
the same parameters, no attackers. That is BTARD's comparison (the clean run has the same honest workers), and it
isolates the damage done by the attackers from the aggregator's own statistical cost: a perfect defence scores
1.0. A run whose loss turns NaN/Inf is reported with ``"diverged": true`` and a null loss and ratio; one that
cannot go on (every honest peer banned by most honest peers) with a ``"failure"`` reason and a null loss.

``--simulate``: N peers in one process, synchronous data-parallel training of one shared model (the config's
HRM-sMoE with ``LocalExperts``, so trunk and experts are one model and all of it is averaged). Per step:

1. every honest peer ``peer{i}`` computes its gradient on ``TokenStream.batch(seed, "peer{i}", step, B, T)``
   and clips it to ``training.clip_grad_norm``, as the trainer does;
2. every Byzantine peer makes its attack gradient with :func:`dragon_swarm.attacks.byzantine_gradient`. It
   computes its own real (unclipped, as the trainer's attackers) gradient when the attack needs one
   (``label_shuffle`` on :func:`~dragon_swarm.attacks.corrupt_targets` targets); ALIE, IPM and ``constant`` are
   omniscient here: they are handed this step's honest gradients (stronger than on a real network, where they
   estimate them from their own history). Attackers seed their generators alike (colluding), as the trainer;
3. the ``[N, d]`` stack of flat gradients is all-reduced as hivemind's butterfly all-reduce lays it out
   (:func:`aggregate_round`): cut into N contiguous spans, peer ``i`` reducing span ``i``, each span cut into
   parts of ``--part-size`` values (default 2^17: hivemind's 2^19-byte parts of float32). Each part goes through
   :func:`reduce_partitions`, which drives the production
   :class:`~dragon_swarm.averaging.robust_reducer.RobustTensorPartReducer` with asyncio in this process (senders =
   peers), so validation (NaN parts are rejected), weights, the aggregator and the reputation book are exactly
   the network's. Weights: an honest peer reports 1.0, an attacker :func:`~dragon_swarm.attacks.claimed_weight`
   (1000 for ``inflated_weight``). The ``mean`` baseline is built with ``max_weight`` = ``--max-weight`` (default
   1e6, i.e. practically uncapped), so it shows what naive weighted averaging suffers; robust aggregators ignore
   weights. Attackers' spans are reduced honestly (attackers only send poisoned parts);
4. one AdamW step (the config's lr, betas, weight decay and warmup) on the shared model.

The averaging settings are the trainer's (``RobustAveragingSettings.from_config`` of the config's ``averaging:``
section: CenteredClip's ``tau`` relative to each part's median distance, the ban policy), with this run's
aggregator, ``--tau``, trim ratio and weight cap. ``--absolute-tau`` reads tau in the parts' own units instead
(measured worse against sign_flip and inflated_weight). Bans: every honest peer keeps its own
:class:`~dragon_swarm.averaging.reputation.ReputationBook` for the whole run, as a long-lived peer does, and
bans from the parts of its own span only (so a ban takes as many rounds as on the network). A sender that more
than half of the honest peers ban is left out of the next rounds, as their matchmaking refuses it. The books'
clock is simulated (5 s per step), so results do not depend on this machine's speed. ``--no-bans`` gives every
peer a fresh book each step: the numbers then measure the aggregator alone (use it for the naive ``mean``
baseline: naive averaging has no reputation either). On the network ``--no-bans`` turns off every guard that is not
the aggregator: distance and weight-claim bans, verification by recomputation and signed parts (a malformed part is
still refused: that is validation, not reputation). Without it a ``mean`` run still has those guards, and they hold
it: ``sign_flip``, seed 13, 1.23 with them. The loss is the mean
cross-entropy over ``--eval-batches`` fixed validation batches, measured a few times along the way (``curve``).

Cost (dragon-tiny, B=4, T=32, one torch thread): a few seconds per step for 16 peers (CenteredClip under attack
included), so 16 peers x 30 steps with its clean run take a few minutes. ``--threads`` defaults to 1: with
other processes on a 2-core machine, 2 torch threads ran about 20 times slower (spinning OpenMP workers).
``--clean-cache FILE`` stores clean runs by their settings, so a table over many attacks computes each clean
run once.

Without ``--simulate``: real peers on loopback via ``PeerLauncher``: a bootstrap, a ``--no-train --experts all``
host, N trainers ``--no-host --max-steps S --stats-file ...``, the last F of them started with the hidden
``--attack NAME``; every peer gets ``-c`` a temporary YAML derived from ``--config`` with
``averaging.aggregator``/``averaging.tau``/``averaging.trim_ratio`` set, ``model.seq_len`` = ``--seq-len``,
``training.batch_size`` = ``--batch-size`` and ``training.target_batch_size`` = N x that (one global step per
round of micro-batches, as in the simulation).
``final_loss`` is the mean over honest trainers of their last 5 training losses; the clean run starts N - F
honest trainers. Progress: ``details.honest_final_epochs`` (each honest trainer's model version at its last
micro-batch) and ``pace_ratio``, the honest trainers' model versions per micro-batch while all of them train,
attacked / clean (``round_accounting.epochs_per_micro_batch_together``: final epochs also count the micro-batches a
trainer ran before the others had started, and where a fast trainer stopped). It needs the trainer to build its gradient averager from the ``averaging`` section; on 2 cores
keep N small (4-6 peers).
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import logging
import math
import statistics
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
import yaml

from dragon_swarm.attacks import Attack, byzantine_gradient, claimed_weight, corrupt_targets, parse_attack
from dragon_swarm.averaging.aggregators import AGGREGATORS, Aggregator
from dragon_swarm.averaging.reputation import MAX_RATIO, ReputationBook
from dragon_swarm.averaging.settings import RobustAveragingSettings
from dragon_swarm.averaging.robust_reducer import RobustTensorPartReducer
from dragon_swarm.config import SwarmConfig, load_config, resolve_config_path
from dragon_swarm.data.corpus import default_data_dir
from dragon_swarm.data.dataset import TokenStream, build_token_stream
from dragon_swarm.model.dispatch import LocalExperts
from dragon_swarm.model.hrm_smoe import HRMSMoE
from benchmarks.round_accounting import account_trainer, attack_start, epochs_per_micro_batch_together
from benchmarks.local_peers import PeerLauncher, read_stats, stop_peers_on_sigterm

logger = logging.getLogger(__name__)

DEFAULT_PART_SIZE = 2**17  # float32 values per all-reduce part: hivemind's DEFAULT_PART_SIZE_BYTES (2^19) / 4
SIMULATED_STEP_SECONDS = 5.0  # the reputation books' clock advances this much per step (bans last 300 s = 60 steps)
CURVE_POINTS = 5  # validation measurements along a run, besides the one before the first step
NETWORK_TAIL = 5  # network mode: final loss = mean of each honest trainer's last NETWORK_TAIL losses
# attacks whose gradient is built from the attacker's own real gradient; the others only need the honest ones
OWN_GRADIENT_ATTACKS = frozenset({Attack.SIGN_FLIP, Attack.NOISE, Attack.LABEL_SHUFFLE, Attack.INFLATED_WEIGHT})


@dataclass(frozen=True)
class RobustnessSettings:
    """One benchmark run; ``peers`` counts attackers too. ``tau``/``trim_ratio`` None: from the config (for
    trim_ratio: at least enough to trim ``byzantine`` rows)."""

    peers: int
    byzantine: int
    attack: Attack
    aggregator: str
    steps: int
    simulate: bool = True
    config: str = "dragon-tiny"
    tau: float | None = None
    absolute_tau: bool = False  # simulation only: tau in the parts' units instead of the production's relative tau
    trim_ratio: float | None = None
    max_weight: float = 1e6
    seed: int = 0
    batch_size: int = 4
    seq_len: int = 32
    part_size: int = DEFAULT_PART_SIZE
    eval_batches: int = 4
    eval_batch_size: int = 16
    bans: bool = True
    min_observations: int | None = None  # ReputationBook: far parts in a row before a ban (None: the trainer's)
    ban_distance_ratio: float | None = None  # ReputationBook: how far counts as far (None: the trainer's)
    worker_momentum: float = 0.0  # simulation: peers send a momentum of their gradients, see simulate(); the CLI
    # defaults it to the config's training.worker_momentum (network peers take it from the config themselves)
    timeout: float = 1800.0  # network mode: seconds to wait for the trainers

    def __post_init__(self):
        problems = []
        if self.peers < 2:
            problems.append(f"--peers must be >= 2, got {self.peers}")
        if not 0 <= self.byzantine < self.peers:
            problems.append(f"--byzantine must be in [0, peers), got {self.byzantine}")
        if self.aggregator not in AGGREGATORS:
            problems.append(f"--aggregator must be one of {', '.join(sorted(AGGREGATORS))}, got {self.aggregator!r}")
        if self.steps < 1:
            problems.append(f"--steps must be >= 1, got {self.steps}")
        for name in ("batch_size", "seq_len", "part_size", "eval_batches", "eval_batch_size"):
            if getattr(self, name) < 1:
                problems.append(f"--{name.replace('_', '-')} must be >= 1, got {getattr(self, name)}")
        if not 0.0 <= self.worker_momentum < 1.0:
            problems.append(f"--worker-momentum must be in [0, 1), got {self.worker_momentum}")
        if not self.simulate:  # a trainer builds its averaging from the config alone
            simulation_only = {
                "--worker-momentum": self.worker_momentum != 0.0,
                "--absolute-tau": self.absolute_tau,
                "--min-observations": self.min_observations is not None,
                "--ban-distance-ratio": self.ban_distance_ratio is not None,
            }
            problems += [f"{flag} needs --simulate" for flag, used in simulation_only.items() if used]
        if problems:
            raise ValueError("; ".join(problems))

    @property
    def honest(self) -> int:
        return self.peers - self.byzantine

    def clean(self) -> "RobustnessSettings":
        """The same run with the attackers removed (the honest peers and everything else unchanged, including
        the trim ratio, which is resolved from the attacked run's N and F)."""
        trim_ratio = self.averaging(load_config(self.config)).trim_ratio
        return dataclasses.replace(self, peers=self.honest, byzantine=0, trim_ratio=trim_ratio)

    def averaging(self, config: SwarmConfig) -> RobustAveragingSettings:
        """What a trainer builds from ``config`` (``RobustAveragingSettings.from_config``: relative tau, ban
        policy), with this run's aggregator, tau, trim ratio and weight cap (and ban streak, if set)."""
        a = config.averaging
        trim_ratio = self.trim_ratio
        if trim_ratio is None:
            # trimmed_mean tolerates floor(trim_ratio * n) attackers: trim at least F rows at each end
            trim_ratio = min(max(a.trim_ratio, (self.byzantine + 0.5) / self.peers), 0.499)
        extra = {} if self.min_observations is None else {"min_observations": self.min_observations}
        if self.ban_distance_ratio is not None:
            extra["ban_distance_ratio"] = self.ban_distance_ratio
        trainer = RobustAveragingSettings.from_config(a, config.training.target_batch_size)
        return dataclasses.replace(
            trainer,
            aggregator=self.aggregator,
            tau=a.tau if self.tau is None else self.tau,
            relative_tau=not self.absolute_tau,
            trim_ratio=trim_ratio,
            max_weight=self.max_weight if self.simulate else trainer.max_weight,
            **extra,
        )

    def to_json(self) -> dict:
        d = dataclasses.asdict(self)
        d["attack"] = self.attack.value
        return d


@dataclass
class RunResult:
    final_loss: float | None  # None when diverged or failed
    diverged: bool
    curve: list[dict]
    seconds: float
    details: dict
    failure: str | None = None  # why the run could not go on (e.g. every honest peer refused by the others)


# ---------------------------------------------------------------------------------------------------------------
# The seam: per-partition aggregation of one step's gradients, through the production reducer.
# ---------------------------------------------------------------------------------------------------------------


def reduce_partitions(
    grads: torch.Tensor,
    weights: list[float],
    sender_ids: list[str],
    aggregator: Aggregator,
    reputation: ReputationBook,
    part_size: int,
    round_name: str = "",
    clock: Callable[[], float] = time.monotonic,
    local_sender: str | None = None,
    weight_claim_limit: float | None = None,
) -> tuple[torch.Tensor, RobustTensorPartReducer]:
    """Aggregate ``grads`` ``[n, d]`` (one row per sender) part by part, as one all-reduce round would.

    Runs :class:`RobustTensorPartReducer` in-process with asyncio: every sender feeds its parts in order and
    awaits each aggregate, as hivemind's runner does. A sender whose part is rejected (NaN/Inf) or who is banned
    in ``reputation`` drops out of the rest of the round. Returns the flat aggregate ``[d]`` and the reducer (its
    ``reports`` hold per-part distances and iterations).

    :raises RuntimeError: if no sender got the whole aggregate back
    """
    if grads.dim() != 2 or grads.shape[0] != len(weights) or grads.shape[0] != len(sender_ids):
        raise ValueError(f"need one row, weight and id per sender: {tuple(grads.shape)}, {len(weights)}, {len(sender_ids)}")
    rows = [list(torch.split(row, part_size)) for row in grads]
    return asyncio.run(
        _reduce_round(rows, weights, sender_ids, aggregator, reputation, round_name, clock, local_sender, weight_claim_limit)
    )


async def _reduce_round(rows, weights, sender_ids, aggregator, reputation, round_name, clock, local_sender, weight_claim_limit):
    # built inside the loop: the reducer creates asyncio futures and events
    reducer = RobustTensorPartReducer(
        [part.shape for part in rows[0]],
        [part.dtype for part in rows[0]],
        sender_ids,
        aggregator=aggregator,
        reputation=reputation,
        round_name=round_name,
        clock=clock,
        local_sender=local_sender,
        weight_claim_limit=weight_claim_limit,
    )

    async def send(index: int) -> list[torch.Tensor]:
        return [await reducer.accumulate_part(index, k, part, weight=weights[index]) for k, part in enumerate(rows[index])]

    outcomes = await asyncio.gather(*(send(i) for i in range(len(rows))), return_exceptions=True)
    complete = [outcome for outcome in outcomes if isinstance(outcome, list)]
    if not complete:
        raise RuntimeError(f"round {round_name}: no sender got the aggregate back: {outcomes!r}"[:2000])
    return torch.cat([part.reshape(-1) for part in complete[0]]), reducer


def aggregate_round(
    grads: torch.Tensor,
    weights: list[float],
    sender_ids: list[str],
    aggregator: Aggregator,
    books: list[ReputationBook],
    part_size: int,
    round_name: str = "",
    clock: Callable[[], float] = time.monotonic,
    weight_claim_limit: float | None = None,
) -> tuple[torch.Tensor, list[RobustTensorPartReducer]]:
    """One all-reduce round laid out as hivemind's butterfly all-reduce: the flat ``[n, d]`` stack is cut into
    ``n`` contiguous spans, one per sender (equal spans, as hivemind's load balancing gives equal peers), and
    sender ``i`` reduces span ``i`` with its own reputation book ``books[i]``, part by part
    (:func:`reduce_partitions`). So a peer sees only its span's parts, and bans only from what it saw.

    Attackers' spans are reduced honestly here: attackers only *send* poisoned parts; corrupting the span they
    reduce for others is a different attack (BTARD's verification), not simulated.
    """
    n, d = grads.shape
    base, extra = divmod(d, n)
    sizes = [base + (i < extra) for i in range(n)]
    values, reducers = [], []
    for owner, span in enumerate(torch.split(grads, sizes, dim=1)):
        if span.shape[1] == 0:
            continue
        value, reducer = reduce_partitions(
            span, weights, sender_ids, aggregator, books[owner], part_size, f"{round_name}/{sender_ids[owner]}", clock,
            local_sender=sender_ids[owner], weight_claim_limit=weight_claim_limit,
        )
        values.append(value)
        reducers.append(reducer)
    return torch.cat(values), reducers


# ---------------------------------------------------------------------------------------------------------------
# Simulation
# ---------------------------------------------------------------------------------------------------------------


def flat_gradient(model: HRMSMoE, params: list[torch.nn.Parameter], inputs, targets) -> tuple[torch.Tensor, float]:
    """(flat gradient of the total loss over ``params``, cross-entropy). Unused parameters (an expert no token
    chose) get zeros."""
    loss, ce, _ = model.compute_loss(inputs, targets)
    grads = torch.autograd.grad(loss, params, allow_unused=True)
    flat = torch.cat([(g if g is not None else torch.zeros_like(p)).reshape(-1) for g, p in zip(grads, params)])
    return flat, float(ce.detach())


def clip_(flat: torch.Tensor, max_norm: float) -> torch.Tensor:
    """In place, like ``torch.nn.utils.clip_grad_norm_`` over all parameters (what an honest trainer sends)."""
    norm = float(torch.linalg.vector_norm(flat))
    if norm > max_norm:
        flat.mul_(max_norm / (norm + 1e-6))
    return flat


@torch.no_grad()
def validation_loss(model: HRMSMoE, val: TokenStream, settings: RobustnessSettings) -> float:
    losses = []
    for i in range(settings.eval_batches):
        inputs, targets = val.validation_batch(i, settings.eval_batch_size, settings.seq_len)
        losses.append(float(model.compute_loss(inputs, targets)[1]))
    return sum(losses) / len(losses)


def simulate(settings: RobustnessSettings, config: SwarmConfig, train: TokenStream, val: TokenStream) -> RunResult:
    """One simulated run (see the module docstring); attackers are the last ``settings.byzantine`` peers.

    With ``settings.worker_momentum`` β > 0 every peer sends ``m ← β·m + (1 - β)·g`` instead of its gradient
    ``g`` (worker momentum, Karimireddy, He, Jaggi 2021 "Learning from History for Byzantine Robust
    Optimization"): honest messages then vary much less from peer to peer, so attackers stand out. Attackers
    that build on their own gradient use their own momentum the same way; ALIE/IPM see the honest momenta. This
    is an experiment: the trainer does not do it today.
    """
    started = time.perf_counter()
    if settings.seq_len > config.model.seq_len:
        raise ValueError(f"--seq-len {settings.seq_len} exceeds the model's seq_len {config.model.seq_len}")
    t = config.training
    torch.manual_seed(settings.seed)
    model = HRMSMoE(config.model, LocalExperts.from_config(config.model))
    params = list(model.parameters())
    optimizer = torch.optim.AdamW(params, lr=t.lr, betas=t.betas, weight_decay=t.weight_decay)
    warmup = max(1, t.warmup_steps)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda epoch: min(1.0, (epoch + 1) / warmup))
    averaging = settings.averaging(config)
    aggregator = averaging.make_aggregator()

    attack = settings.attack
    sender_ids = [f"peer{i}" for i in range(settings.peers)]
    honest_ids, byzantine_ids = sender_ids[: settings.honest], sender_ids[settings.honest :]
    rngs = {peer: torch.Generator().manual_seed(settings.seed) for peer in byzantine_ids}  # colluding: one seed
    weights = [1.0] * settings.honest + [claimed_weight(attack, 1.0)] * settings.byzantine
    # each peer's own book; only honest peers keep theirs (with --no-bans nobody does)
    books = [averaging.make_reputation_book() for _ in sender_ids]
    first_ban_step = None
    momenta: dict[str, torch.Tensor] = {}

    def sent(peer: str, gradient: torch.Tensor) -> torch.Tensor:
        if not settings.worker_momentum:
            return gradient
        if peer not in momenta:
            momenta[peer] = gradient.clone()
        else:
            momenta[peer].mul_(settings.worker_momentum).add_(gradient, alpha=1.0 - settings.worker_momentum)
        return momenta[peer].clone()
    curve_steps = sorted({round(settings.steps * k / CURVE_POINTS) for k in range(1, CURVE_POINTS + 1)})

    curve = [{"step": 0, "val_loss": validation_loss(model, val, settings)}]
    train_losses, iterations, rejected, banned_pairs, left_out = [], [], 0, set(), {}
    diverged, failure = False, None
    for step in range(settings.steps):
        rows, ces = [], []
        for peer in honest_ids:
            inputs, targets = train.batch(settings.seed, peer, step, settings.batch_size, settings.seq_len)
            flat, ce = flat_gradient(model, params, inputs, targets)
            rows.append(sent(peer, clip_(flat, t.clip_grad_norm)))
            ces.append(ce)
        train_losses.append(sum(ces) / len(ces))
        if not all(math.isfinite(ce) for ce in ces) or not all(bool(torch.isfinite(r).all()) for r in rows):
            diverged = True
            break
        honest = torch.stack(rows)
        for peer in byzantine_ids:
            own = torch.zeros(honest.shape[1])
            if attack in OWN_GRADIENT_ATTACKS:
                inputs, targets = train.batch(settings.seed, peer, step, settings.batch_size, settings.seq_len)
                if attack is Attack.LABEL_SHUFFLE:
                    targets = corrupt_targets(targets, rngs[peer])
                own, _ = flat_gradient(model, params, inputs, targets)
                own = sent(peer, own)
            rows.append(byzantine_gradient(attack, own, honest, rngs[peer], settings.peers, settings.byzantine))
        for owner, peer in enumerate(sender_ids):
            if not settings.bans or peer in byzantine_ids:
                books[owner] = averaging.make_reputation_book()
        now = step * SIMULATED_STEP_SECONDS
        # matchmaking: a sender that most honest peers ban is refused by them and left out of the group
        active = [
            i for i, peer in enumerate(sender_ids)
            if 2 * sum(books[owner].is_banned(peer, now) for owner in range(settings.honest)) <= settings.honest
        ]  # fmt: skip
        for i in set(range(settings.peers)) - set(active):
            left_out[sender_ids[i]] = left_out.get(sender_ids[i], 0) + 1
        if not any(i < settings.honest for i in active):
            failure = f"step {step}: every honest peer is banned by most honest peers; the swarm has fallen apart"
            break
        aggregate, reducers = aggregate_round(
            torch.stack([rows[i] for i in active]), [weights[i] for i in active], [sender_ids[i] for i in active],
            aggregator, [books[i] for i in active], settings.part_size, round_name=f"step{step}", clock=lambda: now,
            weight_claim_limit=averaging.weight_claim_limit if settings.bans else None,
        )  # fmt: skip
        for reducer in reducers:
            iterations.extend(report.iterations for report in reducer.reports)
            rejected += len(reducer.rejected)
        if settings.bans:
            now_banned = {
                (owner, peer) for owner in range(settings.honest) for peer in sender_ids if books[owner].is_banned(peer, now)
            }  # fmt: skip
            if now_banned - banned_pairs and first_ban_step is None:
                first_ban_step = step + 1
            banned_pairs |= now_banned
        offset = 0
        for p in params:
            p.grad = aggregate[offset : offset + p.numel()].view_as(p).clone()
            offset += p.numel()
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        if step + 1 in curve_steps:
            loss = validation_loss(model, val, settings)
            curve.append({"step": step + 1, "val_loss": loss})
            if not math.isfinite(loss):
                diverged = True
                break

    final = curve[-1]["val_loss"] if not (diverged or failure) else None
    details = {
        "train_loss_first": train_losses[0] if train_losses else None,
        "train_loss_last": train_losses[-1] if train_losses else None,
        "parameters": sum(p.numel() for p in params),
        "parts_per_step": sum(len(r.reports) for r in reducers) if train_losses else None,
        "rejected_parts": rejected,
        # how many honest peers banned each peer at some point (honest peers here are false bans)
        "banned_by": {peer: sum(1 for _, p in banned_pairs if p == peer) for peer in sorted({p for _, p in banned_pairs})},
        "first_ban_step": first_ban_step,
        "left_out_rounds": left_out,  # rounds each peer was refused by most honest peers (out of the group)
        # honest peers banned by honest peers: "owner: banned, ..." (false bans)
        "false_bans": {
            sender_ids[owner]: sorted(p for o, p in banned_pairs if o == owner and p in honest_ids)
            for owner in sorted({o for o, p in banned_pairs if p in honest_ids})
        },
    }
    if iterations:
        details["aggregator_iterations"] = {
            "mean": statistics.fmean(iterations),
            "max": max(iterations),
        }
    return RunResult(final, diverged, curve, time.perf_counter() - started, details, failure)


# ---------------------------------------------------------------------------------------------------------------
# Real peers on loopback
# ---------------------------------------------------------------------------------------------------------------


def write_network_config(settings: RobustnessSettings, work_dir: Path) -> Path:
    """A copy of the config with this run's averaging settings; validated before any peer starts."""
    raw = yaml.safe_load(resolve_config_path(settings.config).read_text())
    averaging = settings.averaging(load_config(settings.config))
    raw.setdefault("averaging", {}).update(
        aggregator=settings.aggregator, tau=averaging.tau, trim_ratio=averaging.trim_ratio
    )
    if not settings.bans:  # the unprotected baseline: nobody is banned for what it sends, nobody is checked
        raw["averaging"].update(ban_distance_ratio=MAX_RATIO, ban_strikes=10**9, weight_claim_factor=None, signed_parts=False)
        raw.setdefault("verification", {})["enabled"] = False
    raw["model"]["seq_len"] = settings.seq_len
    # one global step per round of micro-batches, as in the simulation (an inflated claim only speeds epochs up)
    # what this benchmark measures is the per-step gradient all-reduce: remote_experts mode whatever the config says
    raw.setdefault("training", {}).update(
        mode="remote_experts", batch_size=settings.batch_size, target_batch_size=settings.peers * settings.batch_size
    )
    path = work_dir / "robustness.yaml"
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    load_config(str(path))  # raises ConfigError if the peer would refuse it
    return path


def run_network(settings: RobustnessSettings, work_dir: Path) -> RunResult:
    """One run with real peers (see the module docstring); the last ``settings.byzantine`` trainers attack."""
    started = time.perf_counter()
    work_dir.mkdir(parents=True, exist_ok=True)
    config_path = write_network_config(settings, work_dir)
    launcher = PeerLauncher(work_dir)
    stats = [work_dir / f"trainer{i}.jsonl" for i in range(settings.peers)]
    try:
        initial_peers = launcher.bootstrap().initial_peers()
        common = ["-c", str(config_path), "--initial-peers", *initial_peers]
        host = launcher.start("host", [*common, "--no-train", "--experts", "all", "--state-dir", str(work_dir / "host")])
        host.wait_for_log("Serving", timeout=180)
        trainers = []
        for i in range(settings.peers):
            args = [*common, "--no-host", "--state-dir", str(work_dir / f"trainer{i}"), "--max-steps", str(settings.steps),
                    "--stats-file", str(stats[i]), "--batch-size", str(settings.batch_size)]  # fmt: skip
            if i >= settings.honest:
                args += ["--attack", settings.attack.value]
            trainers.append(launcher.start(f"trainer{i}", args))
        deadline = time.monotonic() + settings.timeout
        codes = [t.wait(timeout=max(1.0, deadline - time.monotonic())) for t in trainers[: settings.honest]]
        for i, code in enumerate(codes):
            if code != 0:
                raise RuntimeError(f"honest trainer{i} exited with {code}:\n{trainers[i].stderr()[-3000:]}")
    finally:
        launcher.stop_all()
    records = [read_stats(stats[i]) for i in range(settings.honest)]
    losses = [[r["loss"] for r in trace] for trace in records]
    if any(len(trace) == 0 for trace in losses):
        raise RuntimeError(f"an honest trainer wrote no stats: {[len(trace) for trace in losses]}")
    tails = [sum(trace[-NETWORK_TAIL:]) / len(trace[-NETWORK_TAIL:]) for trace in losses]
    final = sum(tails) / len(tails)
    diverged = not math.isfinite(final)
    shortest = min(len(trace) for trace in losses)
    curve_steps = sorted({max(1, round(shortest * k / CURVE_POINTS)) for k in range(1, CURVE_POINTS + 1)})
    curve = [{"step": s, "train_loss": sum(trace[s - 1] for trace in losses) / len(losses)} for s in curve_steps]
    attackers = {}
    for attacker in trainers[settings.honest :]:
        try:
            attackers[attacker.peer_id(timeout=1.0)] = attack_start(attacker.stderr())
        except (RuntimeError, TimeoutError):  # an attacker that never got as far as logging its id
            continue
    details = {
        "honest_steps": [len(trace) for trace in losses],
        "honest_final_epochs": [trace[-1]["epoch"] for trace in records],
        # model versions per honest micro-batch while all honest trainers train (start-up and finish excluded)
        "honest_epochs_per_micro_batch": epochs_per_micro_batch_together(records),
        "byzantine_exit_codes": [t.proc.returncode for t in trainers[settings.honest :]],
        # per honest trainer: rounds not averaged and why, time to its first ban of each attacker, refused parts
        "accounting": [account_trainer(t.stderr(), attackers) for t in trainers[: settings.honest]],
    }
    return RunResult(None if diverged else final, diverged, curve, time.perf_counter() - started, details)


# ---------------------------------------------------------------------------------------------------------------
# CLI
# ---------------------------------------------------------------------------------------------------------------


def make_executor(settings: RobustnessSettings, keep_logs: Path | None = None) -> Callable[[RobustnessSettings], RunResult]:
    """A function running one settings object in this benchmark's mode (data loaded once for all runs)."""
    if settings.simulate:
        config = load_config(settings.config)
        data_dir = default_data_dir()
        d = config.data
        train, val = build_token_stream(d.source, data_dir, data_dir / "cache", d.tokenizer, d.val_fraction)
        return lambda s: simulate(s, config, train, val)

    def execute(s: RobustnessSettings) -> RunResult:
        if keep_logs is not None:  # every peer's log stays for reading afterwards
            work = Path(tempfile.mkdtemp(prefix=f"{s.attack.value if s.byzantine else 'clean'}-", dir=keep_logs))
            return run_network(s, work)
        with tempfile.TemporaryDirectory(prefix="dragon-robustness-") as tmp:
            return run_network(s, Path(tmp))

    return execute


def run(settings: RobustnessSettings, clean_cache: Path | None = None, keep_logs: Path | None = None) -> dict:
    """Both runs of one benchmark (attacked, then clean) and the JSON-ready report."""
    execute = make_executor(settings, keep_logs)
    attacked = execute(settings)
    clean = (cached_clean(clean_cache, execute) if clean_cache is not None else execute)(settings.clean())
    ratio = None
    if attacked.final_loss is not None and clean.final_loss is not None:
        ratio = attacked.final_loss / clean.final_loss
    averaging = settings.averaging(load_config(settings.config))
    return {
        "benchmark": "robustness",
        "mode": "simulate" if settings.simulate else "network",
        "settings": settings.to_json(),
        "aggregator_params": {"tau": averaging.tau, "relative_tau": averaging.relative_tau, "trim_ratio": averaging.trim_ratio, "max_iters": averaging.max_iters,
                              "tol": averaging.tol, "max_weight": averaging.max_weight,
                              "min_observations": averaging.min_observations,
                              "ban_distance_ratio": averaging.ban_distance_ratio, "bans": settings.bans},  # fmt: skip
        "final_loss": attacked.final_loss,
        "clean_final_loss": clean.final_loss,
        "ratio": ratio,
        # network runs: honest trainers' pace (model versions per micro-batch while all train), attacked / clean
        "pace_ratio": _pace_ratio(attacked.details, clean.details),
        "diverged": attacked.diverged,
        "clean_diverged": clean.diverged,
        "failure": attacked.failure,
        "clean_failure": clean.failure,
        "curve": attacked.curve,
        "clean_curve": clean.curve,
        "details": attacked.details,
        "clean_details": clean.details,
        "seconds": attacked.seconds,
        "clean_seconds": clean.seconds,
        "torch_threads": torch.get_num_threads(),
    }


def _pace_ratio(attacked: dict, clean: dict) -> float | None:
    a, c = attacked.get("honest_epochs_per_micro_batch"), clean.get("honest_epochs_per_micro_batch")
    return a / c if a is not None and c else None


def cached_clean(cache: Path, execute: Callable[[RobustnessSettings], RunResult]) -> Callable[[RobustnessSettings], RunResult]:
    """Wrap ``execute`` so that clean runs are stored in (and read back from) the JSON file ``cache``."""

    def run_clean(s: RobustnessSettings) -> RunResult:
        key = json.dumps({**s.to_json(), "attack": None}, sort_keys=True)
        table = json.loads(cache.read_text()) if cache.exists() else {}
        if key in table:
            return RunResult(**table[key])
        result = execute(s)
        table = json.loads(cache.read_text()) if cache.exists() else {}
        table[key] = dataclasses.asdict(result)
        cache.write_text(json.dumps(table, indent=1))
        return result

    return run_clean


def parse_args(argv: list[str] | None = None) -> tuple[RobustnessSettings, Path | None]:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--peers", type=int, required=True, help="peers in all, attackers included (N)")
    p.add_argument("--byzantine", type=int, required=True, help="attackers among them (F)")
    p.add_argument("--attack", required=True, help=f"one of: {', '.join(a.value for a in Attack)}")
    p.add_argument("--aggregator", required=True, help=f"one of: {', '.join(sorted(AGGREGATORS))}")
    p.add_argument("--steps", type=int, required=True, help="optimizer steps (S)")
    p.add_argument("--simulate", action="store_true", help="all peers in this process (default: real loopback peers)")
    p.add_argument("--config", default="dragon-tiny", help="swarm config name or YAML path")
    p.add_argument("--tau", type=float, default=None,
                   help="centered_clip radius, relative to each part's median distance (default: the config's averaging.tau)")
    p.add_argument("--absolute-tau", action="store_true",
                   help="simulation: tau in the parts' own units (default: as the trainer, x each part's median distance)")
    p.add_argument("--trim-ratio", type=float, default=None, help="trimmed_mean ratio (default: enough to trim F rows)")
    p.add_argument("--max-weight", type=float, default=1e6,
                   help="simulation: weight cap of the mean aggregator (default 1e6: uncapped; a trainer uses 1)")
    p.add_argument("--seed", type=int, default=0, help="model init, data and attacker seed")
    p.add_argument("--batch-size", type=int, default=4, help="sequences per peer per step")
    p.add_argument("--seq-len", type=int, default=32, help="tokens per sequence")
    p.add_argument("--part-size", type=int, default=DEFAULT_PART_SIZE, help="values per all-reduce part (simulation)")
    p.add_argument("--eval-batches", type=int, default=4, help="validation batches per measurement (simulation)")
    p.add_argument("--eval-batch-size", type=int, default=16, help="sequences per validation batch (simulation)")
    p.add_argument("--no-bans", dest="bans", action="store_false",
                   help="no reputation: simulation, a fresh book every step; network, no bans for distance or weight "
                        "claims, no verification, no signed parts (the naive mean baseline; malformed parts are still refused)")
    p.add_argument("--min-observations", type=int, default=None,
                   help="simulation: far parts in a row before a peer bans a sender (default: the trainer's)")
    p.add_argument("--ban-distance-ratio", type=float, default=None,
                   help="simulation: distance (x the part's median distance) that counts as far (default: the trainer's)")
    p.add_argument("--worker-momentum", type=float, default=None,
                   help="simulation: peers send a momentum (this beta) of their gradients "
                        "(default: the config's training.worker_momentum, as trainers do)")
    p.add_argument("--timeout", type=float, default=1800.0, help="network mode: seconds to wait for the trainers")
    p.add_argument("--threads", type=int, default=1,
                   help="torch CPU threads (default 1: on a busy 2-core machine 2 threads ran ~20x slower)")
    p.add_argument("--clean-cache", type=Path, default=None, help="JSON file that stores clean runs for reuse")
    p.add_argument("--keep-logs", type=Path, default=None, help="network mode: keep every peer's log under this folder")
    p.add_argument("--repeat", type=int, default=1, help="independent repetitions (seeds --seed, --seed+1, ...): median and max ratio")
    args = p.parse_args(argv)
    try:
        settings = RobustnessSettings(
            peers=args.peers, byzantine=args.byzantine, attack=parse_attack(args.attack), aggregator=args.aggregator,
            steps=args.steps, simulate=args.simulate, config=args.config, tau=args.tau, absolute_tau=args.absolute_tau,
            trim_ratio=args.trim_ratio,
            max_weight=args.max_weight, seed=args.seed, batch_size=args.batch_size, seq_len=args.seq_len,
            part_size=args.part_size, eval_batches=args.eval_batches, eval_batch_size=args.eval_batch_size,
            bans=args.bans, min_observations=args.min_observations,
            ban_distance_ratio=args.ban_distance_ratio,
            worker_momentum=(  # network peers take training.worker_momentum from the config themselves
                (load_config(args.config).training.worker_momentum if args.simulate else 0.0)
                if args.worker_momentum is None
                else args.worker_momentum
            ),
            timeout=args.timeout,
        )  # fmt: skip
        settings.averaging(load_config(settings.config))  # bad tau / trim ratio: report now, not after a run
    except ValueError as e:
        p.error(str(e))
    if args.threads < 1:
        p.error(f"--threads must be >= 1, got {args.threads}")
    torch.set_num_threads(args.threads)
    if args.keep_logs is not None:
        args.keep_logs.mkdir(parents=True, exist_ok=True)
    if args.repeat < 1:
        p.error(f"--repeat must be >= 1, got {args.repeat}")
    return settings, args.clean_cache, args.keep_logs, args.repeat


def main(argv: list[str] | None = None) -> None:
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    # one "rejected part" line per attacker per step is expected here, not news
    logging.getLogger("dragon_swarm.averaging.robust_reducer").setLevel(logging.ERROR)
    # nor is a ban line per attacker (the report lists who was banned)
    logging.getLogger("dragon_swarm.averaging.reputation").setLevel(logging.ERROR)
    stop_peers_on_sigterm()
    settings, clean_cache, keep_logs, repeat = parse_args(argv)
    if repeat == 1:
        print(json.dumps(run(settings, clean_cache, keep_logs)))
        return
    # independent repetitions: seeds S, S+1, ... (model init, data, attackers); each with its own clean run
    reports = [run(dataclasses.replace(settings, seed=settings.seed + k), clean_cache, keep_logs) for k in range(repeat)]
    ratios = [r["ratio"] for r in reports]
    finite = [x for x in ratios if x is not None]
    print(json.dumps({
        "benchmark": "robustness", "repeat": repeat, "settings": settings.to_json(), "ratios": ratios,
        "median_ratio": statistics.median(finite) if finite else None, "max_ratio": max(finite) if finite else None,
        "diverged_or_failed": sum(1 for x in ratios if x is None), "runs": reports,
    }))  # fmt: skip


if __name__ == "__main__":
    main()
