"""Memory limits and threads: reading a limit (pure), the machine's total, and applying both to this process.

`parse_memory_limit` is pure and tested exhaustively; absolute sizes are read by pydantic's `ByteSize`.
torch is imported inside the functions that need it, so reading a limit (option parsing) stays cheap.
"""

from __future__ import annotations

import logging
import math
import os
import re
from pathlib import Path

from pydantic import ByteSize, TypeAdapter, ValidationError

logger = logging.getLogger(__name__)

# cgroup v2, then v1: a container's memory limit is what the OOM killer enforces, not the host's RAM
CGROUP_MEMORY_FILES = (
    Path("/sys/fs/cgroup/memory.max"),
    Path("/sys/fs/cgroup/memory/memory.limit_in_bytes"),
)

# a number and a unit, nothing else: ByteSize alone would accept trailing junk ("6GiB!") and read "1e9" as 1 e9
_SIZE_RE = re.compile(r"^(?P<number>\d+(?:\.\d*)?|\.\d+)(?P<unit>[a-z]*)$")
_BYTE_SIZE = TypeAdapter(ByteSize)
_HINT = "use a fraction ('0.5', '50%') or a size ('6GiB', '512MiB', '1.5GB', '800M', '1000000')"


def parse_memory_limit(text: str, total_bytes: int) -> int:
    """A memory limit in bytes, from a fraction of `total_bytes` or an absolute size.

    Accepted spellings (case-insensitive, spaces allowed):
      - fraction of `total_bytes`: "0.5", "50%" (must be in (0, 1], i.e. (0%, 100%]);
        a bare number with a decimal point is a fraction;
      - sizes, read by pydantic's ByteSize: binary "512KiB", "512MiB", "6GiB", "1TiB" (powers of 1024) and
        decimal "800M", "1.5GB", "2G", "3kb", "1T" (powers of 1000);
      - bytes: "1000000", "1000000B" (a bare integer is a byte count).
    Fractional sizes round down to whole bytes. Raises ValueError (one line, meant for the user) for
    anything else, for zero or negative limits, for fractions above 1, and if `total_bytes` is needed
    but not positive. An absolute size is NOT checked against `total_bytes`: asking for more than the
    machine has is the caller's call to reject or warn about.
    """
    if not isinstance(text, str):
        raise ValueError(f"memory limit must be a string such as '50%' or '6GiB', got {text!r}")
    raw = text.strip()
    spelled = raw.lower().replace(" ", "")
    if not spelled:
        raise ValueError(f"empty memory limit: {_HINT}")
    if spelled.startswith("-"):
        raise ValueError(f"memory limit must be positive, got {raw!r}")
    if spelled.endswith("%"):
        return _fraction_of(_parse_number(spelled[:-1], raw) / 100.0, total_bytes, raw)
    match = _SIZE_RE.match(spelled)
    if match is None:
        raise ValueError(f"cannot read memory limit {raw!r}: {_HINT}")
    if match.group("unit") == "" and "." in match.group("number"):
        return _fraction_of(_parse_number(match.group("number"), raw), total_bytes, raw)
    try:
        size = int(_BYTE_SIZE.validate_python(spelled))
    except ValidationError:
        raise ValueError(f"cannot read memory limit {raw!r}: {_HINT}") from None
    if size <= 0:
        raise ValueError(f"memory limit must be positive, got {raw!r}")
    return size


def _parse_number(text: str, raw: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise ValueError(f"cannot read memory limit {raw!r}: {_HINT}") from None
    if not math.isfinite(value):
        raise ValueError(f"cannot read memory limit {raw!r}: {_HINT}")
    return value


def _fraction_of(fraction: float, total_bytes: int, raw: str) -> int:
    if fraction <= 0:
        raise ValueError(f"memory limit must be positive, got {raw!r}")
    if fraction > 1:
        raise ValueError(f"memory limit {raw!r} is more than all of the memory (fractions must be at most 1 or 100%)")
    if total_bytes <= 0:
        raise ValueError(f"cannot take {raw!r} of the memory: total memory unknown ({total_bytes} bytes)")
    size = int(total_bytes * fraction)
    if size <= 0:
        raise ValueError(f"memory limit {raw!r} of {total_bytes} bytes rounds to zero")
    return size


def format_bytes(n: int | float) -> str:
    """Human-readable binary size for logs and error messages: 1536 -> '1.5 KiB'."""
    value = float(n)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(value) < 1024:
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{value:.1f} TiB"


def resolve_device(device: str) -> str:
    """'auto' -> 'cuda' when a GPU is visible, else 'cpu'; any other device string is returned as is."""
    if device == "auto":
        import torch

        return "cuda" if torch.cuda.is_available() else "cpu"
    return device


def is_cuda(device: str) -> bool:
    import torch

    return torch.device(device).type == "cuda"


def total_memory_bytes(device: str) -> int:
    """Memory the device can hold, in bytes.

    CUDA: the GPU's total memory. Otherwise: physical RAM, or the cgroup memory limit of this container
    when that is a number below RAM (the OOM killer acts on the cgroup limit, not on free RAM).
    'auto' is resolved with `resolve_device` first.
    """
    device = resolve_device(device)
    if is_cuda(device):
        import torch

        return int(torch.cuda.get_device_properties(torch.device(device)).total_memory)
    ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    limit = _cgroup_memory_limit()
    if limit is not None and 0 < limit < ram:
        return limit
    return int(ram)


def _cgroup_memory_limit() -> int | None:
    for path in CGROUP_MEMORY_FILES:
        try:
            text = path.read_text().strip()
        except OSError:
            continue
        # "max" (v2) means unlimited; v1 spells unlimited as a huge number, which the caller's min() ignores
        if text.isdigit():
            return int(text)
    return None


def apply_threads(threads: int | None) -> int:
    """Set torch's intra-op threads (and inter-op threads, while that is still allowed); return the count in effect.

    None leaves torch's choice alone. Inter-op threads can be set only once, before any inter-op work
    has run; later calls keep the old inter-op count (logged at DEBUG) since it matters little for
    training. Raises ValueError unless `threads` is None or an int >= 1.
    """
    import torch

    if threads is None:
        return torch.get_num_threads()
    if isinstance(threads, bool) or not isinstance(threads, int) or threads < 1:
        raise ValueError(f"threads must be an integer >= 1, got {threads!r}")
    torch.set_num_threads(threads)
    try:
        torch.set_num_interop_threads(threads)
    except RuntimeError as e:
        logger.debug(f"Inter-op threads left at {torch.get_num_interop_threads()}: {e}")
    in_effect = torch.get_num_threads()
    logger.info(f"Using {in_effect} torch thread(s)")
    return in_effect


def apply_memory_cap(device: str, cap_bytes: int) -> None:
    """Enforce `cap_bytes` where the runtime can.

    CUDA: `torch.cuda.set_per_process_memory_fraction(cap / total)`, so allocations beyond the cap fail
    with an out-of-memory error instead of starving other processes on the GPU.
    CPU: nothing is enforced process-wide. RLIMIT_AS would count virtual address space, and hivemind's
    p2pd (a Go binary reserving large virtual arenas) and torch's mmap'd libraries and files exceed any
    realistic limit without using the memory, so they would fail to start. On CPU the cap is honoured by
    choosing the micro-batch size (`auto_batch_size`) instead.
    """
    if cap_bytes <= 0:
        raise ValueError(f"memory cap must be positive, got {cap_bytes}")
    device = resolve_device(device)
    if is_cuda(device):
        import torch

        total = total_memory_bytes(device)
        fraction = min(1.0, cap_bytes / total)
        torch.cuda.set_per_process_memory_fraction(fraction, torch.device(device))
        logger.info(f"GPU memory capped at {format_bytes(cap_bytes)} ({fraction:.0%} of {format_bytes(total)})")
    else:
        logger.info(f"CPU memory cap {format_bytes(cap_bytes)} is honoured by the batch-size choice, not enforced")
