"""`python -m cptquant.bench.dynamic --out DIR`: MiniLM in `--format qdq` against `--format dynamic`.

The same plans (TDMPQ at a size budget, uniform 8 and 4 bits; GPTQ codes at 4 bits) exported in
both formats (dynamic also with `--outlier-ratio 0`), next to FP32 and ORT's own `quantize_dynamic(per_channel=True)` of the same FP32
export: size on disk, quality against FP32 (mean cosine and nearest-neighbour agreement of pooled
embeddings, 400 held-out sentences), and p50 latency at batch 1, sequence 16 and 128, 2 threads,
all variants interleaved. The timing is repeated `--rounds` times (the load average is recorded
before each) because the 2 cores are shared; every ratio is to ORT int8 dynamic in the same round.
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

from ..onnx_io.onnx_export import MODEL_FILE
from ..exporter.pipeline import DEFAULT_OUTLIER_RATIO, export_quantized, exported_layer_graph
from ..quant.storage import FORMAT_DYNAMIC, FORMAT_QDQ
from ..model_loading import load_model
from ..passes import AnalysisOptions, analyze, plan_from_scores
from ..plan import apply_zero_points, uniform_plan
from ..runtimes.base import model_bytes
from ..runtimes.cpu import CpuAdapter
from ..runtimes.quality import QualitySettings, TextEncoder, measure_quality
from ..runtimes.speed import SpeedSettings, encoder_latency
from .anchors import FP32, ORT_INT8

SHAPES = ((1, 16), (1, 128))
# (label, format, outlier ratio)
FORMATS = (("qdq", FORMAT_QDQ, 0.0), ("dynamic", FORMAT_DYNAMIC, DEFAULT_OUTLIER_RATIO),
           ("dynamic, outlier ratio 0", FORMAT_DYNAMIC, 0.0))


def anchors(loaded, root: Path) -> dict[str, Path]:
    from onnxruntime.quantization import QuantType, quantize_dynamic

    from ..onnx_io.onnx_export import export_onnx

    fp32 = root / "fp32" / MODEL_FILE
    if not fp32.exists():
        export_onnx(loaded, fp32.parent)
    int8 = root / "ort-int8-dynamic" / MODEL_FILE
    int8.parent.mkdir(parents=True, exist_ok=True)
    quantize_dynamic(fp32, int8, weight_type=QuantType.QInt8, per_channel=True)
    return {FP32: fp32, ORT_INT8: int8}


def plans(loaded, fp32_dir: Path, max_size_mb: float) -> dict:
    graph, _ = exported_layer_graph(loaded, fp32_dir)
    options = AnalysisOptions(max_size_mb=max_size_mb)
    result = analyze(loaded, graph, ("tdmpq",), options, progress=False)
    tdmpq = plan_from_scores(graph, result.scores["tdmpq"], "tdmpq", options, loaded.display_name,
                             non_quantizable_params=result.non_quantizable_params, hot_rows=result.hot_rows)
    return {f"tdmpq ≤{max_size_mb:g} MB": tdmpq,
            "uniform 8 bits": apply_zero_points(uniform_plan(graph, 8), "auto"),
            "uniform 4 bits": apply_zero_points(uniform_plan(graph, 4), "auto")}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True, help="Working folder for the exports and results.json.")
    parser.add_argument("--max-size-mb", type=float, default=16.0)
    parser.add_argument("--rounds", type=int, default=3, help="Timing runs, one after the other.")
    parser.add_argument("--runs", type=int, default=200, help="Timed calls per variant and shape in each round.")
    args = parser.parse_args(argv)

    loaded = load_model(None)
    paths = anchors(loaded, args.out / "anchors")
    reports = {}
    for label, plan in plans(loaded, paths[FP32].parent, args.max_size_mb).items():
        for fmt_label, fmt, ratio in FORMATS:
            name = f"cptq {label} ({fmt_label})"
            out = args.out / "cptq" / f"{label}-{fmt_label}".replace(" ", "").replace("≤", "max").replace(",", "-")
            result = export_quantized(loaded, lambda _l, _g, plan=plan: plan, out, force=True, progress=False,
                                      fmt=fmt, algorithm="gptq", outlier_ratio=ratio)
            paths[name] = result.paths.model
            reports[name] = {"kernels": result.report["graph_check"]["kernels"],
                             "average_bits": result.report["average_bits"],
                             "outlier_channels": sum(e.get("outlier_channels", 0)
                                                     for e in result.report["layers"].values())}

    adapter = CpuAdapter(threads=2)
    sessions = {name: adapter.session(path) for name, path in paths.items()}
    quality = measure_quality(loaded.task, adapter, sessions, TextEncoder(paths[FP32].parent, loaded.config),
                              loaded.config, QualitySettings.for_mode(False), candidate=FP32, progress=False).to_dict()
    settings = SpeedSettings(encoder_shapes=SHAPES, warmup=10, runs=args.runs)
    rounds = []
    for _ in range(args.rounds):
        load = os.getloadavg()[0]
        latency = encoder_latency(adapter, sessions, loaded.config.vocab_size, loaded.config.max_position_embeddings,
                                  settings, progress=False)
        rounds.append({"load_before": load, "load_after": os.getloadavg()[0], "latency": latency})
    results = {"device": adapter.device_name(), "runs": args.runs, "rounds": rounds, "exports": reports,
               "variants": {name: {"model_bytes": model_bytes(path),
                                   **({} if name == FP32 else quality[f"vs_{name}"])} for name, path in paths.items()}}
    (args.out / "results.json").write_text(json.dumps(results, indent=2, ensure_ascii=False) + "\n")
    print(markdown(results))


def markdown(results: dict) -> str:
    keys = [f"b{b}_s{s}" for b, s in SHAPES]
    lines = [f"{results['device']}; p50 of {results['runs']} interleaved runs per variant and shape.", ""]
    for i, rnd in enumerate(results["rounds"], 1):
        lines += [f"Round {i} (load average {rnd['load_before']:.2f} before, {rnd['load_after']:.2f} after):", "",
                  "| variant | size MB | mean cosine | NN agreement | " +
                  " | ".join(f"ms seq {k.split('_s')[1]} | × int8 dyn" for k in keys) + " |",
                  "|---|---|---|---|" + "---|---|" * len(keys)]
        base = rnd["latency"][ORT_INT8]
        for name, v in results["variants"].items():
            lat = rnd["latency"][name]
            cells = [name, f"{v['model_bytes'] / 1e6:.2f}", f"{v.get('mean_cosine', 1.0):.4f}",
                     f"{v.get('nn_agreement', 1.0):.3f}"]
            for k in keys:
                # speed relative to int8 dynamic: > 1 is faster
                cells += [f"{lat[k]['p50_ms']:.2f}", f"{base[k]['p50_ms'] / lat[k]['p50_ms']:.2f}"]
            lines.append("| " + " | ".join(cells) + " |")
        lines.append("")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
