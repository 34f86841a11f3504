"""What cptquant trusts in a folder it reads: data, never code; and the files it wrote, only unchanged.

transformers imports the Python files that a folder's `auto_map` names (config.json,
tokenizer_config.json) when `trust_remote_code` is on, downloads them when the entry names another
repository, and asks "[y/N]" on a terminal when the flag is not given at all. cptquant therefore
passes the flag explicitly to every Auto* loader, and refuses a folder that names custom code before
any loader runs unless the command line itself said --trust-remote-code. Nothing read from a folder
(a report's `source` or `trust_remote_code`) can turn code execution or a download on.

An export's report records the sha256 of every file it describes; `cptq verify` recomputes them and
names a file that changed since (a model file swapped, a config edited) instead of measuring it.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from .errors import CptqError

# The files whose `auto_map` makes transformers import code.
CODE_MAP_FILES = ("config.json", "tokenizer_config.json")
IN_MEMORY = "in-memory"


def custom_code_refs(folder: Path) -> dict[str, list[str]]:
    """{file name: the classes its `auto_map` names} for each file of `folder` that names custom code."""
    found: dict[str, list[str]] = {}
    for name in CODE_MAP_FILES:
        path = Path(folder) / name
        if not path.is_file():
            continue
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError):
            raise CptqError(f"{path} is not readable JSON") from None
        auto_map = data.get("auto_map") if isinstance(data, dict) else None
        if auto_map:
            values = auto_map.values() if isinstance(auto_map, dict) else [auto_map]
            classes = [v for value in values for v in (value if isinstance(value, list) else [value]) if v]
            found[name] = sorted({str(c) for c in classes}) or ["auto_map"]
    return found


def refuse_custom_code(folder: Path, trust_remote_code: bool, what: str = "") -> None:
    """Raise unless `folder` names no custom code or the command line trusted it."""
    if trust_remote_code:
        return
    refs = custom_code_refs(folder)
    if refs:
        name, classes = next(iter(refs.items()))
        shown = ", ".join(classes[:3]) + (" …" if len(classes) > 3 else "")
        raise CptqError(f"{what or folder}: {name} names custom code ({shown}), which cptquant never runs "
                        "unless the command line says --trust-remote-code")


def looks_like_path(source: str) -> bool:
    """A path rather than an "org/name" hub id (which has at most one slash and no leading . / ~)."""
    return source.startswith((".", "/", "~")) or source.count("/") > 1 or Path(source).exists()


def baseline_source(report_source: str | None, cli_source: str | None, trust_remote_code: bool,
                    problem: str) -> str:
    """Where `cptq verify` may reload the model from to rebuild missing baselines.

    The command line's --source is followed as given (a hub id may download, the user asked for it).
    The report's `source` is followed silently only when it is a local folder that names no custom
    code; anything else needs --source on the command line, and the report's value is only a hint.
    `problem` says what is wrong with the cache (for the one-line error).
    """
    if cli_source:
        folder = Path(cli_source).expanduser()
        if folder.is_dir():
            refuse_custom_code(folder, trust_remote_code, f"--source {cli_source}")
        return cli_source
    if not report_source or report_source == IN_MEMORY:
        raise CptqError(f"{problem} and cannot be rebuilt: the model came from memory, not a folder or hub id; "
                        "export again, or give --source MODEL")
    folder = Path(report_source).expanduser()
    if folder.is_dir():
        if custom_code_refs(folder):
            raise CptqError(f"{problem}; the report's source {report_source} names custom code, which is never "
                            f"followed from a report: give --source {report_source} --trust-remote-code "
                            "if you trust it")
        return report_source
    if looks_like_path(report_source):
        return report_source  # a folder that is gone: loading it says so, and downloads nothing
    raise CptqError(f"{problem}; rebuilding it needs the model: give --source MODEL (the report names the hub "
                    f"model {report_source!r}; cptq verify never downloads on a report's word)")


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def check_file_hashes(folder: Path, hashes: object, report_path: Path) -> None:
    """Every file the report describes is there, unchanged. Reports from before hashes have none to check."""
    if hashes is None:
        return
    if not isinstance(hashes, dict):
        raise CptqError(f"{report_path}: 'sha256' must map file names to hashes")
    for name, digest in sorted(hashes.items()):
        if not isinstance(name, str) or name in ("", ".", "..") or name != Path(name).name:
            raise CptqError(f"{report_path}: 'sha256' names {name!r}, which is not a file of the folder")
        path = Path(folder) / name
        if not path.is_file():
            raise CptqError(f"{path} is missing; the export's report describes it (re-export, or restore the file)")
        if file_sha256(path) != digest:
            raise CptqError(f"{path} changed since the export: its sha256 is not the one in {report_path.name} "
                            "(re-export, or restore the file)")
