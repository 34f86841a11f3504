"""Writing an output folder safely: one writer at a time, all or nothing, nothing left behind.

- `claim_output(folder)`: an exclusive `fcntl.flock` on `.NAME.cptq-lock` beside the folder (holding the
  writer's pid), taken before any heavy work and held to the end; a second run fails at once naming the
  first. The kernel drops the lock on any exit, SIGKILL included; the file is removed on release.
- `Staging`: everything is written into a `.cptq-tmp-*` folder beside the output. Its writer holds a lock on
  `owner.lock` inside it; a staging folder whose owner lock is free belongs to a dead run (SIGKILL, power
  loss) and the next run into that folder removes it (`remove_debris`).
- `commit`: a new folder is renamed into place in one step. Into an existing folder the files being
  replaced are first moved aside into the staging folder (a journal says which), then the new ones moved
  in; a failure or a signal at any file moves everything back, so the old output stays exactly as it was.
  A run killed mid-commit is rolled back from its journal by the next run.
- `handle_signals`: SIGTERM, SIGHUP and SIGINT raise `Interrupted` (a BaseException, like
  KeyboardInterrupt, so no `except Exception` swallows it) and every `finally` cleans up; inside a commit
  they are held until it has finished or been rolled back.

What an export into `folder/NAME.onnx` owns: NAME.onnx and its external data (NAME.onnx*),
NAME.plan.json, NAME.report.json, and the side files it writes (config.json, generation_config.json,
tokenizer files). Any of those already present is refused without --force; with --force exactly those are
replaced (and an older NAME.onnx_data the new export does not write is removed). Other files are never
touched. The source model's own folder is refused even with --force.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import sys
import tempfile
import threading
import time
from pathlib import Path

from .errors import CptqError

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
# A staging folder without an owner lock comes from a cptquant older than owner locks (or a run killed in
# the microseconds between creating it and locking): debris once this old.
UNOWNED_DEBRIS_AGE_S = 3600
# Side files an export writes beside NAME.onnx (optimum copies config, generation config and tokenizer).
SIDE_FILES = ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
              "special_tokens_map.json", "added_tokens.json", "vocab.txt", "vocab.json", "merges.txt",
              "tokenizer.model", "spiece.model", "sentencepiece.bpe.model", "chat_template.jinja",
              "chat_template.json", "genai_config.json")
# `cptq verify`'s reports inside an output folder and its name for the model it checked: a forced re-export
# removes the reports of the model it replaces (named here, below both the exporter and the runtimes).
VERIFY_REPORT_DIR = "verify"
VERIFY_CANDIDATE = "quantized"
PAUSE_ENV = "CPTQ_TEST_PAUSE_AT"  # test hook: sleep at this named point (see pause_point)
HANDLED_SIGNALS = tuple(s for s in (getattr(signal, "SIGTERM", None), getattr(signal, "SIGHUP", None),
                                    signal.SIGINT) if s is not None)


# ---------------------------------------------------------------- signals


class Interrupted(BaseException):
    """A SIGTERM, SIGHUP or SIGINT arrived. `written`: the output had been committed already."""

    def __init__(self, signum: int, written: bool = False):
        super().__init__(signum)
        self.signum = signum
        self.written = written

    @property
    def exit_code(self) -> int:
        return 128 + self.signum  # the shell's convention: 130 for SIGINT, 143 for SIGTERM, 129 for SIGHUP

    @property
    def message(self) -> str:
        return interrupted_message(self.written)


def interrupted_message(written: bool) -> str:
    return ("interrupted: the output was already complete and in place" if written
            else "interrupted: nothing written")


_held = 0  # > 0 inside a commit: signals are recorded, not raised
_pending: list[int] = []
_written = False  # an output of this run is committed: a later signal says so, not "nothing written"


def _on_signal(signum, _frame) -> None:
    if _held:
        _pending.append(signum)
        return
    raise Interrupted(signum, written=_written)


def _on_startup_signal(signum, _frame) -> None:
    """Outside a command's `handle_signals` (importing torch and transformers before it, exiting after it):
    there is nothing to clean up, so say what happened and leave at once. os._exit: no `except BaseException`
    in a half-imported library can swallow it, and no traceback is printed."""
    os.write(2, (interrupted_message(_written) + "\n").encode())
    os._exit(128 + signum)


def install_startup_handlers() -> None:
    """The console scripts' first step: SIGTERM/SIGHUP/SIGINT print one line and exit 128 + the signal until a
    command's own handlers (handle_signals) take over, and again after them (main thread only)."""
    if threading.current_thread() is threading.main_thread():
        for s in HANDLED_SIGNALS:
            signal.signal(s, _on_startup_signal)


@contextlib.contextmanager
def handle_signals():
    """Turn SIGTERM/SIGHUP/SIGINT into `Interrupted` for the duration (main thread only; elsewhere a no-op)."""
    global _written
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    _written = False  # a new command: nothing of it is written yet
    previous = {s: signal.signal(s, _on_signal) for s in HANDLED_SIGNALS}
    try:
        yield
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
        _pending.clear()


def raise_if_interrupted() -> None:
    """Inside a held section: raise the signal that arrived, so the caller can roll back."""
    if _pending:
        signum = _pending[0]
        _pending.clear()
        raise Interrupted(signum, written=_written)


@contextlib.contextmanager
def held_signals():
    """Signals arriving inside are recorded; call raise_if_interrupted() where stopping is safe."""
    global _held
    _held += 1
    try:
        yield
    finally:
        _held -= 1


@contextlib.contextmanager
def committing():
    """Around the moves that put an output in place: signals wait until they are done (or rolled back);
    one that arrived meanwhile is raised afterwards as Interrupted(written=True)."""
    with held_signals():
        yield
    if _pending and not _held:
        signum = _pending[0]
        _pending.clear()
        raise Interrupted(signum, written=True)


def pause_point(name: str) -> None:
    """Test hook: with CPTQ_TEST_PAUSE_AT=name, say so on stderr and wait (up to 2 minutes) for a signal."""
    if os.environ.get(PAUSE_ENV) != name:
        return
    print(f"cptq-test: paused at {name}", file=sys.stderr, flush=True)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        time.sleep(0.02)
        raise_if_interrupted()


# ---------------------------------------------------------------- what an export owns


def output_path(path) -> Path:
    """`-o` as every check and the writer see it. The writer works on absolute paths, where `a/missing/..` is
    `a`; the checks must see that same folder (the OS, asked about `a/missing/..`, says it does not exist, and
    an existing folder's files would be replaced without --force)."""
    return Path(os.path.normpath(Path(path).expanduser()))


def owned_by_export(name: str, model_file: str) -> bool:
    """Whether a file named `name` in the output folder is one an export to `model_file` writes."""
    stem = model_file[: -len(".onnx")]
    return (name.startswith(model_file) or name in (f"{stem}.plan.json", f"{stem}.report.json")
            or name in SIDE_FILES)


def existing_files(folder: Path, names) -> list[str]:
    return sorted(name for name in names if os.path.lexists(folder / name))


def check_writable(folder: Path) -> None:
    """`folder` is a folder, or can be created as one, by this user, and not a name cptquant keeps for itself."""
    reserved = [part for part in Path(os.path.abspath(folder)).parts
                if part.startswith(STAGING_PREFIX) or part.endswith(LOCK_SUFFIX) or part == CACHE_DIR_NAME]
    if reserved:  # a later run would take a `.cptq-tmp-*` output for a dead run's debris and delete it
        raise CptqError(f"cannot write to {folder}: {reserved[0]} is a name cptquant keeps for its own work files; "
                        "choose another -o")
    if folder.exists() and not folder.is_dir():
        raise CptqError(f"output folder {folder} is a file")
    probe = folder
    while not probe.exists():
        if probe.is_symlink():
            raise CptqError(f"cannot write to {folder}: {probe} is a broken link")
        probe = probe.parent
    if not probe.is_dir():
        raise CptqError(f"cannot write to {folder}: {probe} is a file, not a folder")
    if not os.access(probe, os.W_OK | os.X_OK):
        raise CptqError(f"cannot write to {folder}: permission denied")


def check_target(folder: Path, model_file: str, force: bool, source: str | None = None) -> None:
    """Everything about an export's `-o` that can be refused before any work: the path, permissions, the
    source model's own folder, and (without --force) files of the folder the export would replace."""
    check_writable(folder)
    model = folder / model_file
    if model.is_dir():
        raise CptqError(f"output {model} is a folder, not a model file; choose another -o")
    refuse_folders_in_place(folder, lambda name: owned_by_export(name, model_file))
    if source and Path(source).expanduser().is_dir() and folder.exists() \
            and Path(source).expanduser().resolve() == folder.resolve():
        raise CptqError(f"refusing to export into the source model's own folder {folder} (its config and tokenizer "
                        "would be replaced); choose another -o")
    if not force:
        refuse_replacing(folder, owned_files(folder, lambda name: owned_by_export(name, model_file)))


def refuse_folders_in_place(folder: Path, owned) -> None:
    """A folder where a command writes a file is not an earlier output's: never replaced, even with --force
    (moving it aside and deleting it would take everything in it)."""
    folders = [name for name in owned_files(folder, owned)
               if (folder / name).is_dir() and not (folder / name).is_symlink()]
    if folders:
        raise CptqError(f"{folder} has folders where cptquant writes files: {', '.join(folders)}; choose another -o")


def owned_files(folder: Path, owned) -> list[str]:
    """The entries of `folder` (when it exists) for which `owned(name)` holds, sorted."""
    return sorted(p.name for p in folder.iterdir() if owned(p.name)) if folder.is_dir() else []


def refuse_replacing(folder: Path, names: list[str]) -> None:
    if names:
        raise CptqError(f"output files already exist in {folder}: {', '.join(names)} (use --force to replace them)")


# ---------------------------------------------------------------- the lock


_locks: dict[Path, int] = {}  # folder -> how many claims this process holds (claims nest)


def _writable(path: Path) -> bool:
    return path.is_dir() and os.access(path, os.W_OK | os.X_OK)


def lock_path(folder: Path) -> Path:
    """`.NAME.cptq-lock` beside the folder; inside it when only the folder itself is writable (e.g. `-o /tmp/x.onnx`).
    Both runs decide the same way: if nobody may write the parent, nobody can create the folder either.
    Links resolved: `-o current` (a link to `v3`) and `-o v3` are one output, with one lock."""
    folder = Path(os.path.realpath(folder))
    if _writable(folder.parent) or not folder.is_dir():
        return folder.parent / f".{folder.name}{LOCK_SUFFIX}"
    return folder / LOCK_SUFFIX


def _read_pid(fd: int) -> str:
    try:
        os.lseek(fd, 0, os.SEEK_SET)
        return os.read(fd, 64).decode(errors="replace").strip() or "unknown"
    except OSError:
        return "unknown"


@contextlib.contextmanager
def output_lock(folder: Path):
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
def claim_output(folder: Path):
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


# ---------------------------------------------------------------- staging and debris


class Staging:
    """A `.cptq-tmp-*` work folder beside `folder`, removed on exit; `out` is the new output folder."""

    def __init__(self, folder: Path):
        self.folder = Path(os.path.abspath(folder))
        base = self.folder.parent if _writable(self.folder.parent) else self.folder
        self._fd = None
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

    def __enter__(self) -> "Staging":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        shutil.rmtree(self.root, ignore_errors=True)
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None


def _staging_folders(folder: Path) -> list[Path]:
    bases = [folder.parent] + ([folder] if folder.is_dir() else [])
    found = []
    for base in bases:
        with contextlib.suppress(OSError):
            found += [p for p in base.iterdir() if p.name.startswith(STAGING_PREFIX) and p.is_dir()
                      and not p.is_symlink()]
    return found


def remove_debris(folder: Path) -> list[Path]:
    """Remove the staging folders of dead runs beside (or in) `folder`; a commit they left half done is
    rolled back first. Returns what was removed."""
    folder = Path(os.path.abspath(folder))
    removed = []
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
            journal = _read_journal(root)
            if journal is not None:
                if Path(journal["target"]) != folder:
                    continue  # another folder's half-done commit: its own next run rolls it back
                rollback(root, journal)
            shutil.rmtree(root, ignore_errors=True)
            removed.append(root)
        finally:
            os.close(fd)
    return removed


# ---------------------------------------------------------------- commit


def _read_journal(root: Path) -> dict | None:
    try:
        return json.loads((root / JOURNAL).read_text())
    except (OSError, ValueError):
        return None


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    else:
        path.unlink()


def rollback(root: Path, journal: dict) -> None:
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
    global _written
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
        _written = True
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
