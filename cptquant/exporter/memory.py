"""The exporter's memory policy: what a step freed goes back to the operating system before the next one."""

from __future__ import annotations

import ctypes
import gc


def release_freed_memory() -> None:
    """Hand what Python and the C heap have freed back to the operating system (gc, then glibc's malloc_trim):
    a step's peak would otherwise carry the heap the steps before it freed but the allocator kept."""
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc
        pass
