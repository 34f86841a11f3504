"""The export flow, one straight chain of stages: (the caller loads) -> export FP32 -> map layers -> plan ->
calibrate (GPTQ's Hessians, smoothing peaks: the caller's Measurements) -> lower -> check -> measure (parity,
FP16 reference, the short verification) -> write.

Each stage is a module of its own: fp32_files.py (the FP32 export as the stages read it, a model over 2 GB
lazily), exported_graph.py (layer maps, the layer graph as exported), calibration_inputs.py (GPTQ's quantizer,
input smoothing), file_lowering.py (lowering and kernel checks per ONNX file, merged), parity.py, report.py,
install.py. Everything is written into a staging folder beside the output and moved into place at the end,
all or nothing, under a lock on the output folder (cptquant/output_folder/): a failed or interrupted export
leaves nothing partial behind and never touches an existing output. After each step, what it freed goes back
to the operating system (memory.py).
"""

from __future__ import annotations

import shutil
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import onnx

from ..errors import CptqError, first_line
from ..layer_graph import LayerGraph
from ..model_loading import TASK_CAUSAL_LM, TASK_SEQ2SEQ, LoadedModel
from ..onnx_io.baselines import baseline_fingerprint, side_files, write_fp16
from ..onnx_io.onnx_export import MODEL_FILE, export_onnx
from ..output_folder import Staging, claim_output
from ..plan import Plan, validate_plan
from ..progress import Steps
from ..quant.storage import FORMAT_AUTO, FORMAT_DYNAMIC, FORMAT_QDQ
from ..quant.weight_quantizers import ALGORITHMS
from ..reports import ExportReport, ReportExtras
from ..safety import file_sha256
from ..seq2seq_inputs import decoder_reads_input
from .attention_fusion import ATTENTION_CHOICES, ATTENTION_GQA, AttentionChoice, attention_for_export
from .calibration_inputs import DEFAULT_OUTLIER_RATIO, Measurements, input_smoothing, weight_quantizer
from .exported_graph import exported_files_layer_graph, exported_layer_graph
from .file_lowering import FileLowering, check_files, lower_files
from .fp32_files import Fp32Files, open_fp32_files
from .genai_config import write_genai_config
from .install import OutputPaths, install, resolve_output
from .layer_map import WeightUse
from .memory import release_freed_memory
from .parity import measure_parity, measure_seq2seq_parity
from .report import build_report, write_report

# What callers import from here: the flow's entry point, its result and the stage interfaces they implement.
__all__ = ["DEFAULT_OUTLIER_RATIO", "ExportResult", "FormatChoice", "FormatChooser", "Measurements", "OutputPaths",
           "PlanFactory", "Verifier", "export_quantized", "exported_files_layer_graph", "exported_layer_graph",
           "resolve_output"]

PlanFactory = Callable[[LoadedModel, LayerGraph], Plan]
# The short verification the API (api.py) chains into an export (runtimes/verify.py): the staged model, the model,
# the staged FP32/FP16 baselines -> the figures the report carries (or why there are none).
Verifier = Callable[[Path, LoadedModel, dict[str, Path]], dict[str, Any]]


class FormatChoice(Protocol):
    """`--format auto`'s answer (cptquant/format_choice.py): the format and what was measured, for the report."""

    format: str

    def to_dict(self) -> dict[str, Any]: ...


# `--format auto`: the model, its FP32 proto (as load_onnx_lazily gives it: over 2 GB, its weights stay in the FP32
# folder), layer graph, layer uses, the FP32 folder, a scratch folder -> the measured choice. The command hands it over, so that the exporter times no runtime itself.
FormatChooser = Callable[[LoadedModel, onnx.ModelProto, LayerGraph, dict[str, list[WeightUse]], Path, Path],
                         FormatChoice]



@dataclass
class ExportResult:
    paths: OutputPaths
    plan: Plan
    report: ExportReport  # model.report.json as written (its .to_dict())
    timings: dict[str, float] = field(default_factory=dict)


def export_quantized(loaded: LoadedModel, make_plan: PlanFactory, out: Path, force: bool = False,
                     progress: bool = True, fmt: str = FORMAT_QDQ, report_extras: ReportExtras | None = None,
                     verify: Verifier | None = None, algorithm: str = "rtn",
                     calibration: Measurements | None = None,
                     outlier_ratio: float = DEFAULT_OUTLIER_RATIO,
                     choose_format: FormatChooser | None = None, attention: str = ATTENTION_GQA,
                     reduce_range: bool = False) -> ExportResult:
    """Export `loaded` with the plan `make_plan` gives; `report_extras` (filled by then) joins the report.

    `algorithm` "gptq" chooses 4-bit MatMul codes with GPTQ, from input Hessians that `calibration`
    measures (passes.measurements.CalibrationMeasurements). With `verify` (runtimes/verify.py's short
    verification), its CPU figures against the FP32/FP16 baselines join the report too. With `fmt` dynamic
    and `outlier_ratio` > 0, outlier input channels (peaks `calibration` measures) are scaled down before
    each layer's int8 product. With `fmt` auto, `choose_format` measures the format on the FP32 export.
    `attention` gqa: a Llama/Mistral/Qwen2 decoder's attention becomes GroupQueryAttention where it gives the
    FP32 export's outputs (exporter/attention_fusion.py); optimum: kept as optimum wrote it. `reduce_range`:
    dynamic's int8 weights within ±63, for a CPU whose int8 GEMM saturates full-range ones (quant/storage.py).
    """
    if algorithm not in ALGORITHMS:
        raise CptqError(f"--algorithm must be one of {', '.join(ALGORITHMS)}, not {algorithm!r}")
    if attention not in ATTENTION_CHOICES:
        raise CptqError(f"--attention must be one of {', '.join(ATTENTION_CHOICES)}, not {attention!r}")
    if fmt == FORMAT_AUTO and choose_format is None:
        raise CptqError("--format auto needs a format chooser (cptquant/format_choice.py)")
    extras = report_extras if report_extras is not None else ReportExtras()
    paths = resolve_output(out, force, loaded.source)
    timings: dict[str, float] = {}
    # decoder_reads_input: the passes and GPTQ's Hessians feed an encoder-decoder model its input alone
    with claim_output(paths.folder), Staging(paths.folder) as staging, decoder_reads_input(loaded.model):
        tmp, out_dir = staging.root, staging.out
        fingerprint = baseline_fingerprint(loaded)  # of the weights the FP32 baseline is exported from
        steps = Steps(["export ONNX (FP32)", "map layers", "plan",
                       "quantize" + (" (GPTQ: calibration + Hessians)" if algorithm == "gptq" else ""),
                       "check kernels", "parity",
                       "FP16 reference"] + (["verify on CPU"] if verify else []) + ["write"], enabled=progress,
                      after_each=release_freed_memory)
        with steps:
            with steps.step(timings):
                export_onnx(loaded, tmp / "fp32")
                fp32 = open_fp32_files(tmp / "fp32", loaded.task, paths.model.name)
            with steps.step(timings):
                graph, layer_maps, absent = exported_files_layer_graph(loaded, fp32.folder, fp32.protos,
                                                                       fp32.base_dirs)
                format_choice = None
                if fmt == FORMAT_AUTO and choose_format is not None:  # before the plan: a size budget counts
                    first_uses = layer_maps[fp32.first].uses()  # its bytes; seq2seq models are not measured
                    # the FP32 graph as loaded: a model over 2 GB without its weights (read from fp32.folder when
                    # a probe is lowered; a decoder is not measured, and nothing is read)
                    format_choice = choose_format(loaded, fp32.protos[fp32.first], graph, first_uses, fp32.folder,
                                                  tmp / "format-probes")
                    fmt = format_choice.format
                fused: AttentionChoice | None = None
                if loaded.task == TASK_CAUSAL_LM and len(fp32.names) == 1:  # proved on the FP32 export (seconds)
                    fused = attention_for_export(attention, loaded, fp32.protos[fp32.first], fp32.folder / fp32.first,
                                                 layer_maps[fp32.first].uses(), fp32.base_dirs[fp32.first], tmp)
                spec = fused.spec if fused is not None else None
                if fused is not None and spec is not None and graph.fixed_bytes is not None:
                    graph.fixed_bytes += fused.graph_bytes_change  # the budget prices the graph written
                if fused is not None:
                    fmt = fused.weight_format(fmt)
            with steps.step(timings):
                plan = make_plan(loaded, graph)
                plan.model = plan.model or loaded.display_name
                validate_plan(plan, graph)
            model_path = out_dir / fp32.names[0][1]
            # GPTQ's memoised codes (for the check's repair) wait on disk, not in memory
            quantizer = weight_quantizer(algorithm, loaded, graph, plan, calibration, progress, tmp / "gptq-codes")
            with steps.step(timings):
                smoothing = (input_smoothing(loaded, graph, plan, calibration, outlier_ratio, progress)
                             if fmt == FORMAT_DYNAMIC and outlier_ratio > 0 else {})
                lowering = FileLowering(plan, fmt, quantizer, smoothing, spec, reduce_range)
                per_file = lower_files(fp32, layer_maps, lowering, out_dir)
                quantizer.release_measurements()  # the Hessians: the check's repair reads memoised codes
                for side in side_files(fp32.folder):
                    shutil.copy2(side, out_dir / side.name)
            with steps.step(timings):
                graph_check, rewritten = check_files(fp32, layer_maps, lowering, out_dir, per_file)
            with steps.step(timings):
                parity = (measure_seq2seq_parity(loaded, out_dir) if loaded.task == TASK_SEQ2SEQ
                          else measure_parity(loaded, model_path))
            with steps.step(timings):
                fp16_dir = tmp / "fp16"
                write_fp16(fp32.folder, fp16_dir)
            verification = None
            if verify:  # measured on the staged folder: nothing is in place before everything is done
                with steps.step(timings):
                    # an encoder-decoder's three files: named by their folder, as its baselines by model.onnx's path
                    verification = _short_verification(verify, out_dir if loaded.task == TASK_SEQ2SEQ else model_path,
                                                       loaded, {"fp32": fp32.folder / MODEL_FILE,
                                                                "fp16": fp16_dir / MODEL_FILE})
            with steps.step(timings):
                plan.save(out_dir / paths.plan.name)
                # a causal LM's folder also runs under onnxruntime-genai
                genai = write_genai_config(out_dir, paths.model.name) if loaded.task == TASK_CAUSAL_LM else None
                report = build_report(loaded, plan, rewritten, absent, graph.unquantizable, graph_check,
                                      parity, fp32.folder, fp16_dir, timings, fmt, fp32.opset, fingerprint,
                                      [name for name, _ in fp32.names])
                report.outlier_ratio = outlier_ratio if fmt == FORMAT_DYNAMIC else None
                report.reduce_range = reduce_range if fmt == FORMAT_DYNAMIC else None
                report.genai_config = genai.name if genai else None
                report.attention = fused.note if fused is not None else None
                report.format_choice = format_choice.to_dict() if format_choice is not None else None
                report.model_files = fp32.written if len(fp32.names) > 1 else None
                read_text = (bool(smoothing) or quantizer.used_calibration or "analysis" in extras
                             or any(lp.hot_rows for lp in plan.layers.values()))
                if read_text:  # what `cptq verify --eval` must not overlap (None: the offline corpus)
                    report.calibration_text = {"calib": calibration.calib if calibration else None,
                                               "text_field": calibration.text_field if calibration else "text"}
                report.analysis = extras.get("analysis")
                report.verification = verification
                _write_report(report, out_dir, paths, fp32)
                install(staging, paths, force, fp32.folder, fp16_dir, fingerprint)
    return ExportResult(paths, plan, report, timings)


def _write_report(report: ExportReport, out_dir: Path, paths: OutputPaths, fp32: Fp32Files) -> None:
    """The report of every file written (their sizes, and the sha256 that cptq verify checks), into `out_dir`."""
    written = sorted(p for p in out_dir.iterdir() if p.is_file())
    report.files = {p.name: p.stat().st_size for p in written}
    report.sha256 = {p.name: file_sha256(p) for p in written}
    write_report(out_dir / paths.report.name, report, written, fp32.written)


def _short_verification(verify: Verifier, folder: Path, loaded: LoadedModel,
                        baselines: dict[str, Path]) -> dict[str, Any]:
    try:
        return verify(folder, loaded, baselines)
    except CptqError as exc:  # the export itself is sound and in place; say why there are no figures
        return {"error": str(exc)}
    except Exception as exc:  # an ORT or memory failure mid-measurement: the same, with what it was
        first = first_line(exc)
        return {"error": f"{type(exc).__name__}: {first}" if first else type(exc).__name__}
