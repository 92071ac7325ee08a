"""`ctxrobot dash`: the live dashboard of a running daemon.

The dashboard only *renders*: it takes `status_source`, a function returning the daemon's
status document (see ARCHITECTURE / the daemon's control API), and never talks to the
daemon itself. That keeps it testable without a daemon and lets `--once` (plain text for
scripts and bug reports) and the interactive Textual app share every formatting decision:
both are built from `task_cells`, `sources_text`, `context_text` and `actuation_text`.

The app polls the source off the event loop (`asyncio.to_thread`): a daemon busy
re-allocating must never freeze the UI, and a daemon that went away shows up as a message
in the header while the last good view stays on screen.
"""

from __future__ import annotations

import asyncio
import io
import json
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

from rich import box
from rich.console import Console, Group, JustifyMethod, RenderableType
from rich.table import Table
from rich.text import Text
from textual.app import App, ComposeResult
from textual.binding import Binding, BindingType
from textual.widgets import DataTable, Footer, Static

Status = Mapping[str, Any]
StatusSource = Callable[[], Status]

SPARK_CHARS = "▁▂▃▄▅▆▇█"
SPARK_WIDTH = 12
RECENT_SHOWN = 8

STATE_STYLES = {
    "running": "green",
    "open": "green",
    "reopening": "yellow",
    "closed": "dim",
    "starting": "yellow",
    "stopping": "yellow",
    "frozen": "cyan",
    "exited": "red",
    "crashed": "bold red",
    "failed": "bold red",
}


@dataclass(frozen=True)
class Column:
    key: str
    label: str
    width: int | None  # fixed width in the app, so 4 updates a second never jiggle; None: auto
    justify: JustifyMethod = "right"


COLUMNS: tuple[Column, ...] = (
    Column("task", "task", None, "left"),
    Column("state", "state", 17, "left"),
    Column("crit", "crit", 4, "left"),
    Column("cpu", "alloc/used", 11),
    Column("weight", "weight", 6),
    Column("p50", "p50 ms", 6),
    Column("p95", "p95 ms", 6),
    Column("p99", "p99 ms", 6),
    Column("trend", "trend", SPARK_WIDTH, "left"),
    Column("samples", "samples", 7),
    Column("misses", "misses", 6),
    Column("dropped", "dropped", 7),
)


def _num(value: Any) -> float:
    """Sort key for optional numbers: missing values sort as lowest."""
    return float("-inf") if value is None else float(value)


def _cpu(task: Mapping[str, Any]) -> Mapping[str, Any]:
    return task.get("cpu") or {}


def _latency(task: Mapping[str, Any]) -> Mapping[str, Any]:
    return task.get("latency_ms") or {}


# Sort orders `s` cycles through: (label, key, descending). Worst-first for numbers.
SORTS: tuple[tuple[str, Callable[[str, Mapping[str, Any]], Any], bool], ...] = (
    ("task", lambda name, t: name, False),
    ("p99", lambda name, t: _num(_latency(t).get("p99")), True),
    ("misses", lambda name, t: _num(t.get("deadline_misses")), True),
    ("cpu used", lambda name, t: _num(_cpu(t).get("used")), True),
    ("dropped", lambda name, t: _num(t.get("dropped")), True),
    ("state", lambda name, t: str(t.get("state", "")), False),
)


def sort_tasks(tasks: Mapping[str, Mapping[str, Any]], sort_index: int) -> list[str]:
    """Task names in the order of sort `sort_index` (ties broken by name)."""
    _, key, descending = SORTS[sort_index % len(SORTS)]
    names = sorted(tasks)  # stable sort below keeps name order within ties
    return sorted(names, key=lambda n: key(n, tasks[n]), reverse=descending)


def sparkline(values: Sequence[float], width: int = SPARK_WIDTH) -> str:
    """The last `width` values as block characters, scaled between their min and max."""
    vals = [float(v) for v in values[-width:] if v is not None]
    if not vals:
        return ""
    lo, hi = min(vals), max(vals)
    span = hi - lo
    top = len(SPARK_CHARS) - 1
    return "".join(SPARK_CHARS[round((v - lo) / span * top) if span else 0] for v in vals)


def _ms(value: Any, digits: int = 1) -> str:
    return "–" if value is None else f"{float(value):.{digits}f}"


def _pct(value: Any) -> str:
    return "–" if value is None else f"{float(value) * 100:.0f}%"


def task_cells(task: Mapping[str, Any]) -> dict[str, Text]:
    """One task's row, as styled text per column key (without the name)."""
    state = str(task.get("state", "?"))
    cpu = _cpu(task)
    if cpu.get("frozen"):
        state = f"{state} (frozen)"
    rate = task.get("rate_hz")
    if rate is not None:
        state = f"{state} @{float(rate):g}Hz"
    used, allocated = cpu.get("used"), cpu.get("allocated")
    over = used is not None and allocated is not None and used > allocated * 1.05
    lat = _latency(task)
    misses = int(task.get("deadline_misses") or 0)
    dropped = int(task.get("dropped") or 0)
    cells = {
        "state": Text(state, style=STATE_STYLES.get(str(task.get("state")), "")),
        "crit": Text("yes", style="bold magenta") if task.get("critical") else Text("–"),
        "cpu": Text(f"{_pct(allocated)} / {_pct(used)}", style="yellow" if over else ""),
        "weight": Text("–" if cpu.get("weight") is None else str(cpu["weight"])),
        "p50": Text(_ms(lat.get("p50"))),
        "p95": Text(_ms(lat.get("p95"))),
        "p99": Text(_ms(lat.get("p99")), style="bold"),
        "trend": Text(sparkline(task.get("recent_latency_ms") or []), style="cyan"),
        "samples": Text(str(task.get("samples", 0))),
        "misses": Text(str(misses), style="bold red" if misses else ""),
        "dropped": Text(str(dropped), style="yellow" if dropped else ""),
    }
    for col in COLUMNS[1:]:
        cells[col.key].justify = col.justify  # the app's DataTable has no column justify
    return cells


def header_text(status: Status, note: str = "") -> Text:
    d = status.get("daemon") or {}
    uptime = d.get("uptime_s")
    text = Text.assemble(
        ("ctxrobot", "bold"),
        f"  pid {d.get('pid', '?')}",
        f" · up {_ms(uptime)} s" if uptime is not None else "",
        " · policy ",
        (str(d.get("policy", "?")), "bold cyan"),
        f" · config {d.get('config', '?')}",
        f" · run {d.get('run_dir', '?')}",
    )
    if note:
        text.append(f"\n{note}", style="bold yellow")
    return text


def _signal(value: Any) -> str:
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        return f"{value:.3g}"
    if value is None:
        return "?"
    return str(value)


def context_text(status: Status) -> Text:
    ctx = status.get("context") or {}
    signals = ctx.get("signals") or {}
    text = Text("context  ", style="bold")
    for i, (name, value) in enumerate(signals.items()):
        text.append(("  " if i else "") + f"{name}=")
        text.append(_signal(value), style="bold" if value not in (False, None, 0) else "dim")
    if not signals:
        text.append("no signals yet", style="dim")
    text.append("\nrules    ", style="bold")
    active = list(ctx.get("active_rules") or [])
    text.append(
        ", ".join(active) if active else "none active", style="magenta" if active else "dim"
    )
    fired = list(ctx.get("fired") or [])
    if fired:
        text.append("   fired: ", style="bold")
        text.append(", ".join(str(f) for f in fired), style="yellow")
    return text


def sources_text(status: Status) -> Text:
    """One line: each sensor source's state, how long it has been in it, and why."""
    sources = status.get("sources") or {}
    text = Text("sources  ", style="bold")
    if not sources:
        text.append("none reported", style="dim")
    for i, (name, source) in enumerate(sorted(sources.items())):
        state = str(source.get("state", "?"))
        text.append(("  " if i else "") + f"{name}=")
        text.append(state, style=STATE_STYLES.get(state, ""))
        if state != "open" and source.get("for_s") is not None:
            text.append(f" {_ms(source['for_s'])}s")
        if source.get("detail") and state != "open":
            text.append(f" ({source['detail']})", style="dim")
    return text


def actuation_text(status: Status) -> Text:
    act = status.get("actuation_ms") or {}
    return Text.assemble(
        ("actuation", "bold"),
        f"  p50 {_ms(act.get('p50'), 3)} ms · p99 {_ms(act.get('p99'), 3)} ms",
        f" · last {_ms(act.get('last'), 3)} ms · {act.get('count', 0)} allocations",
    )


def recent_text(name: str, task: Mapping[str, Any], limit: int = RECENT_SHOWN) -> Text:
    """The task's most recent results, newest first, one line each."""
    text = Text(f"{name}: recent results", style="bold")
    if task.get("detail"):  # e.g. why a container exited
        text.append(f"   {task.get('state', '?')}: {task['detail']}", style="yellow")
    recent = list(task.get("recent") or [])[-limit:]
    if not recent:
        text.append("\n  none yet", style="dim")
    for r in reversed(recent):
        result = json.dumps(r.get("result"), separators=(",", ":"), default=str)
        text.append(f"\n  #{r.get('id', '?')}  {_ms(r.get('latency_ms'))} ms  ")
        text.append(result, style="dim")
    return text


def render_snapshot(status: Status, sort_index: int = 0) -> RenderableType:
    """The whole status as one rich renderable (what `ctxrobot dash --once` prints)."""
    tasks = status.get("tasks") or {}
    # Natural column widths, two spaces apart (padding + separator): 12 columns fit 120.
    # On a narrower terminal rich shrinks the other columns; task names are never cut.
    table = Table(box=box.SIMPLE_HEAD, pad_edge=False, padding=(0, 1, 0, 0))
    for col in COLUMNS:
        name_width = max((len(n) for n in tasks), default=4) if col.key == "task" else None
        table.add_column(col.label, justify=col.justify, no_wrap=True, min_width=name_width)
    for name in sort_tasks(tasks, sort_index):
        cells = task_cells(tasks[name])
        table.add_row(Text(name, style="bold"), *(cells[c.key] for c in COLUMNS[1:]))
    return Group(
        header_text(status),
        table,
        sources_text(status),
        context_text(status),
        actuation_text(status),
    )


def snapshot_text(status: Status, width: int = 120) -> str:
    """`render_snapshot` as plain text (no colour codes), `width` columns wide."""
    out = io.StringIO()
    console = Console(
        file=out, width=width, color_system=None, force_terminal=False, highlight=False
    )
    console.print(render_snapshot(status))
    # Rich pads every line to the full width; trailing blanks only get in the way of grep.
    return "\n".join(line.rstrip() for line in out.getvalue().splitlines()) + "\n"


class DashApp(App[None]):
    """The live dashboard: polls `status_source` every `interval_s` seconds."""

    TITLE = "ctxrobot"
    CSS = """
    #header { height: auto; padding: 0 1; background: $boost; }
    #tasks { height: auto; max-height: 60%; }
    #sources { height: auto; padding: 0 1; margin-top: 1; }
    #context { height: auto; padding: 0 1; }
    #actuation { height: auto; padding: 0 1; }
    #detail { height: 1fr; border: round $accent; padding: 0 1; }
    """
    BINDINGS: ClassVar[list[BindingType]] = [
        Binding("q", "quit", "quit"),
        Binding("p", "toggle_pause", "pause"),
        Binding("s", "cycle_sort", "sort"),
    ]

    def __init__(self, status_source: StatusSource, *, interval_s: float = 0.25) -> None:
        super().__init__()
        self._source = status_source
        self._interval_s = interval_s
        self.status: Status = {}
        self.error: str | None = None
        self.paused = False
        self.sort_index = 0
        self.selected: str | None = None
        self._rows: list[str] = []
        self._fetching = False

    def compose(self) -> ComposeResult:
        yield Static(id="header")
        yield DataTable(id="tasks", cursor_type="row", zebra_stripes=True)
        yield Static(id="sources")
        yield Static(id="context")
        yield Static(id="actuation")
        yield Static(id="detail")
        yield Footer()

    def on_mount(self) -> None:
        table = self.query_one("#tasks", DataTable)
        for col in COLUMNS:
            table.add_column(col.label, width=col.width, key=col.key)
        self._show()
        self.set_interval(self._interval_s, self.poll)
        self.call_later(self.poll)

    async def poll(self) -> None:
        """Fetch the status off the event loop; skip while paused or still fetching."""
        if self.paused or self._fetching:
            return
        self._fetching = True
        status: Status | None = None
        error: str | None = None
        try:
            status = await asyncio.to_thread(self._source)
        except Exception as exc:  # the daemon may be restarting; keep the last view
            error = f"{type(exc).__name__}: {exc}"
        finally:
            self._fetching = False
        if self.paused:  # paused while this fetch was in flight: the view stays frozen
            return
        if status is not None:
            self.status = status
        self.error = error
        self._show()

    # -- rendering -----------------------------------------------------------------------

    def _note(self) -> str:
        notes = [f"sort: {SORTS[self.sort_index][0]}"]
        if self.paused:
            notes.append("PAUSED")
        if self.error:
            notes.append(f"daemon unreachable: {self.error}")
        return "  ".join(notes)

    def _show(self) -> None:
        self.query_one("#header", Static).update(header_text(self.status, self._note()))
        self._show_tasks()
        self.query_one("#sources", Static).update(sources_text(self.status))
        self.query_one("#context", Static).update(context_text(self.status))
        self.query_one("#actuation", Static).update(actuation_text(self.status))
        self._show_detail()

    def _show_tasks(self) -> None:
        table = self.query_one("#tasks", DataTable)
        tasks = self.status.get("tasks") or {}
        order = sort_tasks(tasks, self.sort_index)
        if order != self._rows:
            # Rows appear, vanish or move: rebuild, and keep the cursor on the same task.
            table.clear()
            for name in order:
                cells = task_cells(tasks[name])
                table.add_row(
                    Text(name, style="bold"), *(cells[c.key] for c in COLUMNS[1:]), key=name
                )
            self._rows = order
            if self.selected in order:
                table.move_cursor(row=order.index(self.selected), animate=False)
            elif order:
                self.selected = order[0]
        else:
            # Same rows in the same order (the common case, 4×/s): update cells in place.
            for name in order:
                for key, cell in task_cells(tasks[name]).items():
                    table.update_cell(name, key, cell)

    def _show_detail(self) -> None:
        detail = self.query_one("#detail", Static)
        tasks = self.status.get("tasks") or {}
        if self.selected in tasks:
            detail.update(recent_text(self.selected, tasks[self.selected]))
        else:
            detail.update(Text("no task selected", style="dim"))

    # -- input ---------------------------------------------------------------------------

    def on_data_table_row_highlighted(self, event: DataTable.RowHighlighted) -> None:
        if event.row_key.value is not None:
            self.selected = event.row_key.value
            self._show_detail()

    def on_data_table_row_selected(self, event: DataTable.RowSelected) -> None:
        if event.row_key.value is not None:
            self.selected = event.row_key.value
            self._show_detail()

    def action_toggle_pause(self) -> None:
        self.paused = not self.paused
        self.query_one("#header", Static).update(header_text(self.status, self._note()))

    def action_cycle_sort(self) -> None:
        self.sort_index = (self.sort_index + 1) % len(SORTS)
        self._show()


def run_dash(status_source: StatusSource, *, interval_s: float = 0.25) -> None:
    """Run the interactive dashboard until the user quits."""
    DashApp(status_source, interval_s=interval_s).run()
