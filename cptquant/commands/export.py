"""`cptq-export` / `cptq export`: a Hugging Face model in, a mixed-precision ONNX folder out."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer
from rich.console import Console
from rich.table import Table

from ..errors import CptqError
from ..exporter.pipeline import ExportResult, export_quantized
from ..exporter.qdq_rewrite import FORMATS
from ..exporter.quantize import CLIP_METHODS
from ..layer_graph import LayerGraph
from ..model_loading import LoadedModel, load_model
from ..plan import DEFAULT_BLOCK_SIZE, SUPPORTED_BITS, Plan, check_block_size, uniform_plan
from . import user_errors

PASS_METHODS = ("cmpq", "pmpq", "tdmpq", "oracle")


def plan_factory(method: Optional[str], plan_file: Optional[Path], bits: Optional[int], block_size: int,
                 clip: str, symmetric: bool):
    """Decide where the plan comes from: a file, a uniform bit width, or a sensitivity method."""
    given = [name for name, value in (("--method", method), ("--plan", plan_file), ("--bits", bits)) if value]
    if len(given) > 1:
        raise CptqError(f"give only one of --method, --plan and --bits (got {' and '.join(given)})")
    if clip not in CLIP_METHODS:
        raise CptqError(f"--clip must be one of {', '.join(CLIP_METHODS)}, not {clip!r}")
    check_block_size(block_size)
    if bits is not None:
        if bits not in SUPPORTED_BITS:
            raise CptqError(f"--bits {bits} is not supported (use 16, 8 or 4)")

        def uniform(loaded: LoadedModel, graph: LayerGraph) -> Plan:
            plan = uniform_plan(graph, bits, block_size, symmetric)
            plan.clip = clip
            return plan

        return uniform
    if plan_file is not None:
        plan = Plan.load(plan_file)  # read now: a bad plan fails before the model is loaded
        return lambda loaded, graph: plan
    method = method or "cmpq"
    if method not in PASS_METHODS:
        raise CptqError(f"unknown method {method!r}; use one of {', '.join(PASS_METHODS)}")
    raise CptqError(f"--method {method} is not yet available in this build; use --bits N or --plan FILE")


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


@user_errors
def export(
    model: Optional[str] = typer.Argument(None, help="Hub id or local folder; omitted: the embedded MiniLM."),
    output: Path = typer.Option(Path("out/model.onnx"), "-o", "--output", help="model.onnx path, or a folder."),
    method: Optional[str] = typer.Option(None, "--method", help="Sensitivity method: cmpq, pmpq, tdmpq, oracle."),
    plan: Optional[Path] = typer.Option(None, "--plan", help="Use this plan JSON instead of a method."),
    bits: Optional[int] = typer.Option(None, "--bits", help="Uniform plan: every layer at 16, 8 or 4 bits."),
    block_size: int = typer.Option(DEFAULT_BLOCK_SIZE, "--block-size", help="Quantization block along the input."),
    clip: str = typer.Option("absmax", "--clip", help="Scale choice: absmax, or mse (clip search)."),
    asymmetric: bool = typer.Option(False, "--asymmetric", help="Unsigned weights with zero points."),
    weight_format: str = typer.Option("qdq", "--format",
                                      help="qdq: standard DequantizeLinear that ORT fuses; nbits: MatMulNBits directly."),
    task: Optional[str] = typer.Option(None, "--task", help="Override the task detected from the config."),
    trust_remote_code: bool = typer.Option(False, "--trust-remote-code", help="Allow the model's own code."),
    force: bool = typer.Option(False, "--force", help="Overwrite an existing output."),
    progress: bool = typer.Option(True, "--progress/--no-progress", help="Progress bars on stderr."),
) -> None:
    """Export MODEL to a mixed-precision ONNX folder that ONNX Runtime runs with low-bit kernels."""
    if weight_format not in FORMATS:
        raise CptqError(f"--format must be one of {', '.join(FORMATS)}, not {weight_format!r}")
    make_plan = plan_factory(method, plan, bits, block_size, clip, not asymmetric)
    from ..exporter.pipeline import resolve_output

    resolve_output(output, force)  # fail on a bad output path before the slow work
    loaded = load_model(model, task, trust_remote_code)
    result = export_quantized(loaded, make_plan, output, force=force, progress=progress, fmt=weight_format)
    print_summary(result, Console())
