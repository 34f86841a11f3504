"""`cptq analyze`: score every layer's sensitivity, allocate bits, write scores.json and a plot."""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING

from typer import Argument, Option

from ..errors import CptqError
from ..output_folder import (
    Staging,
    check_writable,
    claim_output,
    commit,
    output_path,
    owned_files,
    refuse_folders_in_place,
    refuse_replacing,
)
from . import options

if TYPE_CHECKING:
    from matplotlib.axes import Axes

    from ..layer_graph import LayerGraph
    from ..passes import AnalysisResult

METHOD_CHOICES = ("cmpq", "pmpq", "tdmpq", "all")


def owned_by_analysis(name: str) -> bool:
    """The files `cptq analyze` writes into its folder (replaced only with --force)."""
    return name in ("scores.json", "scores.png") or (name.startswith("plan-") and name.endswith(".json"))


def _depths(result: AnalysisResult, graph: LayerGraph) -> dict[str, int]:
    """Unit -> depth: its block, -1 for what comes before the blocks (embeddings), num_blocks after (head)."""
    depths: dict[str, int] = {}
    seen_block = False
    for unit, names in result.units.items():
        block = graph[names[0]].block
        seen_block = seen_block or block is not None
        depths[unit] = block if block is not None else (graph.num_blocks if seen_block else -1)
    return depths


def _plot_depth(ax: Axes, result: AnalysisResult, series: dict[str, dict[str, float]], graph: LayerGraph) -> None:
    """Mean score per depth, each series scaled to its largest: where each method puts the sensitivity."""
    depths = _depths(result, graph)
    xs = sorted(set(depths.values()))
    for method, scores in series.items():
        means = [sum(scores.get(u, 0.0) for u in depths if depths[u] == d) /
                 sum(1 for u in depths if depths[u] == d) for d in xs]
        peak = max(abs(m) for m in means) or 1.0
        style = dict(color="black", linewidth=2.5) if method == "oracle" else dict(linewidth=1.2)
        ax.plot(xs, [m / peak for m in means], marker="o", label=method, **style)
    ax.set_xticks(xs)
    ax.set_xticklabels(["emb" if d < 0 else "head" if d >= graph.num_blocks else str(d) for d in xs], fontsize=7)
    ax.set_title("score by depth (mean per block, each method scaled to its largest)", fontsize=9)
    ax.set_xlabel("block")
    ax.legend(fontsize=7)


def _plot(path: Path, result: AnalysisResult, plans: dict[str, dict[str, int]], graph: LayerGraph | None = None) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Rectangle

    units = list(result.units)
    series = dict(result.scores)
    if result.oracle is not None:
        series["oracle"] = result.oracle
    rows = len(series) + (graph is not None)
    fig, axes = plt.subplots(rows, 1, figsize=(max(8, len(units) * 0.25), 2.6 * rows), squeeze=False)
    colours: dict[int | None, str] = {16: "tab:red", 8: "tab:orange", 4: "tab:green"}  # None: no plan, grey
    for ax, (method, scores) in zip(axes[:, 0], series.items()):
        values = [scores.get(unit, 0.0) for unit in units]
        bits = plans.get(method, {})
        ax.bar(range(len(units)), values, color=[colours.get(bits.get(unit), "tab:gray") for unit in units])
        title = method + (f"  (Spearman vs oracle {result.spearman[method]:.2f})" if method in result.spearman else "")
        ax.set_title(title, fontsize=9)
        ax.set_ylabel("score")
        ax.set_xticks(range(len(units)))
        ax.set_xticklabels([])
    axes[len(series) - 1, 0].set_xticklabels(units, rotation=90, fontsize=6)
    if graph is not None:
        _plot_depth(axes[-1, 0], result, series, graph)
    handles = [Rectangle((0, 0), 1, 1, color=c) for c in colours.values()]
    fig.legend(handles, [f"{b} bits" for b in colours], loc="upper right", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def analyze(
    model: str | None = Argument(None, help="Hub id or model folder; the embedded MiniLM when omitted."),
    method: str = Option("cmpq", "--method", "-m", help="cmpq, pmpq, tdmpq or all."),
    validate: bool = Option(False, "--validate", help="Also run the 4-bit oracle and report Spearman per method."),
    out_arg: str = Option("analysis", "--out", "-o", help="Output folder for scores.json and scores.png."),
    task: str | None = options.TASK,
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
    block_size: int = options.BLOCK_SIZE,
    clip: str = options.CLIP,
    cca: str = options.CCA,
    curvature: str = options.CURVATURE,
    lm_loss: str = options.LM_LOSS,
    zero_points: str = options.ZERO_POINTS,
    hot_rows: bool = options.HOT_ROWS,
    progress: bool = options.PROGRESS,
    force: bool = Option(False, "--force", help="Replace the scores, plans and plot of an earlier analysis in --out."),
) -> None:
    """Measure per-layer quantization sensitivity and write scores, chosen bits and a plot."""
    from rich.console import Console
    from rich.table import Table

    from ..api import analyze as analyze_model

    if method not in METHOD_CHOICES:
        raise CptqError(f"unknown method {method!r}; use one of: {', '.join(METHOD_CHOICES)}")
    methods = ("cmpq", "pmpq", "tdmpq") if method == "all" else (method,)
    analysis = options.analysis_options(calib, text_field, calib_samples, seq_len, seed, sparsity, bit_widths,
                                        granularity, target_bits, max_size_mb, block_size, clip, cca, curvature,
                                        zero_points, hot_rows, lm_loss)  # fails before loading a model
    out = output_path(out_arg)  # a string: typer would make '' a Path of the current folder
    check_writable(out)
    refuse_folders_in_place(out, owned_by_analysis)
    if not force:
        refuse_replacing(out, owned_files(out, owned_by_analysis))
    with claim_output(out):  # one writer per folder; staged, then moved in all at once
        measured = analyze_model(model, task=task, methods=methods, validate=validate, calibration=analysis,
                                 progress=progress)
        result, plans = measured.result, measured.plans
        unit_bits = {m: {u: plan.layers[names[0]].bits for u, names in result.units.items()}
                     for m, plan in plans.items()}
        report = {
            "model": measured.model, "task": result.task, "granularity": result.granularity,
            "calibration": result.calibration, "base_loss": result.base_loss, "units": result.units,
            "scores": result.scores, "bits": unit_bits, "oracle": result.oracle, "spearman": result.spearman,
            "cost_fpe": result.cost_fpe, "seconds": result.seconds, "notes": result.notes,
        }
        with Staging(out) as staging:
            (staging.out / "scores.json").write_text(json.dumps(report, indent=2, sort_keys=True) + "\n")
            for m, plan in plans.items():
                plan.save(staging.out / f"plan-{m}.json")
            _plot(staging.out / "scores.png", result, unit_bits, measured.graph)
            written = {p.name for p in staging.out.iterdir()}
            if not force:  # nothing appeared meanwhile (the lock keeps other cptq runs out; not other programs)
                refuse_replacing(out, owned_files(out, owned_by_analysis))
            commit(staging, tuple(name for name in owned_files(out, owned_by_analysis) if name not in written))

    console = Console(markup=False)  # paths and model names are text: `out[/x]` is no markup tag
    table = Table(title=f"Sensitivity of {measured.model} ({result.task}, {result.granularity})")
    table.add_column("unit")
    for m in result.scores:
        table.add_column(f"{m} score", justify="right")
        table.add_column("bits", justify="right")
    if result.oracle is not None:
        table.add_column("oracle", justify="right")
    for unit in result.units:
        row = [unit]
        for m, scores in result.scores.items():
            row += [f"{scores[unit]:.4g}", str(unit_bits[m][unit])]
        if result.oracle is not None:
            row.append(f"{result.oracle[unit]:.4g}")
        table.add_row(*row)
    console.print(table)
    for m, cost in result.cost_fpe.items():
        line = f"{m}: {cost:.2f} FPE"
        if m in result.spearman:
            line += f", Spearman vs oracle {result.spearman[m]:.3f}"
        console.print(line)
    for note in result.notes:
        console.print(f"note: {note}")
    console.print(f"wrote {out / 'scores.json'}, {out / 'scores.png'} and a plan per method")
