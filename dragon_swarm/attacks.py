"""Byzantine attacks on gradient averaging. TEST/BENCHMARK ONLY.

Nothing in the production path imports this module on its own: a trainer turns Byzantine only when a test or a
benchmark injects :class:`ByzantineContribution` (the hidden ``--attack NAME`` flag of the peer selects it for
real-network benchmarks: it replaces the trainer's ``HonestContribution``, no branch in the training loop), and
``benchmarks.robustness`` uses it to measure how much each aggregator loses to each attack. Attacks are named
modes (:class:`Attack`), never free-form callables, so a test or a benchmark says exactly which one it runs.

The attacks (``n`` peers in an all-reduce group, ``f`` of them Byzantine, ``g`` the attacker's own honest gradient,
``μ`` and ``σ`` the coordinate-wise mean and standard deviation of the honest gradients):

=================== ==================================================================================================
``sign_flip``       ``-1000 · g`` (BTARD's sign flipper, Gorbunov et al. 2022)
``noise``           ``g + N(0, s²)`` with ``s = 100 · RMS(g)``: a huge random vector
``alie``            "A little is enough" (Baruch et al. 2019): ``μ - z·σ`` with ``z = Φ⁻¹((n - s) / n)``,
                    ``s = ⌊n/2 + 1⌋ - f``: every coordinate stays within the honest spread, so coordinate-wise and
                    distance-based filters keep it, while all attackers pull the same way
``ipm``             inner-product manipulation (Xie et al. 2020): ``-ε · μ`` with ``ε = 0.1``, the value used in
                    Xie et al.'s experiments against median/Krum and by Karimireddy et al. 2021 (CenteredClip);
                    small enough to look honest, it makes the aggregate's inner product with ``μ`` shrink
``label_shuffle``   a data-level attack: the attacker trains on targets permuted by :func:`corrupt_targets` and sends
                    that real gradient unchanged
``constant``        one fixed random direction of norm ``1000 · ‖honest gradient‖``, the same for every attacker at
                    every step (its seed is a module constant), as BTARD's constant-direction attacker
``inflated_weight`` an honest-sized but sign-flipped gradient ``-g`` that claims ``1000 ×`` the honest weight (sample
                    count), to own a weighted mean
``nan``             all NaN: must be rejected by validation before any aggregator sees it
``other_batch``     an honest gradient (clipped, with worker momentum) of a batch other than the one the step
                    number names: it looks exactly like an honest vector, so no distance rule can catch it;
                    verification by recomputation (``dragon_swarm.verification``) does
``false_evidence``  honest gradients, but every round it recomputes for verification it reports as a lie and
                    publishes evidence against the (honest) sender: the others must refute it and ban it
``off_start``       local-expert mode, honest in what it sends: it starts its first outer round from weights nobody
                    else holds (as a trainer whose round failed or came back partial would), so the round-start
                    digests at the next barrier tell it apart and it must take the swarm's state
=================== ==================================================================================================

Where the honest statistics come from: ALIE, IPM and ``constant``'s scale need the honest gradients. In the
simulation (``benchmarks.robustness --simulate``) the attacker is omniscient, as in the papers: it is handed the
stack of this step's honest gradients. On a real network it cannot see them, so the caller passes an *estimate*:
a stack of the attacker's own recent honest gradients (the trainer keeps the last 8). Their mean approximates
``μ`` and their spread over time stands in for the spread across peers; this is weaker than the omniscient attack
(time-to-time spread of one peer differs from peer-to-peer spread in one step), which the benchmark's simulated
numbers therefore bound from above. With no estimate at all (``None``) the own gradient is the only sample and
``σ = 0``.

Every function here is pure: the only state is the ``torch.Generator`` the caller owns. Colluding attackers
that seed their generators alike (the trainer seeds with the swarm seed) draw the same noise and permutations.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from enum import Enum
from statistics import NormalDist

import torch

__all__ = [
    "Attack",
    "ByzantineContribution",
    "ExpertAttack",
    "ExpertTamper",
    "GRAD_SCALE",
    "OUTPUT_SCALE",
    "CONSTANT_DIRECTION_SEED",
    "CONSTANT_SCALE",
    "INFLATED_WEIGHT_FACTOR",
    "IPM_EPSILON",
    "NOISE_SCALE",
    "SIGN_FLIP_SCALE",
    "alie_z",
    "byzantine_gradient",
    "claimed_weight",
    "corrupt_targets",
    "parse_attack",
    "parse_expert_attack",
]

logger = logging.getLogger(__name__)

SIGN_FLIP_SCALE = 1000.0  # sign_flip sends -SIGN_FLIP_SCALE * g
NOISE_SCALE = 100.0  # noise std, in units of the own gradient's RMS
IPM_EPSILON = 0.1  # ipm sends -IPM_EPSILON * mean of the honest gradients
CONSTANT_SCALE = 1000.0  # constant's norm, in units of the honest gradients' RMS norm
CONSTANT_DIRECTION_SEED = 0x5EED_BAD  # fixed, so every attacker (and every step) sends the same direction
INFLATED_WEIGHT_FACTOR = 1000.0  # inflated_weight claims this many times the honest weight
OTHER_BATCH_OFFSET = 1_000_003  # other_batch trains on micro-batch step + this instead of step


OFF_START_SHIFT = 1e-3  # `off_start`: added to every value of its first round's start

class Attack(str, Enum):
    """A Byzantine behaviour, by name (the value is what ``--attack`` takes)."""

    SIGN_FLIP = "sign_flip"
    NOISE = "noise"
    ALIE = "alie"
    IPM = "ipm"
    LABEL_SHUFFLE = "label_shuffle"
    CONSTANT = "constant"
    INFLATED_WEIGHT = "inflated_weight"
    NAN = "nan"
    OTHER_BATCH = "other_batch"
    FALSE_EVIDENCE = "false_evidence"
    OFF_START = "off_start"


def parse_attack(name: str | Attack) -> Attack:
    """The attack called ``name`` (case and surrounding spaces ignored, ``-`` accepted for ``_``).

    :raises ValueError: naming the valid attacks, if there is no such attack
    """
    if isinstance(name, Attack):
        return name
    if isinstance(name, str):
        key = name.strip().lower().replace("-", "_")
        for attack in Attack:
            if attack.value == key:
                return attack
    valid = ", ".join(attack.value for attack in Attack)
    raise ValueError(f"unknown attack {name!r}; valid attacks: {valid}")


def alie_z(num_peers: int, num_byzantine: int) -> float:
    """Baruch et al. 2019, z_max: the largest shift (in honest standard deviations) that still keeps the
    attackers' value inside the majority a coordinate-wise filter accepts.

    ``s = ⌊n/2 + 1⌋ - f`` honest peers must be "recruited" to the attackers' side of the median;
    ``z = Φ⁻¹((n - s) / n)``. ``s`` is clamped to ``[1, n - 1]`` (the paper assumes ``f`` in its useful range)
    and a negative ``z`` to 0. Example: n = 16, f = 7 gives s = 2 and z ≈ 1.15.
    """
    _check_counts(num_peers, num_byzantine)
    s = math.floor(num_peers / 2 + 1) - num_byzantine
    s = min(max(s, 1), num_peers - 1)
    return max(0.0, NormalDist().inv_cdf((num_peers - s) / num_peers))


def byzantine_gradient(
    attack: Attack,
    own_grad: torch.Tensor,
    honest_grads_or_estimate: torch.Tensor | None,
    rng: torch.Generator,
    num_peers: int,
    num_byzantine: int,
) -> torch.Tensor:
    """What a Byzantine peer sends instead of its gradient (see the module docstring for each attack).

    :param own_grad: the attacker's own gradient (any shape; for ``label_shuffle`` already computed on shuffled
      targets). The result has its shape and dtype.
    :param honest_grads_or_estimate: ``[k, *own_grad.shape]`` (or ``[k, own_grad.numel()]``) honest gradients of
      this step (simulation) or the attacker's own recent gradients (real network), or None to use ``own_grad``
      alone. Used by ``alie``, ``ipm`` and ``constant``.
    :param rng: the attacker's generator (``noise`` draws from it)
    :param num_peers: ``n``, peers in the averaging group, attackers included (``alie``'s z)
    :param num_byzantine: ``f``, attackers among them (``alie``'s z)
    """
    attack = parse_attack(attack)
    _check_counts(num_peers, num_byzantine)
    g = own_grad.detach().reshape(-1).to(torch.float32)
    if attack is Attack.SIGN_FLIP:
        bad = -SIGN_FLIP_SCALE * g
    elif attack is Attack.NOISE:
        std = NOISE_SCALE * _rms(g)
        bad = g + std * torch.randn(g.shape, generator=rng, dtype=torch.float32)
    elif attack is Attack.ALIE:
        honest = _honest_stack(honest_grads_or_estimate, g)
        std = honest.std(dim=0, correction=1) if honest.shape[0] > 1 else torch.zeros_like(g)
        bad = honest.mean(dim=0) - alie_z(num_peers, num_byzantine) * std
    elif attack is Attack.IPM:
        bad = -IPM_EPSILON * _honest_stack(honest_grads_or_estimate, g).mean(dim=0)
    elif attack is Attack.LABEL_SHUFFLE:
        bad = g.clone()  # the harm is in the targets it trained on
    elif attack is Attack.CONSTANT:
        honest = _honest_stack(honest_grads_or_estimate, g)
        scale = CONSTANT_SCALE * float(torch.linalg.vector_norm(honest, dim=1).pow(2).mean().sqrt())
        direction = torch.randn(g.shape, generator=torch.Generator().manual_seed(CONSTANT_DIRECTION_SEED))
        bad = direction * (scale / float(torch.linalg.vector_norm(direction)))
    elif attack is Attack.INFLATED_WEIGHT:
        bad = -g  # honest-looking norm; the damage comes from claimed_weight
    elif attack is Attack.NAN:
        bad = torch.full_like(g, math.nan)
    elif attack is Attack.OTHER_BATCH:
        bad = g.clone()  # the harm is in the batch it trained on
    elif attack is Attack.FALSE_EVIDENCE:
        bad = g.clone()  # the harm is in what it says of others' rounds
    elif attack is Attack.OFF_START:
        bad = g.clone()  # the fault is in the weights its round starts from
    else:  # pragma: no cover - every member is handled above
        raise AssertionError(f"unhandled attack {attack}")
    return bad.to(own_grad.dtype).reshape(own_grad.shape)


def claimed_weight(attack: Attack, honest_weight: float) -> float:
    """The weight (sample count) an attacker reports: ``INFLATED_WEIGHT_FACTOR ×`` the honest one for
    ``inflated_weight``, the honest weight for every other attack."""
    attack = parse_attack(attack)
    if attack is Attack.INFLATED_WEIGHT:
        return float(honest_weight) * INFLATED_WEIGHT_FACTOR
    return float(honest_weight)


def corrupt_targets(targets: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """``label_shuffle``: the same target tokens in a random order over the whole batch (a new tensor).

    The multiset of tokens is kept (unigram statistics look honest), but each position's target is wrong. A
    permutation that happens to be the identity is replaced by a rotation, so the order always changes when
    there are at least two positions.
    """
    flat = targets.reshape(-1)
    n = flat.numel()
    if n < 2:
        return targets.clone()
    perm = torch.randperm(n, generator=generator, device="cpu")
    if torch.equal(perm, torch.arange(n)):
        perm = torch.roll(perm, 1)
    return flat[perm.to(flat.device)].reshape(targets.shape)


def _check_counts(num_peers: int, num_byzantine: int) -> None:
    if not (isinstance(num_peers, int) and num_peers >= 2):
        raise ValueError(f"num_peers must be an integer >= 2, got {num_peers!r}")
    if not (isinstance(num_byzantine, int) and 0 <= num_byzantine < num_peers):
        raise ValueError(f"num_byzantine must be an integer in [0, num_peers), got {num_byzantine!r}")


def _rms(x: torch.Tensor) -> float:
    return float(torch.linalg.vector_norm(x)) / math.sqrt(max(1, x.numel()))


def _honest_stack(honest: torch.Tensor | None, own: torch.Tensor) -> torch.Tensor:
    """``[k, d]`` float32 honest rows; the own gradient alone when there is no estimate."""
    if honest is None or honest.numel() == 0:
        return own[None, :]
    d = own.numel()
    if honest.numel() % d != 0:
        raise ValueError(
            f"honest gradients ({tuple(honest.shape)}) are not a stack of rows of the own gradient's {d} values"
        )
    return honest.detach().to(torch.float32).reshape(-1, d)


class ByzantineContribution:
    """A trainer's `GradientContribution` (see `dragon_swarm.training.contribution`) that runs `attack` instead
    of contributing honestly. It neither clips nor filters what it sends.

    The attacker does not see honest peers' gradients, so attacks that need their statistics (ALIE, IPM)
    estimate them from this peer's own recent honest gradients. ``other_batch`` and ``false_evidence`` process their
    gradients exactly as an honest trainer does (`clip_grad_norm`, `worker_momentum`): only the batch, or what it
    reports of others' rounds, is wrong.
    """

    HISTORY = 8

    def __init__(self, attack: Attack | str, seed: int, clip_grad_norm: float = 1.0, worker_momentum: float = 0.0):
        from dragon_swarm.training.contribution import HonestContribution

        self.attack = parse_attack(attack)
        self.rng = torch.Generator().manual_seed(seed)  # colluding attackers share the swarm seed
        self.history: list[torch.Tensor] = []
        honest_gradients = self.attack in (Attack.OTHER_BATCH, Attack.FALSE_EVIDENCE, Attack.OFF_START)
        self.honest = HonestContribution(clip_grad_norm, worker_momentum) if honest_gradients else None
        logger.warning(f"BYZANTINE TEST MODE: this trainer runs the '{self.attack.value}' attack")

    def targets(self, targets: torch.Tensor) -> torch.Tensor:
        if self.attack is Attack.LABEL_SHUFFLE:
            return corrupt_targets(targets, self.rng)
        return targets

    def batch_step(self, step: int) -> int:
        return step + OTHER_BATCH_OFFSET if self.attack is Attack.OTHER_BATCH else step

    def report_check(self, verdict):
        """`false_evidence`: every recomputed round is reported as a lie, whatever the recomputation said."""
        if self.attack is not Attack.FALSE_EVIDENCE:
            return verdict
        return dataclasses.replace(verdict, honest=False, relative_error=math.inf, reason="forged by a false_evidence attacker")

    def round_start_shift(self, round_number: int) -> float:
        """`off_start`: how far (per value) its round start is moved before the round (only the first one)."""
        return OFF_START_SHIFT if self.attack is Attack.OFF_START and round_number == 1 else 0.0

    def prepare(self, named_params, loss: torch.Tensor, batch_size: int, num_peers: int) -> int | None:
        if self.honest is not None:
            return self.honest.prepare(named_params, loss, batch_size, num_peers)
        if self.attack is not Attack.LABEL_SHUFFLE:
            self._corrupt_gradients([p for _, p in named_params], num_peers)
        return int(claimed_weight(self.attack, batch_size))

    def _corrupt_gradients(self, params: list[torch.nn.Parameter], num_peers: int) -> None:
        for p in params:  # a parameter without a gradient this step still gets one sent (zeros), as hivemind does
            if p.grad is None:
                p.grad = torch.zeros_like(p)
        flat = torch.cat([p.grad.reshape(-1) for p in params])
        self.history = (self.history + [flat.clone()])[-self.HISTORY :]
        num_peers = max(num_peers, 2)
        bad = byzantine_gradient(self.attack, flat, torch.stack(self.history), self.rng, num_peers, max(1, (num_peers - 1) // 2))
        offset = 0
        for p in params:
            p.grad.copy_(bad[offset : offset + p.numel()].view_as(p.grad))
            offset += p.numel()

    def state_tensors(self) -> dict[str, torch.Tensor]:
        return self.honest.state_tensors() if self.honest is not None else {}

    def load_state_tensors(self, tensors: dict[str, torch.Tensor]) -> None:
        if self.honest is not None:
            self.honest.load_state_tensors(tensors)


# --- the expert path -------------------------------------------------------------------------------------------

OUTPUT_SCALE = 100.0  # scale_outputs returns OUTPUT_SCALE x the real outputs
GRAD_SCALE = 1000.0  # scale_grads sends GRAD_SCALE x the real output gradients


class ExpertAttack(str, Enum):
    """A Byzantine behaviour on the expert path, by name (the value is what ``--expert-attack`` takes).

    Host modes change what its experts answer (forward outputs); trainer modes change the gradients it sends."""

    SCALE_OUTPUTS = "scale_outputs"  # host: OUTPUT_SCALE x the real outputs
    SIGN_FLIP_OUTPUTS = "sign_flip_outputs"  # host: minus the real outputs (honest size: only a cross-check sees it)
    RANDOM_OUTPUTS = "random_outputs"  # host: Gaussian noise of the real outputs' RMS (honest size, no signal)
    SCALE_GRADS = "scale_grads"  # trainer: GRAD_SCALE x the real output gradients

    @property
    def on_host(self) -> bool:
        return self is not ExpertAttack.SCALE_GRADS


def parse_expert_attack(name: str | ExpertAttack) -> ExpertAttack:
    """The expert attack called ``name`` (case, spaces and ``-`` for ``_`` forgiven).

    :raises ValueError: naming the valid modes, if there is no such mode
    """
    if isinstance(name, ExpertAttack):
        return name
    if isinstance(name, str):
        key = name.strip().lower().replace("-", "_")
        for attack in ExpertAttack:
            if attack.value == key:
                return attack
    valid = ", ".join(attack.value for attack in ExpertAttack)
    raise ValueError(f"unknown expert attack {name!r}; valid expert attacks: {valid}")


class ExpertTamper:
    """The `dragon_swarm.moe.backend.ExpertTamper` hook running one `ExpertAttack`: a host mode changes
    `host_outputs`, a trainer mode `sent_grads`; the other hook passes tensors through unchanged."""

    def __init__(self, attack: ExpertAttack | str, seed: int):
        self.attack = parse_expert_attack(attack)
        self.rng = torch.Generator().manual_seed(seed)
        logger.warning(f"BYZANTINE TEST MODE: this peer runs the '{self.attack.value}' expert attack")

    def host_outputs(self, uid: str, outputs: torch.Tensor) -> torch.Tensor:
        if self.attack is ExpertAttack.SCALE_OUTPUTS:
            return outputs * OUTPUT_SCALE
        if self.attack is ExpertAttack.SIGN_FLIP_OUTPUTS:
            return -outputs
        if self.attack is ExpertAttack.RANDOM_OUTPUTS:
            noise = torch.randn(outputs.shape, generator=self.rng, dtype=torch.float32)
            return (noise * _rms(outputs)).to(device=outputs.device, dtype=outputs.dtype)
        return outputs

    def sent_grads(self, uid: str, grads: torch.Tensor) -> torch.Tensor:
        if self.attack is ExpertAttack.SCALE_GRADS:
            return grads * GRAD_SCALE
        return grads
