"""The debris of dead runs: staging folders whose owner lock is free (their writer was SIGKILLed or lost
power), removed by the next run into the same folder after rolling back a commit they left half done."""

from __future__ import annotations

import contextlib
import os
import shutil
import time
from pathlib import Path

from .staging import read_journal, rollback
from .work_files import OWNER_LOCK, STAGING_PREFIX, fcntl

# A staging folder without an owner lock comes from a cptquant older than owner locks (or a run killed in
# the microseconds between creating it and locking): debris once this old.
UNOWNED_DEBRIS_AGE_S = 3600


def _staging_folders(folder: Path) -> list[Path]:
    bases = [folder.parent] + ([folder] if folder.is_dir() else [])
    found: list[Path] = []
    for base in bases:
        with contextlib.suppress(OSError):
            found += [p for p in base.iterdir() if p.name.startswith(STAGING_PREFIX) and p.is_dir()
                      and not p.is_symlink()]
    return found


def remove_debris(folder: Path) -> list[Path]:
    """Remove the staging folders of dead runs beside (or in) `folder`; a commit they left half done is
    rolled back first. Returns what was removed."""
    folder = Path(os.path.abspath(folder))
    removed: list[Path] = []
    if fcntl is None:  # without locks a live writer cannot be told from a dead one: leave them
        return removed
    for root in _staging_folders(folder):
        owner = root / OWNER_LOCK
        if not owner.exists():
            with contextlib.suppress(OSError):
                if time.time() - root.stat().st_mtime > UNOWNED_DEBRIS_AGE_S:
                    shutil.rmtree(root, ignore_errors=True)
                    removed.append(root)
            continue
        try:
            fd = os.open(owner, os.O_RDWR)
        except OSError:
            continue
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            continue  # its writer is alive
        try:
            journal = read_journal(root)
            if journal is not None:
                if Path(journal["target"]) != folder:
                    continue  # another folder's half-done commit: its own next run rolls it back
                rollback(root, journal)
            shutil.rmtree(root, ignore_errors=True)
            removed.append(root)
        finally:
            os.close(fd)
    return removed
