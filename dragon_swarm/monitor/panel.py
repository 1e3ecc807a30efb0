"""The live terminal panel a volunteer sees while their peer runs (rich), and the logging that feeds it.

Only `PeerStatus.snapshot()` is read, so the panel shows the same numbers as the web dashboard and
`/metrics`. `render_panel` (monitor/panel_render.py) is a pure function from a snapshot to a rich
renderable; `TerminalPanel` only owns the `rich.live.Live` that redraws it. While the panel is up, plain
log lines written to the terminal would scroll it apart, so `install_panel_logging` reroutes the root
logger into the panel's activity log.

Use the panel only on a real terminal (`should_use_panel`); under a pipe, a service manager or
`DRAGON_NO_PANEL=1` the peer keeps its plain log lines, which is what log collectors want.
"""

from __future__ import annotations

import logging
import os
import sys
import threading
from collections.abc import Callable, Mapping
from typing import TextIO

from rich.console import Console, RenderableType
from rich.live import Live
from rich.text import Text

from dragon_swarm.monitor.formatting import format_loss, human_count, human_duration, progress_bar, sparkline
from dragon_swarm.monitor.panel_render import render_panel, summary_line
from dragon_swarm.monitor.status import PeerStatus

__all__ = [
    "PanelLogHandler",
    "TerminalPanel",
    "format_loss",
    "human_count",
    "human_duration",
    "install_panel_logging",
    "progress_bar",
    "render_panel",
    "should_use_panel",
    "sparkline",
    "summary_line",
]


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