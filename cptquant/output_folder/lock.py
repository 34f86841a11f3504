"""One writer per output: an exclusive `fcntl.flock` on `.NAME.cptq-lock` beside the folder (holding the
writer's pid), taken before any heavy work and held to the end; a second run fails at once naming the first.
The kernel drops the lock on any exit, SIGKILL included; the file is removed on release."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from pathlib import Path

from ..errors import CptqError
from .debris import remove_debris
from .work_files import LOCK_SUFFIX, fcntl, writable_dir

_locks: dict[Path, int] = {}  # folder -> how many claims this process holds (claims nest)


def lock_path(folder: Path) -> Path:
    """`.NAME.cptq-lock` beside the folder; inside it when only the folder itself is writable (e.g. `-o /tmp/x.onnx`).
    Both runs decide the same way: if nobody may write the parent, nobody can create the folder either.
    Links resolved: `-o current` (a link to `v3`) and `-o v3` are one output, with one lock."""
    folder = Path(os.path.realpath(folder))
    if writable_dir(folder.parent) or not folder.is_dir():
        return folder.parent / f".{folder.name}{LOCK_SUFFIX}"
    return folder / LOCK_SUFFIX


def _read_pid(fd: int) -> str:
    try:
        os.lseek(fd, 0, os.SEEK_SET)
        return os.read(fd, 64).decode(errors="replace").strip() or "unknown"
    except OSError:
        return "unknown"


@contextlib.contextmanager
def output_lock(folder: Path) -> Iterator[None]:
    """Exclusive right to write `folder` for this process; a second process fails at once naming the first."""
    key = Path(os.path.realpath(folder))
    if fcntl is None:
        yield
        return
    if key in _locks:
        _locks[key] += 1
        try:
            yield
        finally:
            _locks[key] -= 1
        return
    path = lock_path(key)
    while True:
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as exc:
            raise CptqError(f"cannot write to {key}: {exc.strerror or exc}") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            pid = _read_pid(fd)
            os.close(fd)
            raise CptqError(f"{os.path.abspath(folder)} is being written by another cptq run (pid {pid}); wait for it "
                            "to finish") from None
        try:  # the previous holder removes the file on release: lock the file that is there now
            if os.fstat(fd).st_ino == os.stat(path).st_ino:
                break
        except FileNotFoundError:
            pass
        os.close(fd)
    os.ftruncate(fd, 0)
    os.write(fd, f"{os.getpid()}\n".encode())
    _locks[key] = 1
    try:
        yield
    finally:
        del _locks[key]
        with contextlib.suppress(OSError):
            os.unlink(path)  # while still locked: a waiter that opened it retries on the new file
        os.close(fd)


@contextlib.contextmanager
def claim_output(folder: Path) -> Iterator[Path]:
    """The lock on `folder` (its missing parents created, and removed again if nothing was written), then
    the debris of dead runs into it cleared."""
    folder = Path(os.path.abspath(Path(folder).expanduser()))
    created = []
    probe = folder.parent
    while not probe.exists():
        created.append(probe)
        probe = probe.parent
    try:
        folder.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise CptqError(f"cannot write to {folder}: {exc.strerror or exc}") from None
    try:
        with output_lock(folder):
            remove_debris(folder)
            yield folder
    finally:
        for path in created:  # deepest first; a folder the export filled is not empty and stays
            try:
                path.rmdir()
            except OSError:
                break
