"""SIGTERM, SIGHUP and SIGINT during a command: an exception every `finally` cleans up after, held while an
output is being moved into place, and one line with exit code 128 + the signal outside a command."""

from __future__ import annotations

import contextlib
import os
import signal
import sys
import threading
import time
from collections.abc import Iterator
from types import FrameType

PAUSE_ENV = "CPTQ_TEST_PAUSE_AT"  # test hook: sleep at this named point (see pause_point)
HANDLED_SIGNALS = tuple(s for s in (getattr(signal, "SIGTERM", None), getattr(signal, "SIGHUP", None),
                                    signal.SIGINT) if s is not None)


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


def _on_signal(signum: int, _frame: FrameType | None) -> None:
    if _held:
        _pending.append(signum)
        return
    raise Interrupted(signum, written=_written)


def _on_startup_signal(signum: int, _frame: FrameType | None) -> None:
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
def handle_signals() -> Iterator[None]:
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
def held_signals() -> Iterator[None]:
    """Signals arriving inside are recorded; call raise_if_interrupted() where stopping is safe."""
    global _held
    _held += 1
    try:
        yield
    finally:
        _held -= 1


@contextlib.contextmanager
def committing() -> Iterator[None]:
    """Around the moves that put an output in place: signals wait until they are done (or rolled back);
    one that arrived meanwhile is raised afterwards as Interrupted(written=True)."""
    with held_signals():
        yield
    if _pending and not _held:
        signum = _pending[0]
        _pending.clear()
        raise Interrupted(signum, written=True)


def mark_written() -> None:
    """This command's output is in place: a later signal says so instead of "nothing written"."""
    global _written
    _written = True


def pause_point(name: str) -> None:
    """Test hook: with CPTQ_TEST_PAUSE_AT=name, say so on stderr and wait (up to 2 minutes) for a signal."""
    if os.environ.get(PAUSE_ENV) != name:
        return
    print(f"cptq-test: paused at {name}", file=sys.stderr, flush=True)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        time.sleep(0.02)
        raise_if_interrupted()
