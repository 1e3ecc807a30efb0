"""One hosted expert: its module, optimizer and counters (`ExpertBackend`), how a fresh replica is built, and
how it is saved to and restored from a safetensors checkpoint."""

from __future__ import annotations

import hashlib
import logging
import statistics
import threading
import time
from collections import deque
from pathlib import Path
from typing import Protocol, Sequence

import torch
from hivemind.moe.server.module_backend import ModuleBackend
from hivemind.moe.server.task_pool import TaskPool
from hivemind.utils.mpfuture import InvalidStateError
from hivemind.utils.tensor_descr import BatchTensorDescriptor

from dragon_swarm.config import TrainingSection
from dragon_swarm.model.expert import ExpertFFN
from dragon_swarm.state.checkpoint import load_module_checkpoint, save_module_checkpoint
from dragon_swarm.training.optim import make_adamw

logger = logging.getLogger(__name__)


class ExpertTamper(Protocol):
    """TEST/BENCHMARK ONLY hook for Byzantine behaviour on the expert path (implemented in dragon_swarm.attacks,
    injected by the hidden `--expert-attack` flag); production passes None and never imports the attacks."""

    def host_outputs(self, uid: str, outputs: torch.Tensor) -> torch.Tensor:
        """What a Byzantine host returns instead of its expert's real outputs."""

    def sent_grads(self, uid: str, grads: torch.Tensor) -> torch.Tensor:
        """What a Byzantine trainer sends an expert instead of the real output gradients."""


class SingleRequestTaskPool(TaskPool):
    """A TaskPool whose batches hold exactly one request.

    Stock hivemind merges concurrent requests of different callers into one batch. For backward that means one
    clipped update for the sum of everyone's gradients, so a caller sending x1000 gradients owns the direction of
    every merged update. One request per batch gives each caller's gradient its own clip and its own step."""

    def iterate_minibatches(self, *args, **kwargs):
        while True:
            task = self.tasks.get()  # blocks: without a merge there is nothing to wait for
            try:
                if task.future.set_running_or_notify_cancel():
                    yield [task]
            except InvalidStateError as e:  # the caller gave up meanwhile
                logger.debug(f"{self.name}: dropped a cancelled request: {e}")


# A backward request whose gradient norm (before clipping, per sqrt(token): an honest request's gradient sums its
# tokens' roughly independent contributions) is this many times the median of the last accepted ones is not stepped:
# clipping bounds its norm, but AdamW normalises step sizes, so a caller sending x1000 gradients would still move
# every weight by a full learning rate per request, its way (seen in CI: an honest replica's outputs grew to 1000x its
# inputs under the scale_grads attack, and trainers rightly refused it). 500: honest requests were seen up to 307x the
# median in CI swarms (gradients grow as training leaves the init); x1000 requests ran at 677x-3078x
GRAD_NORM_OUTLIER = 500.0
GRAD_NORM_WINDOW = 32
GRAD_NORM_WARMUP = 8  # accepted remote requests before their own median is the reference
# a host that also trains waits this long for its own trainer's first call before it steps remote requests it has
# nothing to judge by (its trainer may evaluate or load data first; an expert it never routes to must still train)
OWN_REFERENCE_GRACE_S = 120.0


def grad_norm_reference(recent: Sequence[float], trusted: Sequence[float], warmup: int = GRAD_NORM_WARMUP) -> float | None:
    """What a backward request's norm (per sqrt(token)) is compared with: the median of the recent accepted remote
    requests and this peer's own (trusted) ones once `warmup` remote ones were accepted; before that the median of
    the trusted ones alone (a caller sending x1000 gradients among the first requests would otherwise step unchecked
    and set the median it is later judged by); None when there is nothing to compare with yet."""
    if len(recent) >= warmup:
        return statistics.median([*recent, *trusted])
    if trusted:
        return statistics.median(trusted)
    return None


def is_grad_norm_outlier(norm: float, recent: Sequence[float], factor: float = GRAD_NORM_OUTLIER, warmup: int = GRAD_NORM_WARMUP, trusted: Sequence[float] = ()) -> bool:
    """Whether `norm` is more than `factor` x `grad_norm_reference(recent, trusted, warmup)` (never when it is None)."""
    reference = grad_norm_reference(recent, trusted, warmup)
    return reference is not None and norm > factor * max(reference, 1e-12)


class ExpertBackend(ModuleBackend):
    """A ModuleBackend that clips every request's gradient on its own, refuses non-finite updates and counts its
    optimizer steps."""

    def __init__(
        self, name: str, module: torch.nn.Module, *, clip_grad_norm: float, tamper: "ExpertTamper | None" = None, own_trainer: bool = False, **kwargs
    ):
        optimizer_and_schema = {k: kwargs.pop(k) for k in ("optimizer", "scheduler", "args_schema", "kwargs_schema", "outputs_schema") if k in kwargs}
        super().__init__(name, module, **optimizer_and_schema, **kwargs)
        # kwargs are the TaskPool's (max_batch_size, ...): the backward pool gets the same, but never merges requests
        self.backward_pool = SingleRequestTaskPool(self.backward, name=f"{self.name}_backward", **kwargs)
        self._trusted_call = False  # set while trusted_backward runs (under self.lock)
        self.last_grad_norm = 0.0  # of the latest request, before clipping
        self.clip_grad_norm = clip_grad_norm
        self.tamper = tamper  # TEST/BENCHMARK ONLY: a Byzantine host's output attack (dragon_swarm.attacks)
        self.version = 0  # optimizer steps applied
        self.tokens_processed = 0
        self.requests_served = 0  # forward and backward batches run (the runtime may merge concurrent requests)
        self.skipped_updates = 0
        self.refused_updates = 0  # backward requests far above the recent gradient norms (is_grad_norm_outlier)
        self._recent_grad_norms: deque[float] = deque(maxlen=GRAD_NORM_WINDOW)
        self._trusted_grad_norms: deque[float] = deque(maxlen=GRAD_NORM_WINDOW)
        # own_trainer: this peer also trains and calls its own copy (trusted); until its first call (at most
        # OWN_REFERENCE_GRACE_S), remote requests with nothing to be judged by are not stepped: one unchecked x1000
        # request biases AdamW's moments for tens of steps (an honest replica was banned for it in a CI run)
        self._own_reference_until = time.monotonic() + OWN_REFERENCE_GRACE_S if own_trainer else 0.0
        self.unreferenced_refusals = 0
        # held by the runtime for a whole backward (forward recomputed, gradients, step) and by whoever reads or
        # replaces the state (checkpoints, downloads, replica sync): an in-place change of the weights between the
        # recomputed forward and its autograd would fail the request. Reentrant: on_backward runs inside backward.
        self.lock = threading.RLock()

    def forward(self, *inputs: torch.Tensor):
        with self.lock:  # never from half-replaced weights
            outputs = super().forward(*inputs)
        if self.tamper is not None:
            outputs = type(outputs)(self.tamper.host_outputs(self.name, out) for out in outputs)
        self.tokens_processed += int(inputs[0].shape[0])
        self.requests_served += 1
        return outputs

    def backward(self, *inputs: torch.Tensor):
        with self.lock:
            grads = super().backward(*inputs)
        self.requests_served += 1
        return grads

    def trusted_backward(self, *inputs: torch.Tensor):
        """`backward` for this peer's own trainer (the router calls it directly for its own copy, in-process, never
        through a pool): never refused, and the reference remote requests are judged by before enough of them were
        seen."""
        device = next(self.module.parameters()).device  # where the runtime put the expert
        with self.lock:
            self._trusted_call = True
            try:
                grads = self.backward(*(t.to(device) for t in inputs))
            finally:
                self._trusted_call = False
        return tuple(g.cpu() for g in grads)  # as the pool path gives them back

    def on_backward(self, batch_size: int, caller_trusted: bool = False) -> None:
        """Clip and step. caller_trusted: this peer's own update (local-expert training, or a call that came through
        `trusted_backward`), not a remote request: never refused, and a reference for the remote ones."""
        with self.lock:
            caller_trusted = caller_trusted or self._trusted_call
            grad_norm = torch.nn.utils.clip_grad_norm_(self.module.parameters(), self.clip_grad_norm)
            self.last_grad_norm = float(grad_norm)
            if not torch.isfinite(grad_norm):
                self.skipped_updates += 1
                logger.warning(f"{self.name}: skipped an update with non-finite gradient norm ({batch_size} tokens)")
                self.optimizer.zero_grad(set_to_none=True)
                return
            per_token = self.last_grad_norm / max(batch_size, 1) ** 0.5
            if not caller_trusted and self._awaits_own_reference():
                self.unreferenced_refusals += 1
                if self.unreferenced_refusals == 1:
                    logger.info(f"{self.name}: not stepping remote requests until this peer's own trainer has called it (nothing to judge them by yet)")
                self.optimizer.zero_grad(set_to_none=True)
                return
            if not caller_trusted and is_grad_norm_outlier(per_token, self._recent_grad_norms, trusted=self._trusted_grad_norms):
                self.refused_updates += 1
                if self.refused_updates == 1 or self.refused_updates % 100 == 0:
                    reference = grad_norm_reference(self._recent_grad_norms, self._trusted_grad_norms) or 0.0
                    logger.warning(
                        f"{self.name}: refused an update with gradient norm {self.last_grad_norm:.3g} over {batch_size} "
                        f"token(s), {per_token / max(reference, 1e-12):.0f}x the median of {len(self._recent_grad_norms)} recent "
                        f"remote and {len(self._trusted_grad_norms)} own requests per sqrt(token) ({self.refused_updates} refused so far)"
                    )
                self.optimizer.zero_grad(set_to_none=True)
                return
            (self._trusted_grad_norms if caller_trusted else self._recent_grad_norms).append(per_token)
            super().on_backward(batch_size)
            self.version += 1

    def _awaits_own_reference(self) -> bool:
        return (
            not self._trusted_grad_norms
            and len(self._recent_grad_norms) < GRAD_NORM_WARMUP
            and time.monotonic() < self._own_reference_until
        )

    def snapshot(self) -> tuple[dict[str, torch.Tensor], dict, dict]:
        with self.lock:
            module_state = {k: v.detach().clone() for k, v in self.module.state_dict().items()}
            optimizer_state = _clone_state(self.optimizer.state_dict())
            info = {"uid": self.name, "version": self.version, "tokens_processed": self.tokens_processed}
        return module_state, optimizer_state, info


def _clone_state(state: dict) -> dict:
    return {
        "state": {i: {k: (v.clone() if isinstance(v, torch.Tensor) else v) for k, v in s.items()} for i, s in state["state"].items()},
        "param_groups": [dict(g) for g in state["param_groups"]],
    }


def build_expert_backends(
    uids: Sequence[str],
    d_model: int,
    expert_hidden: int,
    training: TrainingSection,
    max_tokens: int,
    seed: int,
    tamper: "ExpertTamper | None" = None,
    own_trainer: bool = False,
) -> dict[str, ExpertBackend]:
    backends = {}
    for uid in uids:
        # every fresh replica of a uid starts from the same weights, whoever creates it
        generator_seed = seed ^ (hash_uid(uid) & 0x7FFFFFFF)
        with torch.random.fork_rng():
            torch.manual_seed(generator_seed)
            module = ExpertFFN(d_model, expert_hidden)
        optimizer = make_adamw(module.named_parameters(), training.expert_lr, training.betas, training.weight_decay)
        backends[uid] = ExpertBackend(
            uid,
            module,
            clip_grad_norm=training.expert_clip_grad_norm,
            tamper=tamper,
            own_trainer=own_trainer,
            optimizer=optimizer,
            args_schema=(BatchTensorDescriptor(d_model),),
            max_batch_size=max_tokens,
        )
    return backends


def hash_uid(uid: str) -> int:
    return int.from_bytes(hashlib.blake2b(uid.encode(), digest_size=8).digest(), "little")


def measure_throughput(d_model: int, expert_hidden: int, tokens: int = 512, repeats: int = 3) -> float:
    """Tokens/s of one expert forward+backward here; announced so routers and other hosts can balance load."""
    module = ExpertFFN(d_model, expert_hidden)
    x = torch.randn(tokens, d_model, requires_grad=True)
    module(x).sum().backward()  # warm-up
    start = time.perf_counter()
    for _ in range(repeats):
        module(x).sum().backward()
    return tokens * repeats / (time.perf_counter() - start)


def save_expert(path: Path, backend: ExpertBackend) -> None:
    """One expert's weights, optimizer state (moments and step counts) and counters, atomically."""
    module_state, optimizer_state, info = backend.snapshot()
    save_module_checkpoint(path, module_state, optimizer_state, info)


def load_expert(path: Path, backend: ExpertBackend) -> None:
    """Restore what `save_expert` wrote. Raises CheckpointError / RuntimeError / KeyError / ValueError when the
    file is unusable for this expert (the backend may then be partly loaded: start it fresh)."""
    module_state, optimizer_state, info = load_module_checkpoint(path)
    with backend.lock:
        backend.module.load_state_dict(module_state)
        if optimizer_state is not None:
            backend.optimizer.load_state_dict(optimizer_state)  # torch puts it on the parameters' device of now
        backend.version = int(info.get("version", 0))
        backend.tokens_processed = int(info.get("tokens_processed", 0))


def move_optimizer_state_to_parameters(optimizer: torch.optim.Optimizer) -> None:
    """Put each parameter's optimizer state on that parameter's device. A checkpoint is read on the CPU and hivemind's
    Runtime moves the module to its device (a GPU) only when it starts: AdamW's moments would stay behind and its
    first step fail. AdamW's `step` counters stay where torch keeps them (the CPU, unless `capturable`)."""
    for group in optimizer.param_groups:
        for p in group["params"]:
            state = optimizer.state.get(p)
            for key, value in (state or {}).items():
                if key != "step" and isinstance(value, torch.Tensor) and value.device != p.device:
                    state[key] = value.to(p.device)
