"""What `cptq verify` checks of an export folder before any model runs (its files, hashes, custom code), and the
FP32/FP16 baselines it measures against: the exporter's cache, rebuilt from the report's source when missing."""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import onnx

from ..errors import CptqError, first_line
from ..model_loading import TASK_SEQ2SEQ, TASKS, LoadedModel
from ..onnx_io.onnx_export import SEQ2SEQ_FILES
from ..progress import console
from ..safety import check_file_hashes, refuse_custom_code

MODEL_FILE = "model.onnx"
REPORT_FILE = "model.report.json"
BASELINES = ("fp32", "fp16")


@dataclass
class OutputFolder:
    folder: Path
    model: Path
    report: dict[str, Any]
    config: Any
    task: str
    signature: tuple[tuple[str, ...], ...] = ()  # (input names, output names) of model.onnx
    trust_remote_code: bool = False  # from the command line only, never from the folder or its report


def check_external_data(model: onnx.ModelProto, model_path: Path) -> None:
    """Every external tensor must live in a file inside the model's folder, present and long enough.
    Checked on the proto before ONNX Runtime opens anything: a location like ../../etc/passwd or an
    absolute path would make the runtime read outside the folder it was given."""
    from onnx.external_data_helper import ExternalDataInfo, _get_all_tensors, uses_external_data

    folder = model_path.parent.resolve()
    for tensor in _get_all_tensors(model):
        if not uses_external_data(tensor):
            continue
        info = ExternalDataInfo(tensor)
        location = info.location or ""
        if not location or os.path.isabs(location) or Path(location).drive:
            raise CptqError(f"{model_path}: tensor {tensor.name!r} points to external data at {location!r}, "
                            "outside the model's folder; refusing to load it")
        target = (folder / location).resolve()
        if folder != target and folder not in target.parents:
            raise CptqError(f"{model_path}: tensor {tensor.name!r} points to external data at {location!r}, "
                            "outside the model's folder; refusing to load it")
        if not target.is_file():
            raise CptqError(f"{model_path}: external data file {location!r} is missing (tensor {tensor.name!r})")
        end = (info.offset or 0) + (info.length or 0)
        if end > target.stat().st_size:
            raise CptqError(f"{model_path}: external data file {location!r} is truncated "
                            f"(tensor {tensor.name!r} needs bytes up to {end}, the file has {target.stat().st_size})")


def check_model_file(model_path: Path) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """The model file parses as ONNX and its external data is safe and complete.
    Returns its graph's input and output names (what a baseline must share with the candidate)."""
    if not model_path.is_file():
        raise CptqError(f"{model_path} not found")
    try:
        model = onnx.load(str(model_path), load_external_data=False)
    except Exception as exc:
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise CptqError(f"{model_path} is not a valid ONNX model ({first})") from None
    if not model.graph.node:
        raise CptqError(f"{model_path} is not a valid ONNX model (its graph has no nodes)")
    check_external_data(model, model_path)
    return tuple(i.name for i in model.graph.input), tuple(o.name for o in model.graph.output)


def model_files(model_path: Path, task: str) -> list[Path]:
    """The ONNX files of the variant named by `model_path`: that file, or an encoder-decoder export's three
    files beside it (optimum's names; the export, its report and its baseline cache keep the model's name)."""
    if task == TASK_SEQ2SEQ:
        return [model_path.parent / name for name in SEQ2SEQ_FILES]
    return [model_path]


def check_variant(model_path: Path, task: str) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """check_model_file over every file of a variant; several files' input and output names are each
    prefixed by their file's name, so that two variants match only file by file."""
    files = model_files(model_path, task)
    if len(files) == 1:
        return check_model_file(files[0])
    inputs: list[str] = []
    outputs: list[str] = []
    for path in files:
        file_inputs, file_outputs = check_model_file(path)
        inputs += [f"{path.name}:{name}" for name in file_inputs]
        outputs += [f"{path.name}:{name}" for name in file_outputs]
    return tuple(inputs), tuple(outputs)


def _export_files(folder: Path) -> tuple[Path, Path]:
    """(model, report) of the export in `folder`: model.onnx and model.report.json, or else the one
    NAME.onnx with a NAME.report.json beside it (what `cptq-export -o folder/NAME.onnx` writes)."""
    default = (folder / MODEL_FILE, folder / REPORT_FILE)
    if default[0].exists() or default[1].exists():
        return default
    pairs = [(folder / (r.name[: -len(".report.json")] + ".onnx"), r) for r in sorted(folder.glob("*.report.json"))]
    pairs = [pair for pair in pairs if pair[0].is_file() or (folder / SEQ2SEQ_FILES[0]).is_file()]
    if len(pairs) > 1:
        raise CptqError(f"{folder} holds several exports ({', '.join(m.name for m, _ in pairs)}); "
                        "give the .onnx file of the one to verify")
    return pairs[0] if pairs else default


def inspect_output_folder(folder: Path, loaded: LoadedModel | None = None, trust_remote_code: bool = False) -> OutputFolder:
    """`folder` is an export's output folder, or the .onnx file of an export in it.
    `trust_remote_code` comes from the command line; custom code a folder names is refused without it."""
    folder = Path(folder).expanduser()
    if folder.suffix == ".onnx" and folder.is_file():
        model_path, folder = folder, folder.parent
        report_path = folder / (model_path.name[: -len(".onnx")] + ".report.json")
    elif not folder.exists():
        raise CptqError(f"{folder} not found; give the output folder of cptq-export")
    elif not folder.is_dir():
        raise CptqError(f"{folder} is not a folder; give the output folder of cptq-export")
    else:
        model_path, report_path = _export_files(folder)
    refuse_custom_code(folder, trust_remote_code)  # before any transformers loader could import or prompt
    if loaded is None:  # during an export the report is written after this check
        if not report_path.is_file():
            missing = [p.name for p in (model_path, report_path) if not p.is_file()]
            raise CptqError(f"{folder} is not a cptquant output folder (missing {', '.join(missing)})")
        try:
            report = json.loads(report_path.read_text())
            task = report["task"]
        except (json.JSONDecodeError, KeyError, TypeError):
            raise CptqError(f"{report_path} is not a cptquant report (unreadable JSON or no \"task\")") from None
        if task not in TASKS:
            raise CptqError(f"{report_path}: unknown task {task!r}")
        missing = [p.name for p in model_files(model_path, task) if not p.is_file()]
        if missing:
            raise CptqError(f"{folder} is not a cptquant output folder (missing {', '.join(missing)})")
    else:
        report = json.loads(report_path.read_text()) if report_path.is_file() else {}
        task = loaded.task
    signature = check_variant(model_path, task)
    if loaded is not None:
        config = loaded.config
    else:
        check_file_hashes(folder, report.get("sha256"), report_path)  # before any of them is read as a model
        if not (folder / "config.json").is_file():
            raise CptqError(f"{folder} is not a cptquant output folder (missing config.json)")
        from transformers import AutoConfig

        try:
            config = AutoConfig.from_pretrained(str(folder), trust_remote_code=trust_remote_code)
        except Exception as exc:
            raise CptqError(f"{folder}/config.json is unreadable: {first_line(exc, type(exc).__name__)}") from None
    return OutputFolder(folder, model_path, report, config, task, signature, trust_remote_code)


def ensure_baselines(out: OutputFolder, loaded: LoadedModel | None = None, progress: bool = True,
                     source: str | None = None) -> dict[str, Path]:
    """The FP32 and FP16 baselines from the exporter's cache; rebuilt from the model's source when missing,
    unreadable, or not this export's (other inputs or outputs, or another fingerprint of weights and settings).

    `source` (the command line's --source) says where to reload the model from; without it the report's
    source is followed only when safe.baseline_source allows it (a local folder naming no custom code)."""
    from ..onnx_io.baselines import (
        baseline_dir,
        baseline_fingerprint,
        remove_legacy_baselines,
        write_fingerprint,
        write_fp16,
    )
    from ..onnx_io.onnx_export import export_onnx
    from ..output_folder import Staging, claim_output, replace_dir

    remove_legacy_baselines(out.folder, out.model.name)  # an older cptquant's cache of this export: unused
    cache = baseline_dir(out.folder, out.model.name)
    paths = {name: cache / name / MODEL_FILE for name in BASELINES}
    problem = _cache_problem(cache, out)
    if problem is None and _stale_or_unreadable(paths["fp16"], out) is None:
        return paths
    try:
        with claim_output(cache):  # one rebuild of a cache at a time; staged, then swapped in whole
            if problem is None:  # the FP32 baseline is good: only the FP16 one is made again, from it
                with Staging(cache) as staging:
                    write_fp16(cache / "fp32", staging.out / "fp16")
                    replace_dir(staging, staging.out / "fp16", cache / "fp16")
                return paths
            if loaded is None:
                from ..model_loading import load_model
                from ..safety import baseline_source

                source = baseline_source(out.report.get("source"), source, out.trust_remote_code,
                                         f"baseline cache {cache} {problem}")
                if progress:
                    console.print(f"rebuilding the FP32/FP16 baselines from {source} …", markup=False)
                try:
                    loaded = load_model(source, out.task, out.trust_remote_code)
                except CptqError as exc:
                    raise CptqError(f"baseline cache {cache} {problem} and cannot be rebuilt from {source}: {exc}") \
                        from None
            fingerprint = baseline_fingerprint(loaded)
            expected = out.report.get("baseline_fingerprint")
            if expected and fingerprint != expected:
                raise CptqError(f"baseline cache {cache} {problem}, and {loaded.source} is not the model this export "
                                f"was made from (fingerprint of its weights and task {fingerprint[:12]}, the report's "
                                f"{str(expected)[:12]}); give --source the original model")
            with Staging(cache) as staging:
                new = staging.out
                export_onnx(loaded, new / "fp32")
                write_fp16(new / "fp32", new / "fp16")
                write_fingerprint(new, fingerprint)
                replace_dir(staging, new, cache)
    except OSError as exc:
        raise CptqError(f"cannot write the baseline cache {cache}: {exc.strerror or exc}") from None
    for name, path in paths.items():
        why = _stale_or_unreadable(path, out)
        if why:
            raise CptqError(f"the {name} baseline {path} does not match {out.model} ({why})")
    return paths


def _cache_problem(cache: Path, out: OutputFolder) -> str | None:
    """Why the cached FP32 baseline cannot serve this export, or None. A cache left by another model (an
    output folder of the same name, a folder copied next to one) must never be compared with silently:
    its inputs and outputs, and then the fingerprint recorded with it, must be this export's."""
    from ..onnx_io.baselines import read_fingerprint

    fp32 = cache / "fp32" / MODEL_FILE
    if not all(path.is_file() for path in model_files(fp32, out.task)):
        return "is missing"
    why = _stale_or_unreadable(fp32, out)
    if why:
        return f"does not match this export ({why})"
    expected = out.report.get("baseline_fingerprint")
    if expected:  # reports from before fingerprints: the inputs and outputs are all there is to compare
        recorded = read_fingerprint(cache)
        if recorded is None:
            return "has no fingerprint to compare with this export's"
        if recorded != expected:
            return f"belongs to another model or export settings (fingerprint {recorded[:12]}, this export's {str(expected)[:12]})"
    return None


def _stale_or_unreadable(path: Path, out: OutputFolder) -> str | None:
    if not all(p.is_file() for p in model_files(path, out.task)):
        return "missing"
    try:
        return _stale_reason(path, out)
    except CptqError as exc:  # a cache file cut short by a kill, or damaged: made again
        return str(exc).replace(str(path), path.name)


def _stale_reason(path: Path, out: OutputFolder) -> str | None:
    """Why the baseline at `path` is not one of this export's model, or None when its inputs and outputs match."""
    inputs, outputs = check_variant(path, out.task)
    if not out.signature or (set(inputs), set(outputs)) == (set(out.signature[0]), set(out.signature[1])):
        return None
    if set(inputs) != set(out.signature[0]):
        return f"inputs {_names(inputs)} instead of {_names(out.signature[0])}"
    return f"outputs {_names(outputs)} instead of {_names(out.signature[1])}"


def _names(names: Sequence[str], keep: int = 4) -> str:
    return ", ".join(names[:keep]) + (f" … ({len(names)} in all)" if len(names) > keep else "")

