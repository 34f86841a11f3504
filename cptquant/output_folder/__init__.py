"""Writing an output folder safely: one writer at a time, all or nothing, nothing left behind.

One module per concern; this package re-exports their public names, which is where the rest of cptquant
imports them from:
- targets.py: what an export owns in its folder, and the checks of `-o` before any work (`check_target`);
- lock.py: `claim_output(folder)`, the exclusive lock on `.NAME.cptq-lock` held from before any heavy work to
  the end, then the debris of dead runs cleared;
- staging.py: `Staging`, the `.cptq-tmp-*` work folder every file is written into, and `commit`, which puts it
  in place all at once (a journal rolls back a half-done commit);
- debris.py: `remove_debris`, the staging folders of dead runs;
- signals.py: SIGTERM/SIGHUP/SIGINT as `Interrupted` (a BaseException, so no `except Exception` swallows it;
  held during a commit), and one line with exit code 128 + the signal outside a command;
- work_files.py: the names cptquant keeps for its own work files.
"""

from __future__ import annotations

from .debris import UNOWNED_DEBRIS_AGE_S, remove_debris
from .lock import claim_output, lock_path, output_lock
from .signals import (
                      HANDLED_SIGNALS,
                      PAUSE_ENV,
                      Interrupted,
                      committing,
                      handle_signals,
                      held_signals,
                      install_startup_handlers,
                      interrupted_message,
                      pause_point,
                      raise_if_interrupted,
)
from .staging import Staging, commit, replace_dir, rollback
from .targets import (
                      SIDE_FILES,
                      VERIFY_CANDIDATE,
                      VERIFY_REPORT_DIR,
                      check_target,
                      check_writable,
                      existing_files,
                      output_path,
                      owned_by_export,
                      owned_files,
                      refuse_folders_in_place,
                      refuse_replacing,
)
from .work_files import BACKUP, CACHE_DIR_NAME, JOURNAL, LOCK_SUFFIX, OWNER_LOCK, STAGED, STAGING_PREFIX

__all__ = [
    "BACKUP", "CACHE_DIR_NAME", "HANDLED_SIGNALS", "JOURNAL", "LOCK_SUFFIX", "OWNER_LOCK", "PAUSE_ENV", "SIDE_FILES",
    "STAGED", "STAGING_PREFIX", "UNOWNED_DEBRIS_AGE_S", "VERIFY_CANDIDATE", "VERIFY_REPORT_DIR", "Interrupted",
    "Staging", "check_target", "check_writable", "claim_output", "commit", "committing", "existing_files",
    "handle_signals", "held_signals", "install_startup_handlers", "interrupted_message", "lock_path", "output_lock",
    "output_path", "owned_by_export", "owned_files", "pause_point", "raise_if_interrupted", "refuse_folders_in_place",
    "refuse_replacing", "remove_debris", "replace_dir", "rollback",
]
