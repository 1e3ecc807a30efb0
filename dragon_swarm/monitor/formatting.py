"""Value formatting and small drawings shared by the terminal panel and the shutdown summary. Pure functions."""

from __future__ import annotations

import math
import time
from typing import Any

from rich.text import Text

DASH = "—"  # shown for any value the peer does not know yet
SPARK_BLOCKS = "▁▂▃▄▅▆▇█"
BAR_PARTIALS = " ▏▎▍▌▋▊▉"  # eighths of a cell, so a bar of 30 cells still moves every 1/240 of its total


def human_count(value: float | int | None) -> str:
    """`1234567` -> "1.23M": three significant digits, k/M/B/T. Below 1000 the exact number. None -> "—"."""
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return DASH
    sign = "-" if value < 0 else ""
    magnitude = abs(value)
    if magnitude < 1000:
        return f"{sign}{magnitude:.0f}" if isinstance(value, int) or magnitude >= 100 else f"{sign}{magnitude:.1f}"
    for unit, scale in (("k", 1e3), ("M", 1e6), ("B", 1e9), ("T", 1e12)):
        scaled = magnitude / scale
        if scaled < 999.5 or unit == "T":  # 999,999 would round to "1000k": say "1.00M" instead
            digits = 2 if scaled < 9.995 else 1 if scaled < 99.95 else 0
            return f"{sign}{scaled:.{digits}f}{unit}"
    raise AssertionError("unreachable: the last unit always returns")


def human_duration(seconds: float | None) -> str:
    """Uptime as people say it: "45s", "3m 05s", "1h 02m", "2d 03h". None or negative -> "—"."""
    if seconds is None or not math.isfinite(seconds) or seconds < 0:
        return DASH
    total = int(seconds)
    days, rest = divmod(total, 86400)
    hours, rest = divmod(rest, 3600)
    minutes, secs = divmod(rest, 60)
    if days:
        return f"{days}d {hours:02d}h"
    if hours:
        return f"{hours}h {minutes:02d}m"
    if minutes:
        return f"{minutes}m {secs:02d}s"
    return f"{secs}s"


def format_loss(loss: float | None) -> str:
    if loss is None:
        return DASH
    if not math.isfinite(loss):
        return str(loss)  # "nan" / "inf" is exactly what a volunteer should see when training diverges
    return f"{loss:.3f}"


def format_clock(timestamp: float | None) -> str:
    """Wall-clock time of an event in the volunteer's own time zone, HH:MM:SS."""
    if timestamp is None:
        return "--:--:--"
    return time.strftime("%H:%M:%S", time.localtime(timestamp))


def text_or_dash(value: Any) -> str:
    return DASH if value is None or value == "" else str(value)


def progress_bar(completed: float, total: float, width: int) -> Text:
    """A drawn bar ("█████▌░░░░") rather than rich's ProgressBar: it stays readable without colour too."""
    width = max(width, 1)
    fraction = 0.0 if total <= 0 else min(max(completed / total, 0.0), 1.0)
    full, partial = divmod(round(fraction * width * 8), 8)
    done = "█" * full + (BAR_PARTIALS[partial] if partial else "")
    text = Text(no_wrap=True)
    text.append(done, style="green")
    text.append("░" * (width - len(done)), style="grey35")
    return text


def sparkline(values: list[float], width: int, rows: int = 1) -> list[str]:
    """Recent values as `rows` lines of unicode blocks (top line first), `width` cells wide.

    More values than cells are averaged per cell, so the line always spans the whole history that was kept.
    Non-finite values are skipped. A flat series draws a flat line halfway up; no values draw nothing.
    """
    finite = [v for v in values if math.isfinite(v)]
    if not finite or width <= 0 or rows <= 0:
        return []
    if len(finite) > width:  # bucket means: cell i covers values [i*n/width, (i+1)*n/width)
        n = len(finite)
        cells = []
        for i in range(width):
            bucket = finite[i * n // width : (i + 1) * n // width]
            cells.append(sum(bucket) / len(bucket))
    else:
        cells = finite
    low, high = min(cells), max(cells)
    levels = rows * len(SPARK_BLOCKS)
    if high - low < 1e-12:
        heights = [levels // 2 or 1] * len(cells)
    else:  # every cell gets at least one eighth, so the lowest value still shows as ▁ rather than a gap
        heights = [1 + round((v - low) / (high - low) * (levels - 1)) for v in cells]
    lines = []
    for row in reversed(range(rows)):  # row 0 is the bottom line
        line = []
        for h in heights:
            in_row = h - row * len(SPARK_BLOCKS)
            line.append(" " if in_row <= 0 else SPARK_BLOCKS[min(in_row, len(SPARK_BLOCKS)) - 1])
        lines.append("".join(line))
    return lines

