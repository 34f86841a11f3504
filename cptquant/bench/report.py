"""docs/benchmarks.md and docs/pareto.png from the results of one run."""

from __future__ import annotations

import platform
from datetime import date
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import onnxruntime as ort

from ..model_loading import TASK_CAUSAL_LM
from .anchors import FP16, FP32, ORT_INT8
from .run import ModelResult, Variant

if TYPE_CHECKING:
    from collections.abc import Callable, Sequence

    from matplotlib.axes import Axes


def machine() -> str:
    import os

    from ..runtimes.cpu import _cpu_model

    return (f"{_cpu_model()}, {os.cpu_count()} cores, Python {platform.python_version()}, "
            f"onnxruntime {ort.__version__}, CPU execution provider with 2 intra-op threads")


def _quality_columns(task: str) -> list[str]:
    return ["perplexity", "Δ ppl vs FP32", "top-1 agree"] if task == TASK_CAUSAL_LM else [
        "mean cos", "min cos", "NN agree"]


def _quality_cells(task: str, v: Variant) -> list[str]:
    q = v.quality
    if not q:
        return ["–"] * 3
    if task == TASK_CAUSAL_LM:
        if v.name == FP32:
            return [f"{q['perplexity']:.3f}", "0", "1"]
        return [f"{q['perplexity']:.3f}", f"{100 * q['ppl_increase']:+.2f} %", f"{q['top1_agreement']:.3f}"]
    if v.name == FP32:
        return ["1", "1", "1"]
    return [f"{q['mean_cosine']:.4f}", f"{q['min_cosine']:.4f}", f"{q['nn_agreement']:.3f}"]


def _p50(v: Variant, key: str) -> float:
    return float(v.latency[key]["p50_ms"])


def model_section(result: ModelResult) -> str:
    spec, task = result.spec, result.task
    by_name = {v.name: v for v in result.variants}
    fp16 = by_name[FP16].model_bytes
    keys = result.latency_keys
    lines = [f"## {spec.title}", ""]
    if result.quality_settings:
        lines.append(f"Quality against FP32 on held-out text ({', '.join(f'{k} {v}' for k, v in result.quality_settings.items())}). "
                     "Latency: median (p50) of interleaved runs at batch 1; ratios are FP32 time / variant time "
                     "and ORT-int8 time / variant time, measured in the same run.")
    else:
        lines.append("Random weights: cost and speed only (quality would mean nothing). Latency: median of "
                     "interleaved runs at batch 1.")
    lines.append("")
    header = ["variant", "avg bits", "MB on disk", "× under FP16"] + (_quality_columns(task) if result.quality_settings else [])
    for key in keys:
        header += [f"{key} ms", "vs FP32", "vs int8"]
    lines.append("| " + " | ".join(header) + " |")
    lines.append("|" + "---|" * len(header))
    for v in result.variants:
        row = [v.name, "–" if v.average_bits is None else f"{v.average_bits:.2f}", f"{v.model_bytes / 1e6:.2f}",
               f"{fp16 / v.model_bytes:.2f}"]
        if result.quality_settings:
            row += _quality_cells(task, v)
        for key in keys:
            row += [f"{_p50(v, key):.2f}", f"{_p50(by_name[FP32], key) / _p50(v, key):.2f}",
                    f"{_p50(by_name[ORT_INT8], key) / _p50(v, key):.2f}"]
        lines.append("| " + " | ".join(row) + " |")
    lines += ["", "Sensitivity analysis (forward-pass equivalents: seconds / the seconds of one forward pass over "
              f"the same calibration set, {result.forward_s:.2f} s here; Spearman: rank correlation with the "
              "measured 4-bit damage of each layer):", "",
              "| method | cost (FPE) | Spearman vs oracle | peak memory of the pass | ≤ 2× model + 1 batch |",
              "|---|---|---|---|---|"]
    for method, cost in result.cost_fpe.items():
        rho = result.spearman.get(method)
        memory = result.pass_memory.get(method)
        cells = ["–", "–"] if memory is None else [
            f"{memory['peak_bytes'] / 1e6:.0f} MB above the loaded model ({memory['peak_over_model']:.2f}× its "
            f"{memory['model_bytes'] / 1e6:.0f} MB; one batch of activations: {memory['activation_bytes'] / 1e6:.0f} MB)",
            "yes" if memory["within_goal"] else "**no**"]
        lines.append(f"| {method} | {cost:.2f} | {'–' if rho is None else f'{rho:.3f}'} | " + " | ".join(cells) + " |")
    lines += ["", f"_{spec.key}: {result.seconds / 60:.1f} minutes for this section._", ""]
    return "\n".join(lines)


def pareto_plot(results: list[ModelResult], path: Path, extra_panels: Sequence[Callable[[Axes], None]] = ()) -> None:
    """One panel per model with quality figures, then one per callable in `extra_panels` (each draws on
    the axes it is given: the SmolLM2 section's panel)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    with_quality = [r for r in results if r.quality_settings]
    panels = max(1, len(with_quality) + len(extra_panels))
    fig, axes = plt.subplots(1, panels, figsize=(6.5 * panels, 4.6), squeeze=False)
    for ax, draw in zip(axes[0][len(with_quality):], extra_panels):
        draw(ax)
    for ax, result in zip(axes[0], with_quality):
        causal = result.task == TASK_CAUSAL_LM

        floor = 1e-9  # log axis for cosine: a variant with 1 − cos of 0 is drawn at this floor and labelled so

        def y(v: Variant) -> float:
            if causal:
                return 100 * float(v.quality["ppl_increase"])  # linear axis: a quantized LM may even gain a little
            return max(1 - float(v.quality["mean_cosine"]), floor)

        families: dict[str, list[Variant]] = {}
        for v in result.variants:
            if v.name != FP32:  # the reference itself: zero by definition
                families.setdefault(v.family, []).append(v)
        for family, members in families.items():
            if family == "anchor":
                for v in members:
                    label = v.name + (" (at floor)" if not causal and y(v) <= floor else "")
                    ax.scatter(v.model_bytes / 1e6, y(v), marker="s", s=40, label=label, zorder=3)
                continue
            members = sorted(members, key=lambda v: v.model_bytes)
            ax.plot([v.model_bytes / 1e6 for v in members], [y(v) for v in members], marker="o",
                    label=f"cptq {family}" if family != "uniform" else "cptq uniform 8/4", linestyle="-"
                    if family != "uniform" else ":")
        ax.set_xlabel("MB on disk (model.onnx)")
        ax.set_ylabel("perplexity increase vs FP32 (%)" if causal else "1 − mean cosine vs FP32")
        if not causal:
            ax.set_yscale("log")
        else:
            ax.axhline(0, color="grey", linewidth=0.8)
        ax.set_title(result.spec.title, fontsize=10)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_markdown(results: list[ModelResult], path: Path, goals: str, command: str, minutes: float,
                   load: str = "", extra_sections: tuple[str, ...] = ()) -> None:
    parts = [
        "# Benchmarks", "",
        f"Produced by `{command}` on {date.today().isoformat()} in {minutes:.0f} minutes; every figure below comes "
        "from that one run. Machine: " + machine() + ". " + load, "",
        "Sizes are `model.onnx` (+ external data) bytes; FP16 is the same optimum export converted with ORT's "
        "float16 converter (FP32 inputs and outputs kept). ORT int8 dynamic is `quantize_dynamic(per_channel=True)` "
        "(with `reduce_range` on a CPU whose int8 GEMM saturates: AVX2 without VNNI); "
        "ORT int4 RTN is `MatMulNBitsQuantizer(block_size=32, is_symmetric=True)`; both run on the same FP32 export. "
        "cptq variants: `cptq <method> <budget>` ranks layers with that method and allocates bits at the default "
        "k-harmonic-means clustering (KHM), at an average-bits budget, or at a file-size budget; 4-bit MatMul codes "
        "come from GPTQ unless marked (RTN); `uniform` is the same bits everywhere through the same exporter.",
        "", "![size against quality](pareto.png)", "", goals, "",
    ]
    parts += [model_section(r) for r in results] + list(extra_sections)
    path.write_text("\n".join(parts))


def geomean(values: list[float]) -> float:
    return float(np.exp(np.mean(np.log(values)))) if values else float("nan")
