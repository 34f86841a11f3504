"""Where an export goes (`-o`), and putting the staged export in place: all or nothing, then its baselines
into the cache. The checks and the moves themselves are cptquant/output_folder/'s."""

from __future__ import annotations

import json
import os
import sys
from dataclasses import dataclass
from pathlib import Path

from ..errors import CptqError
from ..onnx_io.baselines import baseline_dir, remove_legacy_baselines, write_fingerprint
from ..onnx_io.onnx_export import MODEL_FILE
from ..output_folder import (
    VERIFY_CANDIDATE,
    VERIFY_REPORT_DIR,
    Staging,
    check_target,
    commit,
    committing,
    output_path,
    owned_by_export,
    replace_dir,
)


@dataclass
class OutputPaths:
    folder: Path
    model: Path

    @property
    def stem(self) -> str:
        return self.model.name[: -len(".onnx")]

    @property
    def plan(self) -> Path:
        return self.folder / f"{self.stem}.plan.json"

    @property
    def report(self) -> Path:
        return self.folder / f"{self.stem}.report.json"


def resolve_output(out: Path, force: bool, source: str | None = None) -> OutputPaths:
    """`out/model.onnx` names the file; a path without .onnx names the folder (model.onnx inside).
    Refuses what output_folder.check_target refuses (`source`: the model's folder, never written into)."""
    out = output_path(out)
    paths = OutputPaths(out.parent, out) if out.suffix == ".onnx" else OutputPaths(out, out / MODEL_FILE)
    check_target(paths.folder, paths.model.name, force, source)
    return paths


def install(staging: Staging, paths: OutputPaths, force: bool, fp32_dir: Path, fp16_dir: Path,
            fingerprint: str) -> None:
    """The staged output into place (all or nothing), then its baselines into the cache."""
    new = sorted(p.name for p in staging.out.iterdir())
    clashes = [name for name in new if os.path.lexists(paths.folder / name)]
    if clashes and not force:  # files the early check could not know of (a side file it has no name for)
        raise CptqError(f"output files already exist in {paths.folder}: {', '.join(clashes)} "
                        "(use --force to replace them)")
    cache = staging.root / "cache"
    cache.mkdir()
    fp32_dir.rename(cache / "fp32")
    fp16_dir.rename(cache / "fp16")
    write_fingerprint(cache, fingerprint)
    with committing():
        commit(staging, _stale_entries(paths, new) if force else ())
        try:
            replace_dir(staging, cache, baseline_dir(paths.folder, paths.model.name))
        except OSError as exc:  # the export is in place; cptq verify rebuilds a missing cache
            print(f"warning: the baseline cache was not written ({exc.strerror or exc})", file=sys.stderr)
    remove_legacy_baselines(paths.folder, paths.model.name)


def _stale_entries(paths: OutputPaths, new: list[str]) -> tuple[str, ...]:
    """What a forced re-export removes besides the files it replaces: the older export's own files that the
    new one does not write (an external data file, a tokenizer file), and `cptq verify`'s reports of it."""
    if not paths.folder.is_dir():
        return ()
    stale = [p.name for p in paths.folder.iterdir()
             if p.name.startswith(paths.model.name) and p.name not in new]
    try:
        old_files = json.loads(paths.report.read_text()).get("files", {})
    except (OSError, ValueError, AttributeError):
        old_files = {}
    if isinstance(old_files, dict):  # only names an export owns: a report is data, not a list of things to delete
        stale += [name for name in old_files if isinstance(name, str) and name == Path(name).name
                  and owned_by_export(name, paths.model.name) and name not in new
                  and (paths.folder / name).is_file()]
    report = paths.folder / VERIFY_REPORT_DIR / "report.json"
    try:
        verified = json.loads(report.read_text()).get("variants", {}).get(VERIFY_CANDIDATE)
    except (OSError, ValueError, AttributeError):
        verified = None
    if verified and Path(verified).resolve() == paths.model.resolve():
        stale.append(VERIFY_REPORT_DIR)  # its reports describe a model that is being replaced
    return tuple(dict.fromkeys(stale))
