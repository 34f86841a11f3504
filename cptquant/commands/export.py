"""`cptq-export` / `cptq export`: a Hugging Face model in, a mixed-precision ONNX folder out."""

from __future__ import annotations

import shlex
from pathlib import Path

import typer
from rich.console import Console
from rich.table import Table

from ..exporter.attention_fusion import ATTENTION_GQA
from ..exporter.pipeline import DEFAULT_OUTLIER_RATIO, ExportResult
from ..model_loading import TASK_CAUSAL_LM, TASK_MASKED_LM, TASK_SEQ2SEQ, TASK_TOKEN_CLASSIFICATION
from . import options, user_errors


def print_summary(result: ExportResult, console: Console) -> None:
    report = result.report
    by_bits: dict[int, list[int]] = {}
    for entry in report.layers.values():
        count_bytes = by_bits.setdefault(entry.bits, [0, 0, 0])
        count_bytes[0] += 1
        count_bytes[1] += entry.bytes_fp32 // 4
        count_bytes[2] += entry.bytes_after
    onnx_names = sorted(name for name in report.files if name.endswith(".onnx"))
    target = (result.paths.model if onnx_names == [result.paths.model.name]  # else a seq2seq model's files
              else f"{result.paths.folder}/ ({len(onnx_names)} ONNX files)")
    table = Table(title=f"{report.model} → {target}", title_justify="left")
    table.add_column("bits", justify="right")
    table.add_column("layers", justify="right")
    table.add_column("parameters", justify="right")
    table.add_column("MB after", justify="right")
    for bits in sorted(by_bits, reverse=True):
        layers, params, after = by_bits[bits]
        table.add_row(str(bits), str(layers), f"{params:,}", f"{after / 1e6:.2f}")
    console.print(table)
    for name, reason in report.layers_unquantized.items():
        console.print(f"{name}: left FP32 — {reason}")
    for name, entry in report.layers.items():
        if entry.hot_rows:
            tied = any(other.reads_table == name for other in report.layers.values())
            source = "the calibration text's tokens" + (", then the lowest ids: the LM head reads this table"
                                                       if tied else "")
            console.print(f"{name}: {entry.hot_rows:,} rows ({source}) kept at 8 bits")
    parity = report.parity_vs_torch_fp32
    kernels = ", ".join(f"{k} ×{v}" for k, v in report.graph_check["kernels"].items()) or "none"
    console.print(
        f"model {report.model_bytes / 1e6:.1f} MB — {report.ratio_vs_fp16:.2f}× smaller than FP16 "
        f"({report.fp16_reference_bytes / 1e6:.1f} MB); folder {report.total_bytes / 1e6:.1f} MB; "
        f"average {report.average_bits} bits/weight\n"
        f"kernels in the ORT-optimized graph: {kernels}\n"
        f"parity vs torch FP32 on {parity['n_inputs']} inputs: cosine mean {parity['mean_cosine']:.5f} "
        f"(min {parity['min_cosine']:.5f}), max |diff| {parity['max_abs_diff']:.4g}"
    )
    attention = report.attention
    if attention and attention.get("kernel") == "GroupQueryAttention":
        norms = attention.get("skip_rms_norms")
        console.print(f"attention: GroupQueryAttention in {attention['layers']} layers"
                      + (f", {norms} residual Adds + RMSNorms fused" if norms else "")
                      + f" (proved against optimum's graph: max relative difference "
                      f"{attention['max_relative_difference']:.2g})")
    elif attention:
        console.print(f"attention: optimum's graph kept — {attention.get('why', 'not rewritten')}")
    verification = report.verification
    if verification and "error" in verification:
        console.print(f"verification skipped: {verification['error']}", style="yellow")
    elif verification:
        quality = ", ".join(f"{k} {v:g}" for k, v in verification["quality"]["vs_fp32"].items())
        speed = verification["speed"]
        # n_examples counts scored tokens for language models, texts for the other tasks
        unit = {TASK_CAUSAL_LM: "tokens of held-out text",
                TASK_MASKED_LM: "masked tokens of held-out text",
                TASK_TOKEN_CLASSIFICATION: "tokens of held-out text",
                TASK_SEQ2SEQ: "teacher-forced tokens of held-out text"}.get(verification["quality"]["task"], "held-out texts")
        console.print(
            f"vs FP32 on {verification['quality']['n_examples']} {unit}: {quality}\n"
            f"CPU latency speed-up (p50, {verification['device']}): "
            f"{speed['vs_fp32']['geomean_speedup']:.2f}× vs FP32, {speed['vs_fp16']['geomean_speedup']:.2f}× vs FP16"
        )
        # one unwrapped line: a newline the console put inside the quoted path would be pasted as part of it
        console.print(f"`cptq verify {shlex.quote(str(result.paths.folder))}` measures more shapes and gates on "
                      "thresholds", soft_wrap=True, markup=False, highlight=False)


@user_errors
def export(
    model: str | None = typer.Argument(None, help="Hub id or local folder; omitted: the embedded MiniLM."),
    # a string, not a Path: typer would make '' the current folder
    output: str = typer.Option("out/model.onnx", "-o", "--output", help="model.onnx path, or a folder."),
    method: str | None = typer.Option(None, "--method",
                                      help="Sensitivity method: cmpq, pmpq, tdmpq or oracle (default tdmpq); or rule: "
                                           "llama.cpp's k_quant_mixed layer rule (no measurement)."),
    plan: Path | None = typer.Option(None, "--plan", help="Use this plan JSON instead of a method."),
    default_bits: int | None = typer.Option(
        None, "--default-bits", help="With --plan: bits (16, 8 or 4) for the layers the plan leaves out; without "
                                     "it a plan must name every layer."),
    bits: int | None = typer.Option(None, "--bits", help="Uniform plan: every layer at 16, 8 or 4 bits."),
    block_size: int = options.BLOCK_SIZE,
    clip: str = options.CLIP,
    zero_points: str = options.ZERO_POINTS,
    algorithm: str = typer.Option("gptq", "--algorithm",
                                  help="4-bit codes: gptq (error-compensating, uses calibration text) or rtn."),
    weight_format: str = typer.Option(
        "auto", "--format",
        help="auto: the fastest of qdq and dynamic measured on this machine at the task's shapes (encoders; "
             "decoders take qdq), recorded in the report; "
             "qdq: standard DequantizeLinear that ORT fuses into MatMulNBits; nbits: MatMulNBits directly; "
             "dynamic: int8 DynamicQuantizeMatMul (activations quantized at run time; fastest for encoders on CPU, "
             "4-bit layers stay 4-bit on disk)."),
    outlier_ratio: float = typer.Option(
        DEFAULT_OUTLIER_RATIO, "--outlier-ratio",
        help="--format dynamic: input channels whose calibration peak is above this many times the layer's median "
             "are scaled down before the int8 product (weights scaled up to match); 0: off."),
    reduce_range: bool | None = typer.Option(
        None, "--reduce-range/--no-reduce-range",
        help="--format dynamic: int8 weights within ±63, as ORT's reduce_range (slightly coarser, exact on every "
             "CPU). Default: on where this CPU's int8 GEMM saturates full-range weights (x86 AVX2 without VNNI), "
             "off elsewhere; give --reduce-range when the model will run on such a CPU.", show_default=False),
    attention: str = typer.Option(
        ATTENTION_GQA, "--attention",
        help="Causal LMs: gqa writes a Llama/Mistral/Qwen2 decoder's attention as ORT's GroupQueryAttention when "
             "its outputs match optimum's graph on the export (checked, else kept; the report says which); "
             "optimum keeps optimum's attention ops."),
    task: str | None = options.TASK,
    trust_remote_code: bool = typer.Option(False, "--trust-remote-code", help="Allow the model's own code."),
    force: bool = typer.Option(False, "--force", help="Overwrite an existing output."),
    progress: bool = options.PROGRESS,
    verify: bool = typer.Option(True, "--verify/--no-verify",
                                help="Measure quality and CPU latency against FP32/FP16 at the end (a few seconds)."),
    calib: str | None = options.CALIB,
    text_field: str = options.TEXT_FIELD,
    calib_samples: int = options.CALIB_SAMPLES,
    seq_len: int = options.SEQ_LEN,
    seed: int = options.SEED,
    sparsity: str = options.SPARSITY,
    bit_widths: str = options.BIT_WIDTHS,
    granularity: str = options.GRANULARITY,
    target_bits: float | None = options.TARGET_BITS,
    max_size_mb: float | None = options.MAX_SIZE_MB,
    cca: str = options.CCA,
    curvature: str = options.CURVATURE,
    lm_loss: str = options.LM_LOSS,
    hot_rows: bool = options.HOT_ROWS,
    override: list[str] | None = typer.Option(
        None, "--override",
        help="PATTERN=BITS (repeatable): layers whose name the regular expression matches get BITS (16, 8 or 4), "
             "after the method's allocation and within its budget; e.g. --override lm_head=8 --override '.*down_proj=8'."),
) -> None:
    """Export MODEL to a mixed-precision ONNX folder that ONNX Runtime runs with low-bit kernels."""
    from ..api import export as export_model

    result = export_model(model, output, task=task, method=method, bits=bits, plan=plan, default_bits=default_bits,
                          target_bits=target_bits, max_size_mb=max_size_mb, overrides=override or (), calibration=calib,
                          text_field=text_field, calib_samples=calib_samples, seq_len=seq_len, seed=seed,
                          algorithm=algorithm, weight_format=weight_format, block_size=block_size, clip=clip,
                          zero_points=zero_points, hot_rows=hot_rows, outlier_ratio=outlier_ratio,
                          bit_widths=options.ints(bit_widths, "--bit-widths"), granularity=granularity,
                          sparsity=options.sparsities(sparsity), cca=cca, curvature=curvature,
                          lm_loss=lm_loss, verify=verify, force=force, progress=progress, trust_remote_code=trust_remote_code,
                          attention=attention, reduce_range=reduce_range)
    print_summary(result, Console(markup=False))  # paths, model names, errors are text: `out[/x]` is no markup tag
