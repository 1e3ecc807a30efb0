"""The live terminal panel a volunteer sees while their peer runs (rich), and the logging that feeds it.

Only `PeerStatus.snapshot()` is read, so the panel shows the same numbers as the web dashboard and
`/metrics`. `render_panel` is a pure function from a snapshot to a rich renderable; `TerminalPanel` only
owns the `rich.live.Live` that redraws it. While the panel is up, plain log lines written to the terminal
would scroll it apart, so `install_panel_logging` reroutes the root logger into the panel's activity log.

Use the panel only on a real terminal (`should_use_panel`); under a pipe, a service manager or
`DRAGON_NO_PANEL=1` the peer keeps its plain log lines, which is what log collectors want.
"""

from __future__ import annotations

import logging
import math
import os
import sys
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, TextIO

from rich.console import Console, ConsoleOptions, Group, RenderableType, RenderResult
from rich.live import Live
from rich.panel import Panel
from rich.table import Table
from rich.text import Text

from dragon_swarm.monitor.status import PeerState, PeerStatus

DASH = "—"  # shown for any value the peer does not know yet
SPARK_BLOCKS = "▁▂▃▄▅▆▇█"
BAR_PARTIALS = " ▏▎▍▌▋▊▉"  # eighths of a cell, so a bar of 30 cells still moves every 1/240 of a step
LEADERBOARD_ROWS = 5
DEFAULT_EVENT_LINES = 10  # when the caller gives no height (a one-off print rather than the live panel)
MIN_EVENT_LINES = 3  # on a short terminal keep some log visible; rich crops the rest
STACK_BELOW_WIDTH = 90  # narrower than this the sections go one under another instead of side by side
SPARK_ROWS = 3  # rows of the loss sparkline: 3 rows x 8 block heights = 24 levels

STATE_STYLES: dict[str, str] = {
    PeerState.IDLE.value: "bold black on grey70",
    PeerState.JOINING.value: "bold black on yellow",
    PeerState.SYNCING.value: "bold black on cyan",
    PeerState.TRAINING.value: "bold black on green",
    PeerState.AVERAGING.value: "bold white on magenta",
    PeerState.HOSTING.value: "bold white on blue",
    PeerState.MONITORING.value: "bold white on dark_blue",
    PeerState.STOPPING.value: "bold white on red",
}
PAUSED_STYLE = "bold black on bright_yellow"
SECTION_HEIGHT = 9  # Model / You / Swarm boxes: 7 rows + borders, equal so the three line up
BOTTOM_HEIGHT = 8  # leaderboard / loss boxes: header + 5 rows + borders

# --- value formatting (pure, shared by the panel and the shutdown summary) ---


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


def _text_or_dash(value: Any) -> str:
    return DASH if value is None or value == "" else str(value)


# --- drawing helpers (pure) ---


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


class _FullWidth:
    """Draws `draw(width)` at render time with the width the enclosing box leaves, so bars and sparklines fill
    their box exactly whatever the terminal width."""

    def __init__(self, draw: Callable[[int], list[Text]]):
        self.draw = draw

    def __rich_console__(self, console: Console, options: ConsoleOptions) -> RenderResult:
        yield from self.draw(options.max_width)


def _kv_table(rows: list[tuple[str, RenderableType | str]]) -> Table:
    table = Table.grid(padding=(0, 1), expand=True)
    table.add_column(style="grey62", no_wrap=True)
    table.add_column(ratio=1, no_wrap=True, overflow="ellipsis")
    for label, value in rows:
        table.add_row(label, value if not isinstance(value, str) else Text(value, style="bold"))
    return table


def _state_badge(state: str | None, paused: bool) -> Text:
    badge = Text()
    label = _text_or_dash(state)
    badge.append(f" {label} ", style=STATE_STYLES.get(label, "bold reverse"))
    if paused:
        badge.append(" ")
        badge.append(" PAUSED ", style=PAUSED_STYLE)
    return badge


# --- sections ---


@dataclass(frozen=True)
class _Sized:
    """A renderable and the number of lines it takes, so the activity log can take exactly the rest."""

    renderable: RenderableType
    height: int


def _title(snapshot: Mapping[str, Any]) -> _Sized:
    left = Text(no_wrap=True, overflow="ellipsis")
    left.append(" dragon-swarm ", style="bold white on grey23")
    left.append("  ")
    left.append(_text_or_dash(snapshot.get("name")), style="bold")
    left.append("  swarm ", style="grey62")
    left.append(_text_or_dash(snapshot.get("swarm")), style="bold cyan")
    peer_id = snapshot.get("peer_id")
    if peer_id:
        left.append("  peer ", style="grey62")
        left.append(peer_id if len(peer_id) <= 16 else f"{peer_id[:8]}…{peer_id[-6:]}", style="grey62")
    if snapshot.get("read_only"):
        left.append("  read-only", style="yellow")
    grid = Table.grid(expand=True)
    grid.add_column(ratio=1, no_wrap=True, overflow="ellipsis")
    grid.add_column(justify="right", no_wrap=True)
    grid.add_row(left, _state_badge(snapshot.get("state"), bool(snapshot.get("paused"))))
    return _Sized(grid, 1)


def _model_section(snapshot: Mapping[str, Any]) -> Panel:
    model = snapshot.get("model") or {}
    done, target = model.get("samples_accumulated"), model.get("target_batch_size")
    if target:
        counts = Text(f"{done or 0}/{target} samples", style="bold")
        counts.append(f"  {min((done or 0) / target, 1.0):.0%}", style="grey62")
        bar = _FullWidth(lambda width: [progress_bar(done or 0, target, width)])
    else:  # the target is unknown until the optimizer reports it: an empty bar rather than one that lies
        counts = Text(DASH)
        bar = _FullWidth(lambda width: [Text("░" * width, style="grey35")])
    rows: list[tuple[str, RenderableType | str]] = [
        ("Model version", _text_or_dash(model.get("global_epoch"))),
        ("Local epoch", _text_or_dash(model.get("local_epoch"))),
        ("", ""),
        ("Next global step", ""),
    ]
    body = Group(_kv_table(rows), bar, counts)
    return Panel(body, title="Model", title_align="left", border_style="cyan", height=SECTION_HEIGHT)


def _you_section(snapshot: Mapping[str, Any]) -> Panel:
    contribution = snapshot.get("contribution") or {}
    training = snapshot.get("training") or {}
    tps = training.get("tokens_per_second")
    rows: list[tuple[str, RenderableType | str]] = [
        ("Steps", human_count(contribution.get("steps"))),
        ("Tokens", human_count(contribution.get("tokens"))),
        ("Expert requests", human_count(contribution.get("expert_requests"))),
        # total uptime across restarts once the contribution record knows it, this run's until then
        ("Uptime", human_duration(contribution.get("uptime_s") or snapshot.get("uptime_s"))),
        ("Badge", _text_or_dash(contribution.get("badge"))),
        ("Loss", format_loss(training.get("loss"))),
        ("Tokens/s", DASH if tps is None else human_count(float(tps))),
    ]
    return Panel(_kv_table(rows), title="You", title_align="left", border_style="green", height=SECTION_HEIGHT)


def _swarm_section(snapshot: Mapping[str, Any]) -> Panel:
    stats = snapshot.get("swarm_stats") or {}
    online, total = stats.get("experts_online"), stats.get("experts_total")
    banned = stats.get("banned_peers")
    rows: list[tuple[str, RenderableType | str]] = [
        ("Peers alive", _text_or_dash(stats.get("peers_alive"))),
        ("Trainers", _text_or_dash(stats.get("trainers"))),
        ("Experts online", f"{_text_or_dash(online)}/{_text_or_dash(total)}"),
        ("Replicas", _text_or_dash(stats.get("replicas"))),
        ("Swarm tokens", human_count(stats.get("swarm_tokens"))),
        # a ban is rare and worth a colour: some peer sent updates the swarm rejected
        ("Banned peers", DASH if banned is None else Text(str(len(banned)), style="bold red" if banned else "bold")),
    ]
    return Panel(_kv_table(rows), title="Swarm", title_align="left", border_style="magenta", height=SECTION_HEIGHT)


def _leaderboard_section(snapshot: Mapping[str, Any]) -> Panel:
    rows = sorted(snapshot.get("leaderboard") or [], key=lambda r: -(r.get("tokens") or 0))[:LEADERBOARD_ROWS]
    table = Table(box=None, expand=True, padding=(0, 1), show_edge=False, header_style="grey62")
    table.add_column("#", justify="right", no_wrap=True)
    table.add_column("Name", ratio=1, no_wrap=True, overflow="ellipsis")
    table.add_column("Tokens", justify="right", no_wrap=True)
    table.add_column("Batches", justify="right", no_wrap=True)
    table.add_column("Requests", justify="right", no_wrap=True)
    table.add_column("Uptime", justify="right", no_wrap=True)
    table.add_column("Badge", no_wrap=True, overflow="ellipsis", max_width=14)
    me = snapshot.get("peer_id")
    for rank, row in enumerate(rows, start=1):
        mine = me is not None and row.get("peer_id") == me
        table.add_row(
            str(rank),
            _text_or_dash(row.get("name")) + (" (you)" if mine else ""),
            human_count(row.get("tokens")),
            human_count(row.get("batches")),
            human_count(row.get("expert_requests")),
            human_duration(row.get("uptime_s")),
            _text_or_dash(row.get("badge")),
            style="bold green" if mine else None,
        )
    body: RenderableType = table if rows else Text("no contributions published yet", style="grey50")
    return Panel(body, title="Leaderboard", title_align="left", border_style="yellow", height=BOTTOM_HEIGHT)


def _loss_section(snapshot: Mapping[str, Any]) -> Panel:
    history = snapshot.get("history") or []
    losses = [float(p["loss"]) for p in history if isinstance(p.get("loss"), (int, float))]
    finite = [v for v in losses if math.isfinite(v)]
    header = Text(no_wrap=True, overflow="ellipsis")
    if finite:
        header.append("last ", style="grey62")
        header.append(format_loss(losses[-1]), style="bold")
        header.append("  min ", style="grey62")
        header.append(format_loss(min(finite)))
        header.append("  max ", style="grey62")
        header.append(format_loss(max(finite)))
        chart: RenderableType = _FullWidth(
            lambda width: [Text(line, style="green", no_wrap=True) for line in sparkline(losses, width, SPARK_ROWS)]
        )
    else:
        header.append("no steps yet", style="grey50")
        chart = Text("\n" * (SPARK_ROWS - 1))  # keep the box's shape while there is nothing to draw
    tps = [float(p["tokens_per_second"]) for p in history if isinstance(p.get("tokens_per_second"), (int, float))]
    footer = Text(no_wrap=True, overflow="ellipsis")
    if tps:
        footer.append("tokens/s ", style="grey62")
        footer.append(human_count(tps[-1]), style="bold")
        footer.append("  avg ", style="grey62")
        footer.append(human_count(sum(tps) / len(tps)))
        footer.append(f"  over {len(history)} steps", style="grey50")
    body = Group(header, chart, footer)
    return Panel(body, title="Loss", title_align="left", border_style="blue", height=BOTTOM_HEIGHT)


def _activity_section(snapshot: Mapping[str, Any], lines: int) -> _Sized:
    events = list(snapshot.get("events") or [])[-lines:] if lines > 0 else []
    table = Table.grid(padding=(0, 1), expand=True)
    table.add_column(style="grey50", no_wrap=True)
    table.add_column(ratio=1, no_wrap=True, overflow="ellipsis")
    for event in events:  # oldest first, so the newest line sits at the bottom, next to where the eye rests
        table.add_row(format_clock(event.get("t")), _text_or_dash(event.get("message")))
    body: RenderableType = table if events else Text("no activity yet", style="grey50")
    shown = max(len(events), 1)
    panel = Panel(body, title="Activity", title_align="left", border_style="grey50", height=shown + 2)
    return _Sized(panel, shown + 2)


def _build(snapshot: Mapping[str, Any], width: int, height: int | None) -> RenderableType:
    title = _title(snapshot)
    # Sections top to bottom, each with a drop rank: on a short terminal the highest ranks go first, so the
    # activity log (at the bottom, where rich would crop) stays visible. 0 = always shown.
    if width >= STACK_BELOW_WIDTH:
        # Three sections side by side, then the leaderboard (wider) next to the loss chart.
        top = Table.grid(padding=(0, 1), expand=True)
        for _ in range(3):
            top.add_column(ratio=1)
        top.add_row(_model_section(snapshot), _you_section(snapshot), _swarm_section(snapshot))
        bottom = Table.grid(padding=(0, 1), expand=True)
        bottom.add_column(ratio=3)
        bottom.add_column(ratio=2)
        bottom.add_row(_leaderboard_section(snapshot), _loss_section(snapshot))
        body = [(_Sized(top, SECTION_HEIGHT), 0), (_Sized(bottom, BOTTOM_HEIGHT), 1)]
    else:
        body = [
            (_Sized(_model_section(snapshot), SECTION_HEIGHT), 0),
            (_Sized(_you_section(snapshot), SECTION_HEIGHT), 0),
            (_Sized(_swarm_section(snapshot), SECTION_HEIGHT), 2),
            (_Sized(_leaderboard_section(snapshot), BOTTOM_HEIGHT), 4),
            (_Sized(_loss_section(snapshot), BOTTOM_HEIGHT), 3),
        ]
    if height is None:
        event_lines = DEFAULT_EVENT_LINES
    else:
        # the activity log's box needs its two border lines plus at least MIN_EVENT_LINES events
        while title.height + sum(part.height for part, _ in body) + 2 + MIN_EVENT_LINES > height:
            rank = max(r for _, r in body)
            if rank == 0:
                break  # nothing optional left: let rich crop the bottom rather than hide the essentials
            body = [(part, r) for part, r in body if r != rank]
        event_lines = max(height - title.height - sum(part.height for part, _ in body) - 2, MIN_EVENT_LINES)
    activity = _activity_section(snapshot, event_lines)
    return Group(title.renderable, *(part.renderable for part, _ in body), activity.renderable)


class _FitToConsole:
    """Defers the layout to render time, so a panel built without a width fills whatever console prints it."""

    def __init__(self, snapshot: Mapping[str, Any], height: int | None):
        self.snapshot, self.height = snapshot, height

    def __rich_console__(self, console: Console, options: ConsoleOptions) -> RenderResult:
        yield _build(self.snapshot, options.max_width, self.height if self.height is not None else options.height)


def render_panel(snapshot: Mapping[str, Any], width: int | None = None, height: int | None = None) -> RenderableType:
    """The whole panel for one `PeerStatus.snapshot()`, as a rich renderable. Pure: reads only `snapshot`.

    `width`: cells to lay out for; None lays out for the console that prints it. From 90 cells up the
    Model / You / Swarm sections sit side by side (best at 100-120 cells), narrower they stack.
    `height`: lines the panel may take; the activity log shows as many of the newest events as fit (at
    least 3), and on a short terminal the leaderboard and loss chart give way first. None shows the last 10
    events and every section. Missing or None values show as "—", so a snapshot of a peer that
    has only just started renders too.
    """
    if width is None:
        return _FitToConsole(snapshot, height)
    return _build(snapshot, width, height)


def summary_line(snapshot: Mapping[str, Any]) -> str:
    """One line for the terminal once the panel is gone: what this peer gave the swarm."""
    contribution = snapshot.get("contribution") or {}
    model = snapshot.get("model") or {}
    uptime = contribution.get("uptime_s") or snapshot.get("uptime_s")
    return (
        f"{_text_or_dash(snapshot.get('name'))} left swarm {_text_or_dash(snapshot.get('swarm'))}: "
        f"{human_count(contribution.get('steps'))} steps, {human_count(contribution.get('tokens'))} tokens, "
        f"{human_count(contribution.get('expert_requests'))} expert requests served, "
        f"uptime {human_duration(uptime)}, model version {_text_or_dash(model.get('global_epoch'))}, "
        f"last loss {format_loss((snapshot.get('training') or {}).get('loss'))}"
    )


# --- the live panel ---


class TerminalPanel:
    """Redraws `render_panel(status.snapshot())` in place, `refresh_per_second` times a second.

    Build, then `start()`, then `shutdown()` (idempotent): the refresher is rich's own `Live` thread, started
    by `start()` and stopped by `shutdown()`, never by construction. While running, `print()` to stdout/stderr
    lands above the panel (Live redirects them), but logging handlers hold the original stream and would tear
    the panel, so pair it with `install_panel_logging(status)`. 2 redraws a second keep the counters lively
    at a cost the trainer does not notice; raise it only for demos, every redraw takes CPU from training.
    Once shut down, a panel stays down: build a new one to show it again.
    """

    def __init__(self, status: PeerStatus, console: Console | None = None, refresh_per_second: float = 2.0):
        self.status = status
        self.console = console if console is not None else Console()
        self.refresh_per_second = refresh_per_second
        self._live: Live | None = None
        self._lock = threading.Lock()
        self._stopped = False

    def _current(self) -> RenderableType:
        # One line short of the screen: a frame as tall as the terminal scrolls it by a line on every redraw.
        height = max(self.console.height - 1, 1)
        return render_panel(self.status.snapshot(), width=self.console.width, height=height)

    def start(self) -> None:
        """Show the panel and keep it fresh from a background thread. A second call does nothing."""
        with self._lock:
            if self._live is not None or self._stopped:
                return
            self._live = Live(
                console=self.console,
                screen=False,  # no alternate screen: the last frame and the summary stay in the scrollback
                transient=False,
                auto_refresh=True,
                refresh_per_second=self.refresh_per_second,
                redirect_stdout=True,
                redirect_stderr=True,
                get_renderable=self._current,
            )
            self._live.start(refresh=True)

    def shutdown(self) -> None:
        """Draw a last frame, stop redrawing and print one summary line. Safe to call twice or before start."""
        with self._lock:
            if self._stopped:
                return
            self._stopped = True
            live, self._live = self._live, None
        if live is None:
            return
        live.stop()  # stops the refresher thread and restores stdout/stderr
        self.console.print(Text(summary_line(self.status.snapshot()), style="bold"), soft_wrap=True)

    def __enter__(self) -> TerminalPanel:
        self.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.shutdown()


def should_use_panel(stream: TextIO | None = None, env: Mapping[str, str] | None = None) -> bool:
    """True only on an interactive terminal: `stream` (default: sys.stdout now) is a TTY, `TERM` is not "dumb"
    and `DRAGON_NO_PANEL` is unset. Logs piped to a file or journald stay plain lines."""
    stream = sys.stdout if stream is None else stream
    env = os.environ if env is None else env
    if env.get("TERM", "") == "dumb" or "DRAGON_NO_PANEL" in env:
        return False
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError, OSError):  # no isatty, or a closed stream
        return False


class PanelLogHandler(logging.Handler):
    """Turns each log record at its level or above (INFO by default) into one line of the panel's activity log.

    Only the first line of a message is kept: a traceback would fill the log box; its last line (the
    exception) is appended in brackets instead. Reentrant calls are dropped: an event listener (the dashboard's
    push) that logs while we record an event would otherwise recurse forever.
    """

    def __init__(self, status: PeerStatus, level: int = logging.INFO):
        super().__init__(level)
        self.status = status
        self._busy = threading.local()

    def emit(self, record: logging.LogRecord) -> None:
        if getattr(self._busy, "on", False):
            return
        self._busy.on = True
        try:
            lines = self.format(record).splitlines() or [""]
            message = lines[0]
            if record.exc_info and len(lines) > 1:
                message = f"{message} ({lines[-1].strip()})"
            self.status.record_event(message, when=record.created)
        except Exception:
            self.handleError(record)
        finally:
            self._busy.on = False


def _writes_to_terminal_streams(handler: logging.Handler) -> bool:
    if not isinstance(handler, logging.StreamHandler) or isinstance(handler, logging.FileHandler):
        return False
    stream = handler.stream
    if any(stream is s for s in (sys.stdout, sys.stderr, sys.__stdout__, sys.__stderr__) if s is not None):
        return True
    try:
        return stream.fileno() in (1, 2)  # a wrapper around the same file descriptors tears the panel too
    except (AttributeError, ValueError, OSError):
        return False


def install_panel_logging(status: PeerStatus) -> Callable[[], None]:
    """Route the root logger into `status` events while the panel is up; returns the undo function.

    Removes the root logger's stream handlers on stdout/stderr (file handlers stay), adds a `PanelLogHandler`
    at INFO with a bare "%(message)s" format (the panel prints the time itself). The undo removes it and puts
    the removed handlers back in their old order; calling it twice is harmless.
    """
    root = logging.getLogger()
    before = list(root.handlers)
    removed = [h for h in before if _writes_to_terminal_streams(h)]
    for handler in removed:
        root.removeHandler(handler)
    panel_handler = PanelLogHandler(status, logging.INFO)
    panel_handler.setFormatter(logging.Formatter("%(message)s"))
    root.addHandler(panel_handler)

    def undo() -> None:
        root.removeHandler(panel_handler)
        current = [h for h in root.handlers if h not in before]  # handlers someone added meanwhile stay, last
        kept = [h for h in before if h in root.handlers or h in removed]
        root.handlers = kept + current  # one reference swap: a record being logged right now sees either list

    return undo
