"""`cptq-export` / `cptq export`: a Hugging Face model in, a mixed-precision ONNX folder out."""

from __future__ import annotations

import shlex
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console
from rich.table import Table

from ..errors import CptqError
from ..exporter.pipeline import DEFAULT_OUTLIER_RATIO, ExportResult, export_quantized
from ..quant.storage import FORMATS
from ..quant.weight_quantizers import ALGORITHMS
from ..quant.quantize import CLIP_METHODS
from ..layer_graph import LayerGraph
from ..model_loading import TASK_CAUSAL_LM, TASK_MASKED_LM, LoadedModel, load_model, normalize_task
from ..plan import (SUPPORTED_BITS, ZERO_POINT_MODES, Plan, apply_zero_points,
                    check_block_size, fill_missing_layers, uniform_plan)
from . import options, user_errors

PASS_METHODS = ("cmpq", "pmpq", "tdmpq", "oracle")
RULE_METHOD = "rule"  # not a pass: the k_quant_mixed layer rule of llama.cpp and ORT GenAI (passes/rule.py)
# TDMPQ is the default: it ranks MiniLM's layers like the measured 4-bit damage (Spearman 0.99, docs/benchmarks.md).
DEFAULT_METHOD = "tdmpq"


def plan_factory(method: Optional[str], plan_file: Optional[Path], bits: Optional[int], block_size: int,
                 clip: str, zero_points: str = "auto", analysis=None, progress: bool = True,
                 report_extras: Optional[dict] = None, default_bits: Optional[int] = None):
    """Decide where the plan comes from: a file, a uniform bit width, or a sensitivity method.

    A sensitivity method records its cost and calibration in `report_extras` for the export report.
    `default_bits` fills the layers a plan file leaves out (without it such a plan is refused).
    """
    report_extras = {} if report_extras is None else report_extras
    if zero_points not in ZERO_POINT_MODES:
        raise CptqError(f"--zero-points must be one of {', '.join(ZERO_POINT_MODES)}, not {zero_points!r}")
    given = [name for name, value in (("--method", method), ("--plan", plan_file), ("--bits", bits)) if value]
    if len(given) > 1:
        raise CptqError(f"give only one of --method, --plan and --bits (got {' and '.join(given)})")
    if clip not in CLIP_METHODS:
        raise CptqError(f"--clip must be one of {', '.join(CLIP_METHODS)}, not {clip!r}")
    check_block_size(block_size)
    if default_bits is not None:
        if plan_file is None:
            raise CptqError("--default-bits applies to --plan only (it fills the layers a plan file leaves out)")
        if default_bits not in SUPPORTED_BITS:
            raise CptqError(f"--default-bits {default_bits} is not supported (use 16, 8 or 4)")
    if bits is not None:
        if bits not in SUPPORTED_BITS:
            raise CptqError(f"--bits {bits} is not supported (use 16, 8 or 4)")

        def uniform(loaded: LoadedModel, graph: LayerGraph) -> Plan:
            plan = uniform_plan(graph, bits, block_size)
            plan.clip = clip
            plan = apply_zero_points(plan, zero_points)
            if bits == 4 and analysis is not None and analysis.hot_rows:
                from ..passes.hot_rows import calibration_hot_rows, with_hot_rows

                plan = with_hot_rows(plan, calibration_hot_rows(loaded, graph, analysis))
            return plan

        return uniform
    if plan_file is not None:
        plan = Plan.load(plan_file)  # read now: a bad plan fails before the model is loaded
        if default_bits is None:
            return lambda loaded, graph: plan
        return lambda loaded, graph: fill_missing_layers(plan, graph, default_bits, block_size, zero_points)
    method = method or DEFAULT_METHOD
    if method == RULE_METHOD:
        return _rule_factory(block_size, clip, zero_points, analysis)
    if method not in PASS_METHODS:
        raise CptqError(f"unknown method {method!r}; use one of {', '.join(PASS_METHODS + (RULE_METHOD,))}")
    from ..passes import analyze, check_options, plan_from_scores

    check_options(analysis, (method,))

    def from_sensitivity(loaded: LoadedModel, graph: LayerGraph) -> Plan:
        result = analyze(loaded, graph, (method,), analysis, validate=False, progress=progress, forward_repeats=1)
        scores = result.oracle if method == "oracle" else result.scores[method]
        plan = plan_from_scores(graph, scores, method, analysis, loaded.display_name,
                                non_quantizable_params=result.non_quantizable_params, hot_rows=result.hot_rows)
        # Timings go to the report (the plan stays byte-identical for the same inputs).
        report_extras["analysis"] = {"method": method, "cost_fpe": result.cost_fpe, "seconds": result.seconds,
                                     "calibration": result.calibration, "notes": result.notes}
        return plan

    return from_sensitivity


def _rule_factory(block_size: int, clip: str, zero_points: str, analysis):
    """The k_quant_mixed rule (passes/rule.py): a fixed layer choice, so a budget cannot apply."""
    if analysis is not None and (analysis.target_bits is not None or analysis.max_size_mb is not None):
        raise CptqError("--method rule is a fixed layer choice; it takes no --target-bits or --max-size-mb")

    def rule(loaded: LoadedModel, graph: LayerGraph) -> Plan:
        from ..passes.rule import rule_plan

        plan = rule_plan(graph, block_size, loaded.display_name)
        plan.clip = clip
        plan = apply_zero_points(plan, zero_points)
        if analysis is not None and analysis.hot_rows:
            from ..passes.hot_rows import calibration_hot_rows, with_hot_rows

            plan = with_hot_rows(plan, calibration_hot_rows(loaded, graph, analysis))
        return plan

    return rule


def print_summary(result: ExportResult, console: Console) -> None:
    report = result.report
    by_bits: dict[int, list[int]] = {}
    for entry in report["layers"].values():
        count_bytes = by_bits.setdefault(entry["bits"], [0, 0, 0])
        count_bytes[0] += 1
        count_bytes[1] += entry["bytes_fp32"] // 4
        count_bytes[2] += entry["bytes_after"]
    table = Table(title=f"{report['model']} → {result.paths.model}", title_justify="left")
    table.add_column("bits", justify="right")
    table.add_column("layers", justify="right")
    table.add_column("parameters", justify="right")
    table.add_column("MB after", justify="right")
    for bits in sorted(by_bits, reverse=True):
        layers, params, after = by_bits[bits]
        table.add_row(str(bits), str(layers), f"{params:,}", f"{after / 1e6:.2f}")
    console.print(table)
    for name, reason in report.get("layers_unquantized", {}).items():
        console.print(f"{name}: left FP32 — {reason}")
    for name, entry in report["layers"].items():
        if entry.get("hot_rows"):
            console.print(f"{name}: {entry['hot_rows']:,} rows (the calibration text's tokens) kept at 8 bits")
    parity = report["parity_vs_torch_fp32"]
    kernels = ", ".join(f"{k} ×{v}" for k, v in report["graph_check"]["kernels"].items()) or "none"
    console.print(
        f"model {report['model_bytes'] / 1e6:.1f} MB — {report['ratio_vs_fp16']:.2f}× smaller than FP16 "
        f"({report['fp16_reference_bytes'] / 1e6:.1f} MB); folder {report['total_bytes'] / 1e6:.1f} MB; "
        f"average {report['average_bits']} bits/weight\n"
        f"kernels in the ORT-optimized graph: {kernels}\n"
        f"parity vs torch FP32 on {parity['n_inputs']} inputs: cosine mean {parity['mean_cosine']:.5f} "
        f"(min {parity['min_cosine']:.5f}), max |diff| {parity['max_abs_diff']:.4g}"
    )
    verification = report.get("verification")
    if verification and "error" in verification:
        console.print(f"[yellow]verification skipped: {verification['error']}[/yellow]")
    elif verification:
        quality = ", ".join(f"{k} {v:g}" for k, v in verification["quality"]["vs_fp32"].items())
        speed = verification["speed"]
        # n_examples counts scored tokens for language models, texts for the other tasks
        unit = {TASK_CAUSAL_LM: "tokens of held-out text",
                TASK_MASKED_LM: "masked tokens of held-out text"}.get(verification["quality"]["task"], "held-out texts")
        console.print(
            f"vs FP32 on {verification['quality']['n_examples']} {unit}: {quality}\n"
            f"CPU latency speed-up (p50, {verification['device']}): "
            f"{speed['vs_fp32']['geomean_speedup']:.2f}× vs FP32, {speed['vs_fp16']['geomean_speedup']:.2f}× vs FP16 "
            f"— `cptq verify {shlex.quote(str(result.paths.folder))}` measures more shapes and gates on thresholds"
        )


@user_errors
def export(
    model: Optional[str] = typer.Argument(None, help="Hub id or local folder; omitted: the embedded MiniLM."),
    output: Path = typer.Option(Path("out/model.onnx"), "-o", "--output", help="model.onnx path, or a folder."),
    method: Optional[str] = typer.Option(None, "--method",
                                         help="Sensitivity method: cmpq, pmpq, tdmpq or oracle (default tdmpq); or rule: "
                                              "llama.cpp's k_quant_mixed layer rule (no measurement)."),
    plan: Optional[Path] = typer.Option(None, "--plan", help="Use this plan JSON instead of a method."),
    default_bits: Optional[int] = typer.Option(
        None, "--default-bits", help="With --plan: bits (16, 8 or 4) for the layers the plan leaves out; without "
                                     "it a plan must name every layer."),
    bits: Optional[int] = typer.Option(None, "--bits", help="Uniform plan: every layer at 16, 8 or 4 bits."),
    block_size: int = options.BLOCK_SIZE,
    clip: str = options.CLIP,
    zero_points: str = options.ZERO_POINTS,
    algorithm: str = typer.Option("gptq", "--algorithm",
                                  help="4-bit codes: gptq (error-compensating, uses calibration text) or rtn."),
    weight_format: str = typer.Option(
        "qdq", "--format",
        help="qdq: standard DequantizeLinear that ORT fuses into MatMulNBits; nbits: MatMulNBits directly; "
             "dynamic: int8 DynamicQuantizeMatMul (activations quantized at run time; fastest for encoders on CPU, "
             "4-bit layers stay 4-bit on disk)."),
    outlier_ratio: float = typer.Option(
        DEFAULT_OUTLIER_RATIO, "--outlier-ratio",
        help="--format dynamic: input channels whose calibration peak is above this many times the layer's median "
             "are scaled down before the int8 product (weights scaled up to match); 0: off."),
    task: Optional[str] = options.TASK,
    trust_remote_code: bool = typer.Option(False, "--trust-remote-code", help="Allow the model's own code."),
    force: bool = typer.Option(False, "--force", help="Overwrite an existing output."),
    progress: bool = options.PROGRESS,
    verify: bool = typer.Option(True, "--verify/--no-verify",
                                help="Measure quality and CPU latency against FP32/FP16 at the end (a few seconds)."),
    calib: Optional[str] = options.CALIB,
    text_field: str = options.TEXT_FIELD,
    calib_samples: int = options.CALIB_SAMPLES,
    seq_len: int = options.SEQ_LEN,
    seed: int = options.SEED,
    sparsity: str = options.SPARSITY,
    bit_widths: str = options.BIT_WIDTHS,
    granularity: str = options.GRANULARITY,
    target_bits: Optional[float] = options.TARGET_BITS,
    max_size_mb: Optional[float] = options.MAX_SIZE_MB,
    cca: str = options.CCA,
    curvature: str = options.CURVATURE,
    hot_rows: bool = options.HOT_ROWS,
) -> None:
    """Export MODEL to a mixed-precision ONNX folder that ONNX Runtime runs with low-bit kernels."""
    if algorithm not in ALGORITHMS:
        raise CptqError(f"--algorithm must be one of {', '.join(ALGORITHMS)}, not {algorithm!r}")
    if weight_format not in FORMATS:
        raise CptqError(f"--format must be one of {', '.join(FORMATS)}, not {weight_format!r}")
    if outlier_ratio < 0 or 0 < outlier_ratio <= 1:
        raise CptqError(f"--outlier-ratio must be 0 (off) or above 1, not {outlier_ratio:g}")
    analysis = options.analysis_options(calib, text_field, calib_samples, seq_len, seed, sparsity, bit_widths,
                                        granularity, target_bits, max_size_mb, block_size, clip, cca, curvature,
                                        zero_points, hot_rows)
    analysis.weight_format = weight_format  # a size budget counts the bytes of this format
    if task:
        task = normalize_task(task)
    report_extras: dict = {}
    make_plan = plan_factory(method, plan, bits, block_size, clip, zero_points, analysis, progress, report_extras,
                             default_bits)
    from ..passes import check_options

    check_options(analysis)  # also with --bits or --plan: calibration settings GPTQ will use
    from ..exporter.pipeline import resolve_output
    from ..output_folder import claim_output

    paths = resolve_output(output, force, model)  # fail on a bad output path before the slow work
    with claim_output(paths.folder):  # one writer per output folder, from before the model loads
        loaded = load_model(model, task, trust_remote_code)
        result = export_quantized(loaded, make_plan, output, force=force, progress=progress, fmt=weight_format,
                                  report_extras=report_extras, verify=verify, algorithm=algorithm,
                                  calibration=analysis, outlier_ratio=outlier_ratio)
    print_summary(result, Console())
