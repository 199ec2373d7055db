"""What autopar's commands show people: progress on stderr, counts, where files went.

Shared by the `autopar` command (cli.py) and `autopar demo` (demo.py). It imports
nothing heavy at module level, so `autopar --help` starts without loading torch.
"""

from __future__ import annotations

import contextlib
import sys
import time
from collections.abc import Callable, Iterator
from typing import TextIO

PLAIN_PROGRESS_EVERY_S = 2.0


class Progress:
    """Step messages for long commands: a rich spinner on a terminal, else lines on stderr."""

    def __init__(self, quiet: bool = False):
        self.quiet = quiet
        self.console = _rich_console() if sys.stderr.isatty() else None

    @contextlib.contextmanager
    def step(self, message: str) -> Iterator[Callable[[str], None]]:
        """Run a step; the yielded callable updates its message (e.g. per layout searched)."""
        start = time.perf_counter()
        if self.quiet:
            yield lambda _text: None
        elif self.console is not None:
            with self.console.status(message) as status:
                yield lambda text: status.update(f"{message}: {text}")
        else:
            print(f"autopar: {message} ...", file=sys.stderr, flush=True)
            update = _Throttled(
                lambda text: print(f"autopar:   {text}", file=sys.stderr, flush=True)
            )
            yield update
            update.flush()  # the last count shown is the count reached
        if not self.quiet:
            self.log(f"{message}: done in {time.perf_counter() - start:.1f} s")

    def log(self, message: str) -> None:
        if self.quiet:
            return
        if self.console is not None:
            self.console.print(f"[dim]autopar: {message}[/dim]", highlight=False)
        else:
            print(f"autopar: {message}", file=sys.stderr, flush=True)


class _Throttled:
    """At most one plain progress line per `every_s` seconds: a log, not a flood; `flush`
    shows the last update held back, so the final line says where the step ended."""

    def __init__(self, emit: Callable[[str], None], every_s: float = PLAIN_PROGRESS_EVERY_S):
        self.emit, self.every_s = emit, every_s
        self.last, self.held = -float("inf"), None

    def __call__(self, text: str) -> None:
        if time.perf_counter() - self.last >= self.every_s:
            self.last, self.held = time.perf_counter(), None
            self.emit(text)
        else:
            self.held = text

    def flush(self) -> None:
        if self.held is not None:
            self.emit(self.held)
            self.held = None


def layout_progress(update: Callable[[str], None]) -> Callable:
    """The `progress=` callback of `autopar.plan`: shows each (dp, tp, pp) layout tried."""
    count = 0

    def on_layout(layout) -> None:
        nonlocal count
        count += 1
        update(f"layout {count}: dp={layout.dp} tp={layout.tp} pp={layout.pp}")

    return on_layout


def _rich_console():
    try:
        from rich.console import Console
    except ImportError:
        return None
    return Console(stderr=True)


def human_count(n: float) -> str:
    for factor, suffix in ((1e12, "T"), (1e9, "B"), (1e6, "M"), (1e3, "K")):
        if n >= factor:
            return f"{n / factor:.1f}{suffix}"
    return str(int(n))


def write_plan_files(plan, out: str | None, html: str | None, file: TextIO | None = None) -> None:
    """Save the plan and/or its HTML report, saying where each went on `file` (stdout)."""
    file = file or sys.stdout
    if out:
        plan.save(out)
        print(f"plan written to {out}", file=file)
    if html:
        from autopar.viz import graph
        from autopar.viz.report import write_report

        write_report(plan, html)
        print(f"report written to {html}", file=file)
        if not graph.matplotlib_available():
            print(f"note: {graph.MISSING}; the report has tables and bars only", file=file)
