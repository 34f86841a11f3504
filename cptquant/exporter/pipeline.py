"""The export flow: torch model -> layer graph -> plan -> ONNX -> lowering -> checks -> report.

Everything is written into a staging folder beside the output and moved into place at the end, all
or nothing, under a lock on the output folder (cptquant/output_folder/): a failed or interrupted
export leaves nothing partial behind and never touches an existing output.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import sys
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Protocol

import numpy as np

from ..errors import CptqError
from ..layer_graph import ROLE_EMBEDDING, LayerGraph, build_layer_graph
from ..model_loading import TASK_CAUSAL_LM, TASK_SEQ2SEQ, LoadedModel
from ..output_folder import (VERIFY_CANDIDATE, VERIFY_REPORT_DIR, Staging, check_target, claim_output, commit,
                             committing, output_path, owned_by_export, replace_dir)
from ..plan import Plan, validate_plan
from ..progress import Steps
from ..quant.storage import FORMAT_AUTO, FORMAT_DYNAMIC, FORMAT_NBITS, FORMAT_QDQ
from ..quant.weight_quantizers import ALGORITHMS, GPTQ_BITS, Gptq, RoundToNearest
from ..safety import file_sha256
from ..seq2seq_inputs import decoder_reads_input
from ..onnx_io.baselines import (baseline_dir, baseline_fingerprint, remove_legacy_baselines, side_files,
                                 write_fingerprint, write_fp16)
from .attention_fusion import ATTENTION_CHOICES, ATTENTION_GQA, AttentionChoice, attention_for_export
from .genai_config import write_genai_config
from .graph_check import GraphCheck, check_kernels
from .layer_map import LayerMap, build_layer_map
from .lowering import KernelChoice, lower_model
from ..onnx_io.onnx_export import MODEL_FILE, export_onnx, load_onnx, load_onnx_lazily, onnx_files, save_onnx
from .parity import measure_parity, measure_seq2seq_parity
from .report import build_report, files_size, write_report

PlanFactory = Callable[[LoadedModel, LayerGraph], Plan]
# The short verification the API (api.py) chains into an export (runtimes/verify.py): the staged model, the model,
# the staged FP32/FP16 baselines -> the figures the report carries.
Verifier = Callable[[Path, LoadedModel, dict[str, Path]], dict]


class FormatChoice(Protocol):
    """`--format auto`'s answer (cptquant/format_choice.py): the format and what was measured, for the report."""

    format: str

    def to_dict(self) -> dict: ...


# `--format auto`: the model, its FP32 proto, layer graph, layer uses, the FP32 folder, a scratch folder -> the
# measured choice. The command hands it over, so that the exporter times no runtime itself.
FormatChooser = Callable[[LoadedModel, Any, LayerGraph, Any, Path, Path], FormatChoice]


class Measurements(Protocol):
    """What the lowering reads from calibration text; the API builds it (passes/measurements.py), so the
    exporter runs no pass. `calib` / `text_field` name the text for the report."""

    @property
    def calib(self) -> str | None: ...

    @property
    def text_field(self) -> str: ...

    def hessians(self, loaded: LoadedModel, graph: LayerGraph, names: list[str],
                 progress: bool) -> Mapping[str, np.ndarray]: ...

    def input_peaks(self, loaded: LoadedModel, graph: LayerGraph, names: list[str],
                    progress: bool) -> dict[str, np.ndarray]: ...


NOT_IN_ONNX = ("no initializer of the exported graph holds its weight (unused by this task's outputs, or folded "
               "into another constant by the exporter)")
READ_THROUGH = "its weight is tied to {}, which reads it in the ONNX files (quantized as planned there)"
NO_SEQ2SEQ_VERIFY = "the short verification measures single-file exports; an encoder-decoder export has none yet"

# --format dynamic, --outlier-ratio R: an input channel whose calibration peak p is above R times the layer's
# median channel peak m is scaled down by sqrt(p / m) before the int8 product (its weight row up by as much).
# MiniLM's FFN inputs have 1-4 such channels (peaks ~28 against a median of ~1.9). At 6 the one extra Mul per
# such layer cost MiniLM 1-3 % of latency and won back most of the quality that per-tensor activations lose.
DEFAULT_OUTLIER_RATIO = 6.0


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


@dataclass
class ExportResult:
    paths: OutputPaths
    plan: Plan
    report: dict  # model.report.json as written (ExportReport.to_dict())
    timings: dict[str, float] = field(default_factory=dict)


def resolve_output(out: Path, force: bool, source: str | None = None) -> OutputPaths:
    """`out/model.onnx` names the file; a path without .onnx names the folder (model.onnx inside).
    Refuses what output_folder.check_target refuses (`source`: the model's folder, never written into)."""
    out = output_path(out)
    paths = OutputPaths(out.parent, out) if out.suffix == ".onnx" else OutputPaths(out, out / MODEL_FILE)
    check_target(paths.folder, paths.model.name, force, source)
    return paths


def exported_layer_graph(loaded: LoadedModel, fp32_dir: Path, model_proto=None):
    """The layer graph as the FP32 export realises it, with its layer map.

    Layers the exported graph never reads (a pooler no output needs) are dropped, and the graph
    learns the bytes every plan keeps (graph, biases, norms) so that size budgets are exact.
    """
    model_proto = model_proto if model_proto is not None else load_onnx(fp32_dir / MODEL_FILE)
    graph, layer_maps, _ = exported_files_layer_graph(loaded, fp32_dir, {MODEL_FILE: model_proto})
    return graph, layer_maps[MODEL_FILE]


def exported_files_layer_graph(loaded: LoadedModel, fp32_dir: Path, protos: dict[str, Any],
                               base_dirs: dict[str, Path | None] | None = None):
    """The layer graph over every ONNX file of the export (one, or a seq2seq model's encoder and decoders),
    each file's layer map, and the layers no file reads. One plan covers the graph; each file is lowered
    with the uses its own map found. A layer some file reads is planned; a weight several files store (the
    shared embedding, decoder layers in both decoders) is quantized alike in each, and counted in each.
    `base_dirs`: per file, where its external weights lie when its proto was loaded without them."""
    graph = build_layer_graph(loaded.model)
    base_dirs = base_dirs or {}
    layer_maps = {name: build_layer_map(proto, loaded.model, graph, base_dir=base_dirs.get(name))
                  for name, proto in protos.items()}
    used = {name for layer_map in layer_maps.values() for name in layer_map.mapped}
    # A tie's owner stays planned when its partners alone read the weight (BART's model.shared, read as the
    # encoder's and decoder's token embeddings): the passes give every tied layer its owner's bits.
    used |= {layer.tied_to for layer in graph.layers if layer.tied_to and layer.name in used}
    unused = [layer.name for layer in graph.layers if layer.name not in used]
    through: dict[str, str] = {}  # a tied layer no file reads by its own name -> the partner the first file reads it through
    for layer_map in layer_maps.values():
        for name, partner in layer_map.read_through.items():
            through.setdefault(name, partner)
    absent = [name for name in unused if name not in through]
    graph.layers = [layer for layer in graph.layers if layer.name in used]
    graph.unquantizable.update({name: READ_THROUGH.format(through[name]) if name in through else NOT_IN_ONNX
                                for name in unused})
    graph.fixed_bytes = sum(_fixed_bytes(fp32_dir, name, proto, layer_maps[name]) for name, proto in protos.items())
    graph.heads_reading_table = set().union(*(_heads_reading_table(graph, m) for m in layer_maps.values()))
    return graph, layer_maps, absent


def _heads_reading_table(graph, layer_map) -> set[str]:
    """Tied heads whose MatMul reads the initializer their embedding's Gather reads (lowering/context.py's
    tied_table_sites shares their codes; a head with its own stored copy is written on its own)."""
    uses = layer_map.uses()
    heads = set()
    for layer in graph.layers:
        if layer.tied_to and layer.name in uses and layer.tied_to in uses:
            tables = {u.initializer for u in uses[layer.tied_to] if u.op_type == "Gather"}
            if any(u.op_type == "MatMul" and u.via_transpose and u.initializer in tables for u in uses[layer.name]):
                heads.add(layer.name)
    return heads


def export_quantized(loaded: LoadedModel, make_plan: PlanFactory, out: Path, force: bool = False,
                     progress: bool = True, fmt: str = FORMAT_QDQ, report_extras: dict | None = None,
                     verify: Verifier | None = None, algorithm: str = "rtn",
                     calibration: Measurements | None = None,
                     outlier_ratio: float = DEFAULT_OUTLIER_RATIO,
                     choose_format: FormatChooser | None = None, attention: str = ATTENTION_GQA) -> ExportResult:
    """Export `loaded` with the plan `make_plan` gives; `report_extras` (filled by then) joins the report.

    `algorithm` "gptq" chooses 4-bit MatMul codes with GPTQ, from input Hessians that `calibration`
    measures (passes.measurements.CalibrationMeasurements). With `verify` (runtimes/verify.py's short
    verification), its CPU figures against the FP32/FP16 baselines join the report too. With `fmt` dynamic
    and `outlier_ratio` > 0, outlier input channels (peaks `calibration` measures) are scaled down before
    each layer's int8 product. With `fmt` auto, `choose_format` measures the format on the FP32 export.
    `attention` gqa: a Llama/Mistral/Qwen2 decoder's attention becomes GroupQueryAttention where it gives the
    FP32 export's outputs (exporter/attention_fusion.py); optimum: kept as optimum wrote it.
    """
    if algorithm not in ALGORITHMS:
        raise CptqError(f"--algorithm must be one of {', '.join(ALGORITHMS)}, not {algorithm!r}")
    if attention not in ATTENTION_CHOICES:
        raise CptqError(f"--attention must be one of {', '.join(ATTENTION_CHOICES)}, not {attention!r}")
    if fmt == FORMAT_AUTO and choose_format is None:
        raise CptqError("--format auto needs a format chooser (cptquant/format_choice.py)")
    paths = resolve_output(out, force, loaded.source)
    timings: dict[str, float] = {}
    # decoder_reads_input: the passes and GPTQ's Hessians feed an encoder-decoder model its input alone
    with claim_output(paths.folder), Staging(paths.folder) as staging, decoder_reads_input(loaded.model):
        tmp = staging.root
        fingerprint = baseline_fingerprint(loaded)  # of the weights the FP32 baseline is exported from
        steps = Steps(["export ONNX (FP32)", "map layers", "plan",
                       "quantize" + (" (GPTQ: calibration + Hessians)" if algorithm == "gptq" else ""),
                       "check kernels", "parity",
                       "FP16 reference"] + (["verify on CPU"] if verify else []) + ["write"], enabled=progress)
        with steps:
            with steps.step(timings):
                fp32_dir = tmp / "fp32"
                export_onnx(loaded, fp32_dir)
                # (name in fp32_dir, name written): one file, or a seq2seq model's files under optimum's names
                files = ([(MODEL_FILE, paths.model.name)] if onnx_files(loaded.task) == (MODEL_FILE,)
                         else [(name, name) for name in onnx_files(loaded.task)])
                # a model over 2 GB: its graph alone; weights are memory-mapped one at a time when read
                lazily = {name: load_onnx_lazily(fp32_dir / name) for name, _ in files}
                protos = {name: proto for name, (proto, _) in lazily.items()}
                base_dirs = {name: base for name, (_, base) in lazily.items()}
                model_proto = protos[files[0][0]]
                opset = next(o.version for o in model_proto.opset_import if o.domain in ("", "ai.onnx"))
            with steps.step(timings):
                graph, layer_maps, absent = exported_files_layer_graph(loaded, fp32_dir, protos, base_dirs)
                format_choice = None
                if fmt == FORMAT_AUTO and choose_format is not None:  # before the plan: a size budget counts
                    first_uses = layer_maps[files[0][0]].uses()  # its bytes; seq2seq models are not measured
                    whole = model_proto if base_dirs[files[0][0]] is None else load_onnx(fp32_dir / files[0][0])
                    format_choice = choose_format(loaded, whole, graph, first_uses, fp32_dir, tmp / "format-probes")
                    del whole
                    fmt = format_choice.format
                fused: AttentionChoice | None = None
                if loaded.task == TASK_CAUSAL_LM and len(files) == 1:  # proved on the FP32 export (a few seconds)
                    fused = attention_for_export(attention, loaded, model_proto, fp32_dir / files[0][0],
                                                 layer_maps[files[0][0]].uses(), base_dirs[files[0][0]], tmp)
                spec = fused.spec if fused is not None else None
            with steps.step(timings):
                plan = make_plan(loaded, graph)
                plan.model = plan.model or loaded.display_name
                validate_plan(plan, graph)
            out_dir = staging.out
            model_path = out_dir / files[0][1]
            quantizer = _weight_quantizer(algorithm, loaded, graph, plan, calibration, progress)
            with steps.step(timings):
                smoothing = (_input_smoothing(loaded, graph, plan, calibration, outlier_ratio, progress)
                             if fmt == FORMAT_DYNAMIC and outlier_ratio > 0 else {})
                per_file = {}  # file -> its layers as lowered
                for name, out_name in files:
                    lowered = lower_model(protos.pop(name), layer_maps[name].uses(), plan, KernelChoice(fmt),
                                          quantizer, smoothing, base_dir=base_dirs[name], attention=spec)
                    per_file[name] = lowered.layers
                    save_onnx(lowered.model, out_dir / out_name)
                    del lowered
                del model_proto
                for side in side_files(fp32_dir):
                    shutil.copy2(side, out_dir / side.name)
            with steps.step(timings):
                checks = {}
                for name, out_name in files:
                    uses, rewritten = layer_maps[name].uses(), per_file[name]
                    graph_check = check_kernels(out_dir / out_name, rewritten)
                    if graph_check.unfused and fmt == FORMAT_QDQ:
                        # Another ORT fusion pre-empted DQ -> MatMul for these layers (e.g. MatMul + Add +
                        # Relu becoming FusedGemm); write MatMulNBits for them, which is what ORT would run.
                        repaired = graph_check.unfused
                        kernels = KernelChoice(fmt, {layer: FORMAT_NBITS for layer in repaired})
                        source, base_dir = load_onnx_lazily(fp32_dir / name)
                        lowered = lower_model(source, uses, plan, kernels, quantizer, smoothing, base_dir=base_dir,
                                              attention=spec)
                        per_file[name] = rewritten = lowered.layers
                        save_onnx(lowered.model, out_dir / out_name)
                        del lowered
                        graph_check = check_kernels(out_dir / out_name, rewritten)
                        graph_check.repaired = repaired
                    checks[name] = graph_check
                graph_check = merge_checks(list(checks.values()))
                rewritten = merge_lowered(list(per_file.values()))
                graph_check.raise_if_unfused()
            with steps.step(timings):
                parity = (measure_seq2seq_parity(loaded, out_dir) if loaded.task == TASK_SEQ2SEQ
                          else measure_parity(loaded, model_path))
            with steps.step(timings):
                fp16_dir = tmp / "fp16"
                write_fp16(fp32_dir, fp16_dir)
            if verify:  # measured on the staged folder: nothing is in place before everything is done
                with steps.step(timings):
                    verification = ({"error": NO_SEQ2SEQ_VERIFY} if loaded.task == TASK_SEQ2SEQ else
                                    _short_verification(verify, model_path, loaded,
                                                        {"fp32": fp32_dir / MODEL_FILE, "fp16": fp16_dir / MODEL_FILE}))
            with steps.step(timings):
                plan_path = out_dir / paths.plan.name
                plan.save(plan_path)
                genai = None
                if loaded.task == TASK_CAUSAL_LM:  # the folder also runs under onnxruntime-genai
                    genai = write_genai_config(out_dir, paths.model.name)
                read_text = (bool(smoothing) or quantizer.used_calibration or "analysis" in (report_extras or {})
                             or any(lp.hot_rows for lp in plan.layers.values()))
                report = build_report(loaded, plan, rewritten, absent, graph.unquantizable, graph_check,
                                      parity, fp32_dir, fp16_dir, timings, fmt, opset, fingerprint,
                                      [name for name, _ in files])
                report.outlier_ratio = outlier_ratio if fmt == FORMAT_DYNAMIC else None
                report.genai_config = genai.name if genai else None
                report.attention = fused.note if fused is not None else None
                report.format_choice = format_choice.to_dict() if format_choice is not None else None
                report.model_files = [out_name for _, out_name in files] if len(files) > 1 else None
                if read_text:  # what `cptq verify --eval` must not overlap (None: the offline corpus)
                    report.calibration_text = {"calib": calibration.calib if calibration else None,
                                               "text_field": calibration.text_field if calibration else "text"}
                report.analysis = (report_extras or {}).get("analysis")
                report.verification = verification if verify else None
                written = sorted(p for p in out_dir.iterdir() if p.is_file())
                report.files = {p.name: p.stat().st_size for p in written}
                report.sha256 = {p.name: file_sha256(p) for p in written}  # cptq verify checks them
                write_report(out_dir / paths.report.name, report, written, [w for _, w in files])
                _install(staging, paths, force, fp32_dir, fp16_dir, fingerprint)
    return ExportResult(paths, plan, report.to_dict(), timings)


def merge_lowered(per_file: list[dict]) -> dict:
    """One record per layer over the files that hold it: its bytes (every stored copy) and kernels added up."""
    merged: dict = {}
    for records in per_file:
        for name, record in records.items():
            if name not in merged:
                merged[name] = dataclasses.replace(record, expected_kernels=list(record.expected_kernels),
                                                   new_initializers=list(record.new_initializers),
                                                   derived_tensors=list(record.derived_tensors))
                continue
            into = merged[name]
            into.expected_kernels += record.expected_kernels
            into.bytes_fp32 += record.bytes_fp32
            into.bytes_after += record.bytes_after
            into.mse = max(into.mse, record.mse)  # the same weight and plan: equal but for GPTQ's input scaling
    return merged


def merge_checks(checks: list[GraphCheck]) -> GraphCheck:
    """The kernel check of every file as one: kernels counted over the files, stragglers of any file."""
    if len(checks) == 1:
        return checks[0]
    kernels: Counter = Counter()
    expected: Counter = Counter()
    per_layer: dict[str, list[str]] = {}
    for check in checks:
        kernels.update(check.kernels)
        expected.update(check.expected_kernels)
        for name, ops in check.per_layer.items():
            per_layer.setdefault(name, []).extend(ops)
    return GraphCheck(dict(sorted(kernels.items())), per_layer,
                      sorted({n for c in checks for n in c.unfused}), sorted({n for c in checks for n in c.fp16_casts_left}),
                      sorted({n for c in checks for n in c.repaired}), dict(sorted(expected.items())))


def _fixed_bytes(fp32_dir: Path, file_name: str, model_proto, layer_map: LayerMap) -> int:
    """Bytes of one FP32 export file that are not quantizable weights: what every plan keeps."""
    sizes = {init.name: int(np.prod(init.dims)) for init in model_proto.graph.initializer}
    weights = {use.initializer for mapping in layer_map.mapped.values() for use in mapping.uses}
    model_bytes = files_size([p for p in fp32_dir.iterdir() if p.name.startswith(file_name)])
    return model_bytes - 4 * sum(sizes[name] for name in weights)


def _needs(calibration: Measurements | None, what: str) -> Measurements:
    if calibration is None:  # a library caller's mistake: the API always passes one
        raise CptqError(f"{what} needs calibration measurements (calibration=CalibrationMeasurements(...))")
    return calibration


def _weight_quantizer(algorithm: str, loaded: LoadedModel, graph: LayerGraph, plan: Plan,
                      calibration: Measurements | None, progress: bool):
    if algorithm == "rtn":
        return RoundToNearest()
    wanted = [name for name, lp in plan.layers.items()
              if lp.bits in GPTQ_BITS and graph[name].role != ROLE_EMBEDDING]
    if not wanted:
        return Gptq(lambda names: {}, wanted)
    measured = _needs(calibration, "--algorithm gptq")
    return Gptq(lambda names: measured.hessians(loaded, graph, names, progress), wanted)


def _input_smoothing(loaded: LoadedModel, graph: LayerGraph, plan: Plan, calibration: Measurements | None,
                     ratio: float, progress: bool) -> dict[str, np.ndarray]:
    """Per-input-channel factors s of each 4/8-bit MatMul layer: sqrt(peak / median peak) where the peak
    exceeds `ratio` x the median (SmoothQuant's alpha = 0.5, against the median channel), else 1."""
    names = [name for name, lp in plan.layers.items() if lp.bits < 16 and graph[name].role != ROLE_EMBEDDING]
    if not names:
        return {}
    peaks = _needs(calibration, "--format dynamic with --outlier-ratio").input_peaks(loaded, graph, names, progress)
    factors = {}
    for name, peak in peaks.items():
        median = np.median(peak)
        if median > 0 and (peak > ratio * median).any():
            factors[name] = np.where(peak > ratio * median, np.sqrt(peak / median), 1).astype(np.float32)
    return factors


def _short_verification(verify: Verifier, folder: Path, loaded: LoadedModel, baselines: dict[str, Path]) -> dict:
    try:
        return verify(folder, loaded, baselines)
    except CptqError as exc:  # the export itself is sound and in place; say why there are no figures
        return {"error": str(exc)}
    except Exception as exc:  # an ORT or memory failure mid-measurement: the same, with what it was
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        return {"error": f"{type(exc).__name__}: {first}" if first else type(exc).__name__}


def _install(staging: Staging, paths: OutputPaths, force: bool, fp32_dir: Path, fp16_dir: Path,
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
