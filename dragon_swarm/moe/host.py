"""Expert host: serves experts over hivemind's MoE RPC, trains them on every backward, announces them,
checkpoints them in safetensors.

Built from hivemind's pieces (ModuleBackend, ConnectionHandler, Runtime) instead of hivemind's Server,
because the Server announces with `declare_experts` (one host per uid) and checkpoints with torch.save.
"""

from __future__ import annotations

import logging
import threading
import time
from pathlib import Path
from typing import Sequence

import hivemind
import torch
from hivemind.moe.server.connection_handler import ConnectionHandler
from hivemind.moe.server.module_backend import ModuleBackend
from hivemind.moe.server.runtime import Runtime
from hivemind.utils import get_dht_time
from hivemind.utils.tensor_descr import BatchTensorDescriptor

from dragon_swarm.background import PeriodicThread
from dragon_swarm.config import ExpertsSection, TrainingSection
from dragon_swarm.events import EventBus, HostReport
from dragon_swarm.model.expert import ExpertFFN
from dragon_swarm.moe.registry import ExpertHostRecord, declare_hosted_experts
from dragon_swarm.state.checkpoint import CheckpointError, load_module_checkpoint, save_module_checkpoint
from dragon_swarm.training.optim import make_adamw

logger = logging.getLogger(__name__)


class ExpertBackend(ModuleBackend):
    """A ModuleBackend that clips gradients, refuses non-finite updates and counts its optimizer steps."""

    def __init__(self, name: str, module: torch.nn.Module, *, clip_grad_norm: float, **kwargs):
        super().__init__(name, module, **kwargs)
        self.clip_grad_norm = clip_grad_norm
        self.version = 0  # optimizer steps applied
        self.tokens_processed = 0
        self.requests_served = 0  # forward and backward batches run (the runtime may merge concurrent requests)
        self.skipped_updates = 0
        self.lock = threading.Lock()  # the runtime thread updates while the checkpoint thread reads

    def forward(self, *inputs: torch.Tensor):
        outputs = super().forward(*inputs)
        self.tokens_processed += int(inputs[0].shape[0])
        self.requests_served += 1
        return outputs

    def backward(self, *inputs: torch.Tensor):
        grads = super().backward(*inputs)
        self.requests_served += 1
        return grads

    def on_backward(self, batch_size: int) -> None:
        with self.lock:
            grad_norm = torch.nn.utils.clip_grad_norm_(self.module.parameters(), self.clip_grad_norm)
            if not torch.isfinite(grad_norm):
                self.skipped_updates += 1
                logger.warning(f"{self.name}: skipped an update with non-finite gradient norm ({batch_size} tokens)")
                self.optimizer.zero_grad(set_to_none=True)
                return
            super().on_backward(batch_size)
            self.version += 1

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


class RequestError(ValueError):
    """A malformed expert request; the caller gets this message, the host stays up."""


class ValidatingConnectionHandler(ConnectionHandler):
    """Rejects malformed requests before they reach a task pool, where one bad tensor would fail a whole batch
    (and stock hivemind can leave the caller waiting forever)."""

    def __init__(self, dht: hivemind.DHT, module_backends: dict[str, ModuleBackend], *, hidden_dim: int, max_tokens: int):
        super().__init__(dht, module_backends)
        self.hidden_dim, self.max_tokens = hidden_dim, max_tokens

    @classmethod
    def _get_handle_name(cls, namespace, method_name):
        # answer under stock hivemind's protocol names, so stock RemoteExpert clients reach us
        return ConnectionHandler._get_handle_name(namespace, method_name)

    async def _process_inputs(self, inputs, pool, schema):
        expected_count = 2 if pool.name.endswith("_backward") else 1
        check_request_tensors(inputs, expected_count, self.hidden_dim, self.max_tokens)
        return await super()._process_inputs(inputs, pool, schema)


def check_request_tensors(inputs: Sequence[torch.Tensor], expected_count: int, hidden_dim: int, max_tokens: int) -> None:
    """Pure check of one request: count, shape [n, hidden], float dtype, size limit, finite values."""
    if len(inputs) != expected_count:
        raise RequestError(f"expected {expected_count} tensor(s), got {len(inputs)}")
    first_rows = inputs[0].shape[0] if inputs[0].ndim == 2 else None
    for tensor in inputs:
        if tensor.ndim != 2 or tensor.shape[1] != hidden_dim:
            raise RequestError(f"expected shape [tokens, {hidden_dim}], got {list(tensor.shape)}")
        if tensor.shape[0] != first_rows:
            raise RequestError("tensors of one request must have the same number of tokens")
        if not 0 < tensor.shape[0] <= max_tokens:
            raise RequestError(f"request has {tensor.shape[0]} tokens; allowed 1..{max_tokens}")
        if not tensor.is_floating_point():
            raise RequestError(f"expected a floating point tensor, got {tensor.dtype}")
        if not torch.isfinite(tensor).all():
            raise RequestError("request contains NaN or Inf")


def build_expert_backends(
    uids: Sequence[str], d_model: int, expert_hidden: int, training: TrainingSection, max_tokens: int, seed: int
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
            optimizer=optimizer,
            args_schema=(BatchTensorDescriptor(d_model),),
            max_batch_size=max_tokens,
        )
    return backends


def hash_uid(uid: str) -> int:
    import hashlib

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


class ExpertAnnouncer(PeriodicThread):
    """Re-announces the host's experts (online, or offline while paused) before their records expire."""

    def __init__(self, host: "ExpertHost"):
        super().__init__("expert-announcer", host.settings.update_period)
        self.host = host

    def tick(self) -> None:
        self.host.announce("offline" if self.host.paused else "online")


class CheckpointSaver(PeriodicThread):
    """Saves every hosted expert (weights, optimizer state, update count) every `period_s` seconds."""

    def __init__(self, host: "ExpertHost", period_s: float):
        super().__init__("expert-checkpointer", period_s)
        self.host = host

    def tick(self) -> None:
        try:
            self.host.save_checkpoints()
        except OSError as e:
            logger.error(f"Saving expert checkpoints failed: {e}")


class HostReporter(PeriodicThread):
    """Publishes the host's counters as a `HostReport` every few seconds, and once more when stopped, so that
    what was served right before leaving is counted too."""

    def __init__(self, host: "ExpertHost", bus: EventBus, period_s: float = 5.0):
        super().__init__("expert-host-reporter", period_s, final_tick=True)
        self.host, self.bus = host, bus

    def tick(self) -> None:
        self.bus.publish(self.host.report())


class ExpertHost:
    """Owns the runtime, connection handlers, the announcer, checkpoint and report threads of the experts it serves.

    Construct, then `start()`, then `shutdown()`; nothing starts in the constructor. Counters go out as
    `HostReport` events on `bus`.
    """

    def __init__(
        self,
        dht: hivemind.DHT,
        backends: dict[str, ExpertBackend],
        settings: ExpertsSection,
        hidden_dim: int,
        checkpoint_dir: Path | None,
        throughput: float,
        num_handlers: int = 2,
        checkpoint_period: float = 60.0,
        device: str = "cpu",
        bus: EventBus | None = None,
    ):
        self.dht, self.backends, self.settings = dht, backends, settings
        self.checkpoint_dir, self.throughput, self.checkpoint_period = checkpoint_dir, throughput, checkpoint_period
        self.bus = bus if bus is not None else EventBus()
        max_tokens = min(backend.forward_pool.max_batch_size for backend in backends.values())
        self.handlers = [
            ValidatingConnectionHandler(dht, backends, hidden_dim=hidden_dim, max_tokens=max_tokens)
            for _ in range(num_handlers)
        ]
        self.runtime = Runtime(backends, prefetch_batches=1, device=torch.device(device))
        self._paused = threading.Event()
        self._duties: list[PeriodicThread] = []

    @property
    def uids(self) -> list[str]:
        return list(self.backends)

    def load_checkpoints(self) -> int:
        """Resume experts from checkpoint_dir; a corrupt file is reported and the expert starts fresh."""
        if self.checkpoint_dir is None:
            return 0
        loaded = 0
        for uid, backend in self.backends.items():
            path = self.checkpoint_dir / f"{uid}.safetensors"
            if not path.exists():
                continue
            try:
                load_expert(path, backend)
            except (CheckpointError, RuntimeError, KeyError, ValueError) as e:
                logger.error(f"{uid}: checkpoint unusable, starting this expert fresh: {e}")
                continue
            loaded += 1
        if loaded:
            logger.info(f"Resumed {loaded} expert(s) from {self.checkpoint_dir}")
        return loaded

    def save_checkpoints(self) -> None:
        if self.checkpoint_dir is None:
            return
        for uid, backend in self.backends.items():
            save_expert(self.checkpoint_dir / f"{uid}.safetensors", backend)

    def start(self) -> None:
        # handlers are forked processes: fork them before the runtime starts threads, as hivemind's Server does
        for handler in self.handlers:
            handler.run_in_background(await_ready=True, timeout=60)
        self.runtime.start()
        if not self.runtime.ready.wait(timeout=60):
            raise RuntimeError("expert runtime did not start within 60 s")
        for backend in self.backends.values():  # the runtime has moved the modules to their device by now
            move_optimizer_state_to_parameters(backend.optimizer)
        self.announce("online")
        self._duties = [ExpertAnnouncer(self), CheckpointSaver(self, self.checkpoint_period), HostReporter(self, self.bus)]
        for duty in self._duties:
            duty.start()
        logger.info(f"Serving {len(self.backends)} expert(s): {', '.join(self.uids)} ({self.throughput:.0f} tokens/s each)")

    def announce(self, state: str) -> None:
        records = {
            uid: ExpertHostRecord(
                peer_id=self.dht.peer_id.to_base58(), state=state, throughput=float(self.throughput), version=backend.version
            )
            for uid, backend in self.backends.items()
        }
        try:
            declare_hosted_experts(self.dht, records, expiration_time=get_dht_time() + self.settings.expiration)
        except Exception as e:  # a flaky DHT must not kill the host; the next period retries
            logger.warning(f"Announcing experts failed, will retry in {self.settings.update_period:.0f} s: {e}")

    @property
    def paused(self) -> bool:
        return self._paused.is_set()

    def pause(self) -> None:
        """Stop offering the experts (the volunteer pressed Stop): save them and tell routers they are offline.
        Requests already on their way are still answered."""
        if self._paused.is_set():
            return
        self._paused.set()
        self.save_checkpoints()
        self.announce("offline")
        logger.info(f"Paused hosting: {len(self.backends)} expert(s) saved and announced offline")

    def resume(self) -> None:
        if not self._paused.is_set():
            return
        self._paused.clear()
        self.announce("online")
        logger.info(f"Resumed hosting {len(self.backends)} expert(s)")

    def report(self) -> HostReport:
        backends = list(self.backends.values())
        return HostReport(
            experts_served=len(backends),
            tokens_processed=sum(b.tokens_processed for b in backends),
            requests_served=sum(b.requests_served for b in backends),
            updates=sum(b.version for b in backends),
        )

    def stop_reporting(self) -> None:
        """Stop the background duties; the reporter publishes its final `HostReport` on the way out. The owner calls
        this before it publishes the peer's final contribution record."""
        for duty in self._duties:
            duty.stop()

    def shutdown(self) -> None:
        self.stop_reporting()
        self.save_checkpoints()  # first: nothing after this may lose the experts' progress
        if self.dht.is_alive():
            self.announce("offline")
        for handler in self.handlers:
            if handler.is_alive():
                handler.shutdown()
        self.runtime.shutdown()
        self.runtime.join(timeout=10)
        logger.info(f"Expert host stopped; {len(self.backends)} checkpoint(s) saved")
