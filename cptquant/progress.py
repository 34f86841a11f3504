"""Progress display for long work: a step list with timings, and bars for per-layer loops."""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterator
from typing import Any

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, SpinnerColumn, TaskID, TextColumn, TimeElapsedColumn

from .output_folder import pause_point

console = Console(stderr=True)
# Called with a step's name as it starts and with "after NAME" as it ends (bench/export_memory.py labels its
# memory samples by step).
step_listeners: list[Callable[[str], None]] = []


def progress_bar(enabled: bool = True) -> Progress:
    return Progress(SpinnerColumn(), TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                    TimeElapsedColumn(), console=console, disable=not enabled, transient=True)


class Steps:
    """A fixed list of named steps; `with steps.step(timings):` runs the next one and records its time.

    `after_each` runs once each step is timed, before the listeners hear "after NAME" (the exporter's memory
    release: the display itself does nothing to memory)."""

    def __init__(self, names: list[str], enabled: bool = True, after_each: Callable[[], None] | None = None):
        self.names = names
        self.after_each = after_each
        self.index = 0
        self.progress = progress_bar(enabled)
        self.enabled = enabled
        self.task: TaskID = TaskID(0)  # set on entering

    def __enter__(self) -> Steps:
        self.progress.__enter__()
        self.task = self.progress.add_task(self.names[0], total=len(self.names))
        return self

    def __exit__(self, *exc: Any) -> None:
        self.progress.__exit__(*exc)

    @contextlib.contextmanager
    def step(self, timings: dict[str, float]) -> Iterator[None]:
        name = self.names[self.index]
        pause_point(name.split()[0].lower())  # tests: stop here (CPTQ_TEST_PAUSE_AT=quantize, write, …)
        self.progress.update(self.task, description=name)
        for listener in step_listeners:
            listener(name)
        start = time.perf_counter()
        yield
        timings[name] = time.perf_counter() - start
        if self.after_each is not None:
            self.after_each()
        for listener in step_listeners:
            listener(f"after {name}")
        if self.enabled:
            console.print(f"[green]✓[/green] {name} [dim]({timings[name]:.1f}s)[/dim]")
        self.index += 1
        self.progress.update(self.task, advance=1)
