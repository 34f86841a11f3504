"""The names cptquant keeps for its own work files beside an output, and where they may go.

A later run takes anything named like these for a dead run's debris, so an output may not carry these names
(targets.check_writable). `fcntl` is None where the OS has no flock (Windows): no locks, the rest still holds.
"""

from __future__ import annotations

import os
from pathlib import Path

try:
    import fcntl
except ImportError:  # pragma: no cover - not POSIX (Windows): no locks, the rest still holds
    fcntl = None  # type: ignore[assignment]

STAGING_PREFIX = ".cptq-tmp-"
CACHE_DIR_NAME = ".cptq-cache"  # the baseline caches beside an output (onnx_io/baselines.py)
LOCK_SUFFIX = ".cptq-lock"
OWNER_LOCK = "owner.lock"
JOURNAL = "journal.json"
STAGED = "out"  # the new output folder inside a staging folder
BACKUP = "old"  # files an existing folder had, moved aside during a commit

__all__ = ["BACKUP", "CACHE_DIR_NAME", "JOURNAL", "LOCK_SUFFIX", "OWNER_LOCK", "STAGED", "STAGING_PREFIX", "fcntl",
           "writable_dir"]


def writable_dir(path: Path) -> bool:
    return path.is_dir() and os.access(path, os.W_OK | os.X_OK)
