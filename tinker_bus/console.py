"""What `tinker-bus up` prints: one line per part as it starts, a live wait line, the health summary."""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.markup import escape
from rich.table import Table
from rich.text import Text

console = Console(highlight=False)


def short_path(path: Path) -> str:
    """`path` relative to the working directory when it is below it (shorter lines), else absolute."""
    try:
        return str(path.resolve().relative_to(Path.cwd()))
    except ValueError:
        return str(path)


@contextlib.contextmanager
def step(part: str, activity: str) -> Iterator[dict[str, str]]:
    """Spinner while `activity` runs, then a ✓ line; the body may set `where` for that line."""
    started = time.monotonic()
    line: dict[str, str] = {"where": ""}
    with console.status(f"[bold]{part}[/]: {activity}"):
        yield line
    done(part, f"{line['where']} [dim]({time.monotonic() - started:.1f} s)[/]")


def done(part: str, where: str) -> None:
    console.print(f" [green]✓[/] [bold]{part:<8}[/] {where}")


def started_process(part: str, where: str, pid: int, log: Path) -> None:
    console.print(f" [cyan]▸[/] [bold]{part:<8}[/] {where} [dim]pid {pid}, log {short_path(log)}[/]")


def failure(message: str, log: Path | None = None, tail_lines: int = 30) -> None:
    console.print(f"[bold red]✗ {escape(message)}[/]")
    if log is not None and log.exists():
        lines = log.read_text(errors="replace").splitlines()[-tail_lines:]
        console.print(f"[dim]--- last {len(lines)} lines of {short_path(log)} ---[/]")
        console.print(Text("\n".join(lines)), soft_wrap=True)


def health_table(report: dict[str, Any]) -> Table:
    """/healthz as a table: one row per component, whatever detail the gateway reports for it."""
    table = Table(title="GET /healthz", title_justify="left", show_edge=False)
    table.add_column("part", style="bold")
    table.add_column("state")
    table.add_column("detail", style="dim", overflow="fold")
    for name, value in report.get("components", {}).items():
        detail = dict(value) if isinstance(value, dict) else {"value": value}
        healthy = detail.pop("healthy", None)
        state = "[green]healthy[/]" if healthy else "[red]unhealthy[/]"
        table.add_row(name, state, escape(_pairs(detail)))
    return table


def _pairs(detail: dict[str, Any]) -> str:
    """`k=v, ...`; a list of dicts (one per worker instance) becomes one `k=v` group per instance."""
    parts: list[str] = []
    for key, value in detail.items():
        if isinstance(value, list) and all(isinstance(v, dict) for v in value):
            parts.extend(f"[{_pairs(v)}]" for v in value if v)
        else:
            parts.append(f"{key}={value}")
    return ", ".join(parts)
