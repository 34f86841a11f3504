"""The Python API: `cptquant.export`, `cptquant.analyze`, `cptquant.verify`. The CLI is a thin layer over it.

    import cptquant
    result = cptquant.export("my-model-folder", "out/", method="tdmpq", target_bits=5)
    result.paths.model, result.plan.layers["lm_head"].bits, result.report.ratio_vs_fp16

A model is a hub id or folder (None: the embedded MiniLM), or an in-memory transformers PreTrainedModel
(with its tokenizer, when it has one). Bad input raises cptquant.errors.CptqError with a one-line message,
before any model loads wherever no model is needed, and leaves nothing behind.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeAlias

from .errors import CptqError

if TYPE_CHECKING:  # the heavy modules load when a function runs, not on `import cptquant`
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

    from .exporter.pipeline import ExportResult
    from .layer_graph import LayerGraph
    from .model_loading import LoadedModel
    from .options import AnalysisOptions, CalibrationOptions
    from .passes import AnalysisResult
    from .plan import Plan
    from .reports import ReportExtras
    from .runtimes.verify import VerifyResult

# None: the embedded MiniLM; a hub id or folder; or a model in memory
ModelLike: TypeAlias = "str | os.PathLike[str] | PreTrainedModel | None"


def _calibration(calibration: str | os.PathLike[str] | CalibrationOptions | AnalysisOptions | None, *,
                 text_field: str, calib_samples: int,
                 seq_len: int, seed: int, bit_widths: Sequence[int], granularity: str, target_bits: float | None,
                 max_size_mb: float | None, block_size: int, clip: str, zero_points: str, hot_rows: bool,
                 sparsity: Sequence[float], cca: str, curvature: str, lm_loss: str) -> AnalysisOptions:
    """AnalysisOptions from keyword arguments (each part validated as it is made; cptquant/options.py), or the
    caller's own (then the budget arguments must be unset); a CalibrationOptions replaces the calibration ones."""
    from .options import AllocationOptions, AnalysisOptions, CalibrationOptions, QuantizationOptions
    from .passes.calibration import check_calibration_file

    if isinstance(calibration, AnalysisOptions):
        if target_bits is not None or max_size_mb is not None:
            raise CptqError("give the budget inside the AnalysisOptions passed as calibration, not beside it")
        return calibration
    spec = calibration if isinstance(calibration, CalibrationOptions) else CalibrationOptions(
        calib=os.fspath(calibration) if calibration is not None else None, text_field=text_field,
        calib_samples=calib_samples, seq_len=seq_len, seed=seed)
    options = AnalysisOptions(
        calibration=spec,
        allocation=AllocationOptions(bit_widths=tuple(bit_widths), granularity=granularity, target_bits=target_bits,
                                     max_size_mb=max_size_mb, sparsity=tuple(sparsity), cca=cca,
                                     curvature=curvature, lm_loss=lm_loss, hot_rows=hot_rows),
        quantization=QuantizationOptions(block_size=block_size, clip=clip, zero_points=zero_points))
    check_calibration_file(spec.calib, spec.text_field)  # a missing or binary file fails before any model loads
    return options


def _load(model: ModelLike, tokenizer: PreTrainedTokenizerBase | None, task: str | None,
          trust_remote_code: bool) -> LoadedModel:
    from .model_loading import load_model, wrap_model

    if model is not None and not isinstance(model, (str, os.PathLike)):  # in memory
        if not hasattr(model, "config") or not hasattr(model, "named_modules"):
            raise CptqError(f"model must be a hub id, a folder or a transformers PreTrainedModel, not {type(model).__name__}")
        return wrap_model(model, task, tokenizer, name=getattr(model.config, "name_or_path", "") or type(model).__name__)
    if tokenizer is not None:
        raise CptqError("tokenizer= goes with an in-memory model; a folder or hub id brings its own")
    return load_model(os.fspath(model) if model is not None else None, task, trust_remote_code)


def export(model: ModelLike = None, output: str | os.PathLike[str] = "out/model.onnx", *,
           tokenizer: PreTrainedTokenizerBase | None = None, task: str | None = None, method: str | None = None,
           bits: int | None = None,
           plan: str | os.PathLike[str] | Plan | None = None, default_bits: int | None = None,
           target_bits: float | None = None, max_size_mb: float | None = None, overrides: Sequence[str] = (),
           calibration: str | os.PathLike[str] | CalibrationOptions | AnalysisOptions | None = None,
           text_field: str = "text",
           calib_samples: int = 64, seq_len: int = 128, seed: int = 0, algorithm: str = "gptq",
           weight_format: str = "qdq", block_size: int = 32, clip: str = "auto", zero_points: str = "auto",
           hot_rows: bool = True, outlier_ratio: float | None = None, bit_widths: Sequence[int] = (16, 8, 4),
           granularity: str = "layer", sparsity: Sequence[float] = (), cca: str = "cka",
           curvature: str = "fisher", lm_loss: str = "kl", verify: bool = True, force: bool = False, progress: bool = False,
           trust_remote_code: bool = False, attention: str = "gqa", reduce_range: bool | None = None) -> ExportResult:
    """Export `model` to a mixed-precision ONNX folder (`output`: a folder, or the path of its .onnx file).

    The plan comes from one of `method` (cmpq, pmpq, tdmpq — the default — oracle or rule), `bits` (uniform
    16, 8 or 4) or `plan` (a plan file or Plan); `target_bits` / `max_size_mb` set a method's budget;
    `overrides` are `PATTERN=BITS` pins (see cptquant/overrides.py). `calibration` is a text file, JSONL,
    `hf:NAME:SPLIT`, CalibrationOptions, or full AnalysisOptions; the offline corpus when None. Returns the paths written,
    the plan and the report (the same as model.report.json). `weight_format` "auto" (the command line's
    default) measures which MatMul kernel is fastest on this machine (cptquant/format_choice.py); the API
    defaults to qdq so that a script's output does not depend on the machine it runs on. `reduce_range`
    (dynamic only): int8 weights within ±63; None: on exactly where this CPU's int8 GEMM saturates full-range
    weights (x86 AVX2 without VNNI, runtimes/cpu.py), whose products are wrong otherwise. `attention` "gqa"
    writes a Llama/Mistral/Qwen2 decoder's attention as GroupQueryAttention where that is proved exact on the
    export, "optimum" keeps optimum's graph (exporter/attention_fusion.py).
    """
    from .exporter.pipeline import DEFAULT_OUTLIER_RATIO, export_quantized, resolve_output
    from .format_choice import format_chooser
    from .model_loading import normalize_task
    from .output_folder import claim_output
    from .output_folder.targets import output_path
    from .passes.measurements import CalibrationMeasurements
    from .plan_source import plan_factory
    from .quant.storage import FORMAT_AUTO, FORMAT_NBITS, FORMAT_QDQ, FORMATS
    from .quant.weight_quantizers import ALGORITHMS
    from .runtimes.cpu import u8s8_gemm_saturates

    if reduce_range and weight_format in (FORMAT_QDQ, FORMAT_NBITS):  # asked for, and would be silently unused
        raise CptqError(f"--reduce-range applies to --format dynamic (int8 weights) only, not --format {weight_format}")
    reduce_range = u8s8_gemm_saturates() if reduce_range is None else reduce_range
    outlier_ratio = DEFAULT_OUTLIER_RATIO if outlier_ratio is None else outlier_ratio
    if algorithm not in ALGORITHMS:
        raise CptqError(f"--algorithm must be one of {', '.join(ALGORITHMS)}, not {algorithm!r}")
    if weight_format not in (FORMAT_AUTO, *FORMATS):
        raise CptqError(f"--format must be one of {', '.join((FORMAT_AUTO, *FORMATS))}, not {weight_format!r}")
    if not math.isfinite(outlier_ratio) or outlier_ratio < 0 or 0 < outlier_ratio <= 1:  # nan: not JSON
        raise CptqError(f"--outlier-ratio must be 0 (off) or above 1 (and finite), not {outlier_ratio:g}")
    analysis = _calibration(calibration, text_field=text_field, calib_samples=calib_samples, seq_len=seq_len,
                            seed=seed, bit_widths=bit_widths, granularity=granularity, target_bits=target_bits,
                            max_size_mb=max_size_mb, block_size=block_size, clip=clip, zero_points=zero_points,
                            hot_rows=hot_rows, sparsity=sparsity, cca=cca, curvature=curvature,
                            lm_loss=lm_loss)
    analysis = analysis.replaced(weight_format=weight_format)  # a size budget counts the bytes of this format
    task = normalize_task(task) if task else None
    report_extras: ReportExtras = {}
    plan_source = Path(plan) if isinstance(plan, (str, os.PathLike)) else plan
    make_plan = plan_factory(method, plan_source, bits, analysis, progress, report_extras, default_bits, overrides)
    output = output_path(output)  # not Path(output): Path("") would be the current folder; output_path refuses it
    source = os.fspath(model) if isinstance(model, (str, os.PathLike)) else None  # None: in memory or embedded
    paths = resolve_output(output, force, source)  # fail on a bad output path before the slow work
    with claim_output(paths.folder):  # one writer per output folder, from before the model loads
        loaded = _load(model, tokenizer, task, trust_remote_code)
        return export_quantized(loaded, make_plan, output, force=force, progress=progress, fmt=weight_format,
                                report_extras=report_extras, verify=short_verification if verify else None,
                                algorithm=algorithm, calibration=CalibrationMeasurements(analysis.calibration),
                                outlier_ratio=outlier_ratio,
                                choose_format=(format_chooser(analysis, reduce_range=reduce_range)
                                               if weight_format == FORMAT_AUTO else None),
                                attention=attention, reduce_range=reduce_range)


def short_verification(folder: Path, loaded: LoadedModel, baselines: dict[str, Path]) -> dict[str, Any]:
    """The CPU figures an export adds to its report: the API chains them into the export (the exporter
    imports no runtime), measured on the staged folder against its staged baselines."""
    from .runtimes.verify import short_verification as measure

    return measure(folder, loaded, quick=True, baselines=baselines)


@dataclass
class Analysis:
    """What `analyze` measured: per-unit scores (`result`), the layer graph, and each method's plan."""
    result: AnalysisResult
    graph: LayerGraph
    plans: dict[str, Plan]
    model: str


def analyze(model: ModelLike = None, *, tokenizer: PreTrainedTokenizerBase | None = None, task: str | None = None,
            methods: Sequence[str] = ("tdmpq",), validate: bool = False, target_bits: float | None = None,
            max_size_mb: float | None = None,
            calibration: str | os.PathLike[str] | CalibrationOptions | AnalysisOptions | None = None,
            text_field: str = "text", calib_samples: int = 64, seq_len: int = 128, seed: int = 0,
            bit_widths: Sequence[int] = (16, 8, 4), granularity: str = "layer", block_size: int = 32,
            clip: str = "auto", zero_points: str = "auto", hot_rows: bool = True,
            sparsity: Sequence[float] = (), cca: str = "cka", curvature: str = "fisher", lm_loss: str = "kl",
            progress: bool = False, trust_remote_code: bool = False) -> Analysis:
    """Score every layer's sensitivity with each of `methods` (cmpq, pmpq, tdmpq) and allocate bits; with
    `validate`, also the measured 4-bit damage (oracle) and each method's Spearman against it. Writes nothing."""
    from .exporter.exported_graph import layer_graph_priced_as_exported
    from .layer_graph import build_layer_graph
    from .passes import analyze as run_analysis
    from .passes import check_methods, plan_from_scores
    from .seq2seq_inputs import decoder_reads_input

    methods = tuple(methods)
    options = _calibration(calibration, text_field=text_field, calib_samples=calib_samples, seq_len=seq_len,
                           seed=seed, bit_widths=bit_widths, granularity=granularity, target_bits=target_bits,
                           max_size_mb=max_size_mb, block_size=block_size, clip=clip, zero_points=zero_points,
                           hot_rows=hot_rows, sparsity=sparsity, cca=cca, curvature=curvature,
                           lm_loss=lm_loss)
    check_methods(methods)  # fail before loading a model
    loaded = _load(model, tokenizer, task, trust_remote_code)
    # a size budget is priced on the exported files (graph bytes, an encoder-decoder's copies per file), as
    # cptq-export prices it: that costs one FP32 export
    graph = (layer_graph_priced_as_exported(loaded) if options.allocation.max_size_mb is not None
             else build_layer_graph(loaded.model))
    with decoder_reads_input(loaded.model):  # an encoder-decoder model decodes its calibration text
        result = run_analysis(loaded, graph, methods, options, validate=validate, progress=progress)
    plans = {m: plan_from_scores(graph, s, m, options, loaded.display_name,
                                 non_quantizable_params=result.non_quantizable_params, hot_rows=result.hot_rows)
             for m, s in result.scores.items()}
    return Analysis(result, graph, plans, loaded.display_name)


def verify(folder: str | os.PathLike[str], *, baseline: str = "fp32", ep: str = "auto",
           max_ppl_increase: float = 0.02, max_accuracy_drop: float = 0.01, min_cosine: float = 0.99,
           min_speedup: float = 1.0, max_kl: float | None = None, eval_file: str | os.PathLike[str] | None = None,
           quick: bool = False, threads: int = 2, progress: bool = False, source: str | None = None,
           trust_remote_code: bool = False) -> VerifyResult:
    """Measure an export (its folder, or its .onnx file) against its FP32/FP16 baselines on each execution
    provider; `result.passed` says whether every threshold held, `result.checks` names each with its value.
    Fractions are plain numbers (0.02 = 2 %). Writes nothing (see runtimes.verify_reports.write_reports)."""
    from .runtimes.gate import Thresholds
    from .runtimes.quality import load_eval_file
    from .runtimes.verify import verify_output

    thresholds = Thresholds(max_ppl_increase=max_ppl_increase, max_accuracy_drop=max_accuracy_drop,
                            min_cosine=min_cosine, min_speedup=min_speedup, max_kl=max_kl)
    eval_set = load_eval_file(Path(eval_file)) if eval_file is not None else None
    return verify_output(Path(folder), baseline.lower(), ep, thresholds, eval_set, quick, threads, progress,
                         trust_remote_code=trust_remote_code, source=source)
