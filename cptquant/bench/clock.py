"""Wall and CPU seconds of each piece of a benchmark section, and the load when it ended."""

from __future__ import annotations

import os
import resource
import time
from collections.abc import Callable
from typing import ParamSpec, TypeVar

P = ParamSpec("P")
T = TypeVar("T")


def cpu_seconds() -> float:
    """CPU time of this process and its finished children (the GenAI builder runs as one)."""
    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


class Clock:
    """Wall and CPU seconds of each piece: on a shared machine the wall time stretches with the load, the
    CPU time much less (2 threads: a quiet machine's wall time lies between CPU / 2 and CPU)."""

    def __init__(self, log: Callable[[str], object], prefix: str):
        self.seconds: dict[str, float] = {}
        self.cpu: dict[str, float] = {}
        self.loads: dict[str, float] = {}
        self.log = log
        self.prefix = prefix  # the section, in each log line

    def run(self, piece: str, fn: Callable[P, T], *args: P.args, **kwargs: P.kwargs) -> T:
        start, cpu = time.perf_counter(), cpu_seconds()
        try:
            return fn(*args, **kwargs)
        finally:
            self.seconds[piece] = self.seconds.get(piece, 0.0) + time.perf_counter() - start
            self.cpu[piece] = self.cpu.get(piece, 0.0) + cpu_seconds() - cpu
            self.loads[piece] = os.getloadavg()[0]
            self.log(f"{self.prefix} {piece}: {self.seconds[piece]:.0f} s, CPU {self.cpu[piece]:.0f} s "
                     f"(load {self.loads[piece]:.1f})")
