"""The terminal panel's picture: `render_panel` is a pure function from a `PeerStatus.snapshot()` to a rich
renderable, and `summary_line` the one line printed once the panel is gone. Nothing here owns a thread or a
terminal; `monitor/panel.py` does.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from rich.console import Console, ConsoleOptions, Group, RenderableType, RenderResult
from rich.panel import Panel
from rich.table import Table
from rich.text import Text

from dragon_swarm.events import PeerState
from dragon_swarm.monitor.formatting import (
    DASH,
    format_clock,
    format_loss,
    human_count,
    human_duration,
    progress_bar,
    sparkline,
    text_or_dash,
)

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

# --- building blocks ---


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
    label = text_or_dash(state)
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
    left.append(text_or_dash(snapshot.get("name")), style="bold")
    left.append("  swarm ", style="grey62")
    left.append(text_or_dash(snapshot.get("swarm")), style="bold cyan")
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
    held_out = snapshot.get("held_out") or {}
    val_loss, val_version = held_out.get("loss"), held_out.get("model_version")
    rows: list[tuple[str, RenderableType | str]] = [
        ("Model version", text_or_dash(model.get("global_epoch"))),
        ("Local epoch", text_or_dash(model.get("local_epoch"))),
        # the loss on text no trainer sees: what the swarm learned, not what it memorised
        ("Held-out loss", DASH if val_loss is None else f"{format_loss(val_loss)} (v{text_or_dash(val_version)})"),
        ("Next global step", ""),
    ]
    body = Group(_kv_table(rows), bar, counts)
    return Panel(body, title="Model", title_align="left", border_style="cyan", height=SECTION_HEIGHT)


def _you_section(snapshot: Mapping[str, Any]) -> Panel:
    contribution = snapshot.get("contribution") or {}
    training = snapshot.get("training") or {}
    tps = training.get("tokens_per_second")
    rows: list[tuple[str, RenderableType | str]] = [
        ("Micro-batches", human_count(contribution.get("micro_batches"))),
        ("Tokens", human_count(contribution.get("tokens"))),
        ("Expert requests", human_count(contribution.get("expert_requests"))),
        # total uptime across restarts once the contribution record knows it, this run's until then
        ("Uptime", human_duration(contribution.get("uptime_s") or snapshot.get("uptime_s"))),
        ("Badge", text_or_dash(contribution.get("badge"))),
        ("Loss", format_loss(training.get("loss"))),
        ("Tokens/s", DASH if tps is None else human_count(float(tps))),
    ]
    return Panel(_kv_table(rows), title="You", title_align="left", border_style="green", height=SECTION_HEIGHT)


def _swarm_section(snapshot: Mapping[str, Any]) -> Panel:
    stats = snapshot.get("swarm_stats") or {}
    online, total = stats.get("experts_online"), stats.get("experts_total")
    banned = stats.get("banned_peers")
    rows: list[tuple[str, RenderableType | str]] = [
        ("Peers alive", text_or_dash(stats.get("peers_alive"))),
        ("Trainers", text_or_dash(stats.get("trainers"))),
        ("Experts online", f"{text_or_dash(online)}/{text_or_dash(total)}"),
        ("Replicas", text_or_dash(stats.get("replicas"))),
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
            text_or_dash(row.get("name")) + (" (you)" if mine else ""),
            human_count(row.get("tokens")),
            human_count(row.get("batches")),
            human_count(row.get("expert_requests")),
            human_duration(row.get("uptime_s")),
            text_or_dash(row.get("badge")),
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
        header.append("no loss reported yet", style="grey50")
        chart = Text("\n" * (SPARK_ROWS - 1))  # keep the box's shape while there is nothing to draw
    tps = [float(p["tokens_per_second"]) for p in history if isinstance(p.get("tokens_per_second"), (int, float))]
    footer = Text(no_wrap=True, overflow="ellipsis")
    if tps:
        footer.append("tokens/s ", style="grey62")
        footer.append(human_count(tps[-1]), style="bold")
        footer.append("  avg ", style="grey62")
        footer.append(human_count(sum(tps) / len(tps)))
    # what the chart's points are: this peer's micro-batches, or (on a monitor) model versions of the swarm
    counted = "model versions" if snapshot.get("history_x") == "epoch" else "micro-batches"
    title = f"Loss, last {len(history)} {counted}" if history else "Loss"
    body = Group(header, chart, footer)
    return Panel(body, title=title, title_align="left", border_style="blue", height=BOTTOM_HEIGHT)


def _activity_section(snapshot: Mapping[str, Any], lines: int) -> _Sized:
    events = list(snapshot.get("events") or [])[-lines:] if lines > 0 else []
    table = Table.grid(padding=(0, 1), expand=True)
    table.add_column(style="grey50", no_wrap=True)
    table.add_column(ratio=1, no_wrap=True, overflow="ellipsis")
    for event in events:  # oldest first, so the newest line sits at the bottom, next to where the eye rests
        table.add_row(format_clock(event.get("t")), text_or_dash(event.get("message")))
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
        f"{text_or_dash(snapshot.get('name'))} left swarm {text_or_dash(snapshot.get('swarm'))}: "
        f"{human_count(contribution.get('micro_batches'))} micro-batches, "
        f"{human_count(contribution.get('tokens'))} tokens, "
        f"{human_count(contribution.get('expert_requests'))} expert requests served, "
        f"uptime {human_duration(uptime)}, model version {text_or_dash(model.get('global_epoch'))}, "
        f"last loss {format_loss((snapshot.get('training') or {}).get('loss'))}"
    )
