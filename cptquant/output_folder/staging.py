"""Everything is written into a `.cptq-tmp-*` folder beside the output, then put in place all at once.

- `Staging`: the work folder. Its writer holds a lock on `owner.lock` inside it; a staging folder whose owner
  lock is free belongs to a dead run (SIGKILL, power loss), and the next run into that folder removes it
  (debris.py).
- `commit`: a new folder is renamed into place in one step. Into an existing folder the files being replaced
  are first moved aside into the staging folder (a journal says which), then the new ones moved in; a failure
  or a signal at any file moves everything back, so the old output stays exactly as it was. A run killed
  mid-commit is rolled back from its journal by the next run (`rollback`).
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

from ..errors import CptqError
from .signals import committing, mark_written, pause_point, raise_if_interrupted
from .work_files import BACKUP, JOURNAL, OWNER_LOCK, STAGED, STAGING_PREFIX, fcntl, writable_dir


class Staging:
    """A `.cptq-tmp-*` work folder beside `folder`, removed on exit; `out` is the new output folder."""

    def __init__(self, folder: Path):
        self.folder = Path(os.path.abspath(folder))
        base = self.folder.parent if writable_dir(self.folder.parent) else self.folder
        self._fd: int | None = None
        try:
            self.root = Path(tempfile.mkdtemp(prefix=STAGING_PREFIX, dir=base))
        except OSError as exc:
            raise CptqError(f"cannot write to {self.folder}: {exc.strerror or exc}") from None
        try:
            # Lock first, then give the lock file its name: a cleaner never sees an owner file it could lock.
            fresh = self.root / (OWNER_LOCK + ".new")
            self._fd = os.open(fresh, os.O_RDWR | os.O_CREAT, 0o644)
            if fcntl is not None:
                fcntl.flock(self._fd, fcntl.LOCK_EX)
            os.write(self._fd, f"{os.getpid()}\n{self.folder}\n".encode())
            os.rename(fresh, self.root / OWNER_LOCK)
            self.out = self.root / STAGED
            self.out.mkdir()
        except BaseException:
            self.close()
            raise

    def __enter__(self) -> Staging:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        shutil.rmtree(self.root, ignore_errors=True)
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None


def read_journal(root: Path) -> dict[str, Any] | None:
    try:
        journal: dict[str, Any] = json.loads((root / JOURNAL).read_text())  # written by _commit_into
        return journal
    except (OSError, ValueError):
        return None


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    else:
        path.unlink()


def rollback(root: Path, journal: dict[str, Any]) -> None:
    """Undo a commit from its journal: the new entries already moved in go, the moved-aside ones come back.
    Moving aside finishes before moving in starts, so a new name no longer staged is one of ours in the folder."""
    target, staged, backup = Path(journal["target"]), root / STAGED, root / BACKUP
    for name in journal["new"]:
        if not os.path.lexists(staged / name) and os.path.lexists(target / name):
            _remove(target / name)
    for name in journal["old"]:
        if os.path.lexists(backup / name):
            os.rename(backup / name, target / name)
    (root / JOURNAL).unlink(missing_ok=True)


def commit(staging: Staging, remove: tuple[str, ...] = ()) -> None:
    """Move `staging.out` into place as `staging.folder`; `remove` names entries of an existing folder that
    must go too (an older export's leftovers). All or nothing; see the module docstring."""
    folder, staged = staging.folder, staging.out
    new = sorted(p.name for p in staged.iterdir())
    with committing():
        try:
            if not folder.exists():
                pause_point("install")
                raise_if_interrupted()
                os.rename(staged, folder)
            else:
                _commit_into(staging.root, folder, new, remove)
        except OSError as exc:
            raise CptqError(f"cannot move the output into {folder}: {exc.strerror or exc}"
                            + (f" ({exc.filename})" if exc.filename else "")) from None
        mark_written()
        pause_point("committed")


def _commit_into(root: Path, folder: Path, new: list[str], remove: tuple[str, ...]) -> None:
    old = [name for name in dict.fromkeys(new + list(remove)) if os.path.lexists(folder / name)]
    journal = {"target": str(folder), "new": new, "old": old}
    (root / BACKUP).mkdir()
    (root / (JOURNAL + ".new")).write_text(json.dumps(journal))
    os.rename(root / (JOURNAL + ".new"), root / JOURNAL)  # a reader sees the whole journal or none
    try:
        for name in old:
            os.rename(folder / name, root / BACKUP / name)
            raise_if_interrupted()
        for i, name in enumerate(new):
            os.rename(root / STAGED / name, folder / name)
            if i == 0:
                pause_point("install")
            if i < len(new) - 1:
                raise_if_interrupted()
    except BaseException:
        rollback(root, journal)
        raise
    (root / JOURNAL).unlink()  # committed: nothing to roll back any more


def replace_dir(staging: Staging, src: Path, dst: Path) -> None:
    """Put the folder `src` (inside the staging folder) at `dst`, replacing what is there in one step each way."""
    dst.parent.mkdir(parents=True, exist_ok=True)
    with committing():
        aside = staging.root / f"replaced-{dst.name}"
        if os.path.lexists(dst):
            os.rename(dst, aside)
        try:
            os.rename(src, dst)
        except BaseException:
            if os.path.lexists(aside):
                os.rename(aside, dst)
            raise
