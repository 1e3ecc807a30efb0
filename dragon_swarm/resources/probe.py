"""Measured training steps and the batch-size search behind `--batch-size auto`.

The search never estimates memory from a formula: it runs real training steps and measures their peak, because
activation memory of a recurrent MoE model (cycles, routing, the tied head's logits) is easy to get wrong by a
factor of two on paper. `choose_batch_size` is the pure search over a measure function and is tested
exhaustively; `measure_step_memory` measures one step on the real machine (forked on CPU).

Call these before starting any DHT or averager threads: forking a process with live threads is only safe for
code that touches no lock those threads may hold.
"""

from __future__ import annotations

import ctypes
import gc
import json
import logging
import os
import select
import signal
import time
import traceback
from typing import TYPE_CHECKING, Callable

import torch

from dragon_swarm.resources.memory import format_bytes, is_cuda, resolve_device

if TYPE_CHECKING:
    from dragon_swarm.config import SwarmConfig

logger = logging.getLogger(__name__)


class StepDidNotFit(RuntimeError):
    """A measured training step ran out of memory (an exception or the kernel's OOM killer)."""


class StepTimedOut(RuntimeError):
    """A measured training step did not finish within its timeout; the child process was killed."""


def measure_step_memory(
    make_step: Callable[[int], None], batch_size: int, device: str, timeout: float = 600.0
) -> int:
    """Peak extra bytes used while `make_step(batch_size)` runs, measured, not estimated.

    Everything `make_step` allocates counts, so it should build what a trainer holds (model, optimizer)
    as well as run the step.

    CUDA: runs in this process; the peak of memory *reserved* by torch's caching allocator above what was
    reserved before the call. Reserved (not allocated) memory is what `set_per_process_memory_fraction`
    limits, and it includes the allocator's fragmentation.
    CPU: runs in a forked child, so a step that exhausts memory kills the child and not this process, and
    nothing the step allocates outlives it. The child resets its peak-RSS counter (/proc/self/clear_refs),
    runs the step with one torch thread (the parent's thread pools do not survive fork) and reports
    VmHWM minus its RSS before the step, less the file-backed pages (library code) the step faulted in.
    Lazy work the parent has not done yet (torch imports torch._dynamo at the first optimizer step: tens
    of MiB, seconds) happens in every child and counts; warm up in the parent first to leave it out, as
    `auto_batch_size` does. Call it before starting threads that hold locks the step may need (DHT,
    averagers): only the forking thread exists in the child.

    Raises StepDidNotFit if the step ran out of memory (CUDA/CPU allocator error, MemoryError, or the
    child was SIGKILLed, which on Linux is the OOM killer's signature); StepTimedOut if the CPU child ran
    longer than `timeout` seconds (it is killed). Any other failure is a bug, not a memory verdict: on
    CPU it raises RuntimeError carrying the child's traceback, on CUDA the step's own exception propagates.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    device = resolve_device(device)
    if is_cuda(device):
        return _measure_cuda(make_step, batch_size, torch.device(device))
    return _measure_forked(make_step, batch_size, timeout)


def _measure_cuda(make_step: Callable[[int], None], batch_size: int, device: torch.device) -> int:
    gc.collect()
    torch.cuda.synchronize(device)
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats(device)
    before = torch.cuda.memory_reserved(device)
    try:
        make_step(batch_size)
        torch.cuda.synchronize(device)
    except torch.cuda.OutOfMemoryError as e:
        raise StepDidNotFit(f"batch {batch_size}: CUDA out of memory: {str(e).splitlines()[0]}") from None
    finally:
        gc.collect()
        torch.cuda.empty_cache()  # hand the step's blocks back so the next measurement starts clean
    return max(0, torch.cuda.max_memory_reserved(device) - before)


def _read_status_kib(*fields: str) -> dict[str, int]:
    """Fields of /proc/self/status in KiB; a field this kernel does not report reads as 0."""
    values = dict.fromkeys(fields, 0)
    with open("/proc/self/status") as f:
        for line in f:
            name, _, rest = line.partition(":")
            if name in values:
                values[name] = int(rest.split()[0])
    return values


def _is_oom_error(e: BaseException) -> bool:
    if isinstance(e, MemoryError):
        return True
    text = str(e).lower()
    return isinstance(e, RuntimeError) and ("can't allocate memory" in text or "out of memory" in text)


def _child_measure(make_step: Callable[[int], None], batch_size: int) -> dict:
    # Only one thread survives fork: torch's intra-op pool would wait forever for workers that are gone.
    torch.set_num_threads(1)
    try:
        # Return the parent's free heap to the OS, so the step's allocations show up as new RSS instead
        # of silently reusing pages the parent freed earlier.
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # resets VmHWM to the current RSS
    except OSError:
        # Linux sets a forked child's VmHWM to its RSS at fork, so without the reset the number is only
        # inflated by what this function touched before the step.
        pass
    before = _read_status_kib("VmRSS", "RssFile", "RssShmem")
    make_step(batch_size)
    after = _read_status_kib("VmHWM", "RssFile", "RssShmem")
    # VmHWM counts file-backed pages too: the first step faults in tens of MiB of torch's library code,
    # which is shared, reclaimable page cache rather than memory the step needs. Those pages stay mapped,
    # so their growth by the end of the step is taken off the peak.
    file_growth = (after["RssFile"] + after["RssShmem"]) - (before["RssFile"] + before["RssShmem"])
    extra_kib = after["VmHWM"] - before["VmRSS"] - max(0, file_growth)
    return {"ok": True, "bytes": max(0, extra_kib) * 1024}


def _measure_forked(make_step: Callable[[int], None], batch_size: int, timeout: float) -> int:
    read_fd, write_fd = os.pipe()
    pid = os.fork()
    if pid == 0:  # child: must end in os._exit whatever happens, never return into the caller's code
        try:
            os.close(read_fd)
            try:
                message = _child_measure(make_step, batch_size)
            except BaseException as e:  # noqa: BLE001 - every failure is reported to the parent
                message = {"ok": False, "oom": _is_oom_error(e), "error": traceback.format_exc(limit=8)}
            data = json.dumps(message).encode()
            while data:
                data = data[os.write(write_fd, data) :]
            os.close(write_fd)
        finally:
            os._exit(0)

    os.close(write_fd)
    chunks: list[bytes] = []
    deadline = time.monotonic() + timeout
    timed_out = False
    try:
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                timed_out = True
                break
            ready, _, _ = select.select([read_fd], [], [], left)
            if not ready:
                continue
            chunk = os.read(read_fd, 65536)
            if not chunk:
                break  # EOF: the child wrote its answer or died
            chunks.append(chunk)
    finally:
        os.close(read_fd)
        if timed_out:
            os.kill(pid, signal.SIGKILL)
        _, status = os.waitpid(pid, 0)

    if timed_out:
        raise StepTimedOut(f"batch {batch_size}: the measured step took over {timeout:.0f} s; child {pid} killed")
    if os.WIFSIGNALED(status):
        sig = os.WTERMSIG(status)
        if sig == signal.SIGKILL:
            raise StepDidNotFit(f"batch {batch_size}: the measuring child was killed (SIGKILL, most likely the OOM killer)")
        raise RuntimeError(f"batch {batch_size}: the measuring child died of signal {signal.Signals(sig).name}")
    try:
        message = json.loads(b"".join(chunks).decode())
    except ValueError:
        raise RuntimeError(f"batch {batch_size}: the measuring child exited (status {status}) without an answer") from None
    if message.get("ok"):
        return int(message["bytes"])
    if message.get("oom"):
        raise StepDidNotFit(f"batch {batch_size}: out of memory in the measured step:\n{message['error']}")
    raise RuntimeError(f"batch {batch_size}: the measured step failed:\n{message['error']}")




def choose_batch_size(
    measure: Callable[[int], int | None], cap_bytes: int, max_batch: int = 256, min_batch: int = 1
) -> tuple[int, dict[int, int | None]]:
    """Largest micro-batch in [min_batch, max_batch] whose measured memory is <= `cap_bytes`.

    `measure(b)` returns the bytes a step at batch b needs, or None if it failed (out of memory): None
    never fits. Memory is assumed to grow with the batch size. Search: double from `min_batch` while the
    size fits (the last step clamped to `max_batch`), then bisect between the last size that fitted and
    the first that did not, so the answer's next size up has always been measured not to fit (unless the
    answer is `max_batch`). Costs about 2*log2(answer) measurements.

    Returns (batch size, {batch size: measured bytes or None} for every size measured). Raises ValueError
    if even `min_batch` does not fit (the message gives the cap and the measured need), or for bad bounds.
    """
    if min_batch < 1 or max_batch < min_batch:
        raise ValueError(f"need 1 <= min_batch <= max_batch, got min_batch={min_batch}, max_batch={max_batch}")
    if cap_bytes <= 0:
        raise ValueError(f"memory cap must be positive, got {cap_bytes}")
    measurements: dict[int, int | None] = {}

    def fits(batch: int) -> bool:
        if batch not in measurements:
            measurements[batch] = measure(batch)
        need = measurements[batch]
        return need is not None and need <= cap_bytes

    if not fits(min_batch):
        need = measurements[min_batch]
        what = "failed (out of memory)" if need is None else f"needs {format_bytes(need)} ({need} bytes)"
        raise ValueError(
            f"even micro-batch {min_batch} does not fit: it {what}, the cap is {format_bytes(cap_bytes)} "
            f"({cap_bytes} bytes); raise the memory limit or use a smaller model"
        )
    good, bad = min_batch, None
    while good < max_batch:
        candidate = min(good * 2, max_batch)
        if fits(candidate):
            good = candidate
        else:
            bad = candidate
            break
    if bad is not None:
        while bad - good > 1:
            middle = (good + bad) // 2
            if fits(middle):
                good = middle
            else:
                bad = middle
    return good, measurements


def auto_batch_size(
    config: SwarmConfig, cap_bytes: int, device: str, max_batch: int = 256, step_timeout: float = 600.0
) -> tuple[int, dict[int, int | None]]:
    """Largest micro-batch whose measured training step fits in `cap_bytes` on `device`.

    Each probe builds what a trainer holds at its peak (HRMSMoE with every expert local, AdamW over the
    trunk, gradients kept between steps) and runs two steps on random tokens of `config.model.seq_len`:
    the second step runs forward and backward while the first step's AdamW state exists, which is the
    steady-state peak. Model and optimizer memory count toward the measurement on purpose.

    `cap_bytes` is the budget for that training state; the process's fixed overhead (interpreter,
    libraries, DHT daemons, corpus) is not measured, so subtract it first if the cap is for the whole
    peer. Not counted either: hivemind.Optimizer's own buffers (gradient accumulators, averaging copies),
    roughly two more trunk-sized tensors. On CPU each probe forks a child (see `measure_step_memory`);
    probes that run out of memory or exceed `step_timeout` seconds count as not fitting.
    Returns (batch size, measurements in bytes by batch size; None where the probe did not fit).
    Raises ValueError if even batch 1 does not fit.
    """
    device = resolve_device(device)
    started = time.perf_counter()
    _warm_up(config, device)

    def measure(batch: int) -> int | None:
        t0 = time.perf_counter()
        try:
            need = measure_step_memory(_trainer_step(config, device), batch, device, timeout=step_timeout)
        except (StepDidNotFit, StepTimedOut) as e:
            logger.info(f"Batch {batch}: does not fit ({str(e).splitlines()[0]})")
            return None
        fit = "fits" if need <= cap_bytes else "over"
        logger.info(f"Batch {batch}: {format_bytes(need)} ({fit} the {format_bytes(cap_bytes)} cap), {time.perf_counter() - t0:.1f} s")
        return need

    batch, measurements = choose_batch_size(measure, cap_bytes, max_batch=max_batch)
    logger.info(
        f"Micro-batch {batch} chosen for a {format_bytes(cap_bytes)} cap on {device} "
        f"after {len(measurements)} probes in {time.perf_counter() - started:.1f} s"
    )
    return batch, measurements


def _warm_up(config: SwarmConfig, device: str) -> None:
    """Run the trainer step once, here, on a miniature of the model (a few KiB of weights).

    The first optimizer step imports torch._dynamo and friends (~800 modules, seconds of CPU). Done in
    this process, every forked probe inherits them: probes get ~2 s faster each, and the measurement
    excludes this fixed, batch-independent cost like the rest of the process's overhead.
    """
    m = config.model
    tiny = m.replace(vocab_size=32, seq_len=min(m.seq_len, 4), d_model=2 * m.n_heads, expert_hidden=4, h_layers=1, l_layers=1)
    _trainer_step(config.replace(model=tiny), device)(1)


def _trainer_step(config: SwarmConfig, device: str) -> Callable[[int], None]:
    """What a trainer holds and does at its peak, as a function of the micro-batch: the model with every expert
    local, the trainer's AdamW over the trunk (`training.optim.make_adamw`), two steps with gradients kept."""
    from dragon_swarm.model import HRMSMoE, LocalExperts
    from dragon_swarm.training.optim import make_adamw

    m, t = config.model, config.training

    def step(batch: int) -> None:
        torch.manual_seed(config.swarm.seed)
        model = HRMSMoE(m, LocalExperts.from_config(m)).to(device)
        trunk = list(model.trunk_parameters())
        optimizer = make_adamw(model.named_trunk_parameters(), lr=t.lr, betas=t.betas, weight_decay=t.weight_decay)
        for _ in range(2):
            tokens = torch.randint(0, m.vocab_size, (batch, m.seq_len), device=device)
            targets = torch.randint(0, m.vocab_size, (batch, m.seq_len), device=device)
            loss, _, _ = model.compute_loss(tokens, targets)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(trunk, t.clip_grad_norm)
            optimizer.step()
            # keep the gradient buffers, as an accumulating trainer does, so the next step's peak includes them
            optimizer.zero_grad(set_to_none=False)

    return step
