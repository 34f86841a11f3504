"""What an export owns in its output folder, and every check of `-o` that can refuse before any work.

An export into `folder/NAME.onnx` owns NAME.onnx and its external data (NAME.onnx*), NAME.plan.json,
NAME.report.json, and the side files it writes (config.json, generation_config.json, tokenizer files). Any of
those already present is refused without --force; with --force exactly those are replaced. Other files are
never touched. The source model's own folder is refused even with --force.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable
from pathlib import Path

from ..errors import CptqError
from .work_files import CACHE_DIR_NAME, LOCK_SUFFIX, STAGING_PREFIX

# A model folder's tokenizer files (any of them present: the folder means to have a tokenizer).
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
                   "vocab.txt", "vocab.json", "merges.txt", "tokenizer.model", "spiece.model",
                   "sentencepiece.bpe.model")
# Side files an export writes beside NAME.onnx (optimum copies config, generation config and tokenizer).
SIDE_FILES = ("config.json", "generation_config.json", *TOKENIZER_FILES, "chat_template.jinja",
              "chat_template.json", "genai_config.json")
# `cptq verify`'s reports inside an output folder and its name for the model it checked: a forced re-export
# removes the reports of the model it replaces (named here, below both the exporter and the runtimes).
VERIFY_REPORT_DIR = "verify"
VERIFY_CANDIDATE = "quantized"


def output_path(path: str | os.PathLike[str]) -> Path:
    """`-o` as every check and the writer see it. The writer works on absolute paths, where `a/missing/..` is
    `a`; the checks must see that same folder (the OS, asked about `a/missing/..`, says it does not exist, and
    an existing folder's files would be replaced without --force)."""
    if not str(path).strip():  # Path("") is ".": the current folder would take the files
        raise CptqError("the output path is empty; give a folder or a .onnx file")
    return Path(os.path.normpath(Path(path).expanduser()))


def owned_by_export(name: str, model_file: str) -> bool:
    """Whether a file named `name` in the output folder is one an export to `model_file` writes."""
    stem = model_file[: -len(".onnx")]
    return (name.startswith(model_file) or name in (f"{stem}.plan.json", f"{stem}.report.json")
            or name in SIDE_FILES)


def existing_files(folder: Path, names: Iterable[str]) -> list[str]:
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
    if model_file.startswith(STAGING_PREFIX):  # a later run would take it for a dead run's debris
        raise CptqError(f"cannot write {model_file}: names starting with {STAGING_PREFIX} are cptquant's own work "
                        "files; choose another -o")
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


def refuse_folders_in_place(folder: Path, owned: Callable[[str], bool]) -> None:
    """A folder where a command writes a file is not an earlier output's: never replaced, even with --force
    (moving it aside and deleting it would take everything in it)."""
    folders = [name for name in owned_files(folder, owned)
               if (folder / name).is_dir() and not (folder / name).is_symlink()]
    if folders:
        raise CptqError(f"{folder} has folders where cptquant writes files: {', '.join(folders)}; choose another -o")


def owned_files(folder: Path, owned: Callable[[str], bool]) -> list[str]:
    """The entries of `folder` (when it exists) for which `owned(name)` holds, sorted."""
    return sorted(p.name for p in folder.iterdir() if owned(p.name)) if folder.is_dir() else []


def refuse_replacing(folder: Path, names: list[str]) -> None:
    if names:
        raise CptqError(f"output files already exist in {folder}: {', '.join(names)} (use --force to replace them)")
