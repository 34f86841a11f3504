"""`python -m cptquant.bench.encoder_goals --out DIR`: the encoder goals of issue 13, measured in one run.

MiniLM exported as the demo does (`cptq-export --method tdmpq --max-size-mb 16`, no `--format`: the format is
chosen by measured speed), the same with `--format qdq` and with `--no-hot-rows`, against FP32 and ORT's
`quantize_dynamic(per_channel=True)` int8 of the same FP32 export (`reduce_range` where the CPU's int8 GEMM
saturates, bench/anchors.py). Quality against FP32 (mean cosine and
nearest-neighbour agreement of mean-pooled embeddings) on two held-out sets: docstrings the calibration never
reads (`corpus.evaluation_sentences()`) and sentences of another domain (`corpus.other_domain_sentences()`:
licence and manual prose). Speed: p50 at batch x sequence 1x16, 1x128, 8x128, 2 threads, all variants
interleaved, each stated as a ratio to int8 dynamic and to FP32 measured in the same rounds.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ..model_loading import load_model
from ..onnx_io.onnx_export import MODEL_FILE
from ..runtimes.base import model_bytes
from ..runtimes.cpu import CpuAdapter
from ..runtimes.quality import EvalSet, QualitySettings, TextEncoder, measure_quality
from ..runtimes.speed import SpeedSettings, encoder_latency
from .anchors import FP32, ORT_INT8, ort_int8_dynamic

SHAPES = ((1, 16), (1, 128), (8, 128))
DEMO = ("--method", "tdmpq", "--max-size-mb", "16")
EXPORTS = {"cptq default (format chosen)": DEMO, "cptq --format qdq": DEMO + ("--format", "qdq"),
           "cptq default --no-hot-rows": DEMO + ("--no-hot-rows",)}
DEFAULT = "cptq default (format chosen)"


def build(root: Path, log: Callable[[str], object] = print) -> dict[str, Path]:
    from ..onnx_io.onnx_export import export_onnx

    fp32 = root / "fp32" / MODEL_FILE
    if not fp32.exists():
        export_onnx(load_model(None), fp32.parent)
    int8 = root / "ort-int8-dynamic" / MODEL_FILE
    if not int8.exists():
        ort_int8_dynamic(fp32, int8)
    paths = {FP32: fp32, ORT_INT8: int8}
    for i, (name, args) in enumerate(EXPORTS.items()):
        out = root / f"cptq-{i}" / MODEL_FILE
        if not out.exists():
            log(f"encoder goals: exporting {name} …")
            subprocess.run([str(Path(sys.executable).with_name("cptq-export")), *args, "-o", str(out), "--force",
                            "--no-progress", "--no-verify"], check=True, stdout=subprocess.DEVNULL)
        paths[name] = out
    return paths


def measure(paths: dict[str, Path], runs: int = 30) -> dict[str, Any]:
    loaded_config = load_model(None).config
    adapter = CpuAdapter(threads=2)
    sessions = {name: adapter.session(path) for name, path in paths.items()}
    encoder = TextEncoder(paths[FP32].parent, loaded_config)
    from ..corpus import evaluation_sentences, other_domain_sentences

    quality: dict[str, dict[str, Any]] = {}
    for domain, texts in (("docstrings", evaluation_sentences(400)), ("other domain", other_domain_sentences()[:400])):
        q = measure_quality("feature-extraction", adapter, sessions, encoder, loaded_config,
                            QualitySettings.for_mode(False), EvalSet(texts), candidate=FP32, progress=False).to_dict()
        quality[domain] = {name: q[f"vs_{name}"] for name in paths if name != FP32}
    load_before = os.getloadavg()[0]
    rounds: dict[str, dict[str, list[float]]] = {}
    latency = encoder_latency(adapter, sessions, loaded_config.vocab_size, loaded_config.max_position_embeddings,
                              SpeedSettings(encoder_shapes=SHAPES, warmup=5, runs=runs), progress=False,
                              rounds=rounds)
    report = json.loads((paths[DEFAULT].parent / "model.report.json").read_text())
    return {"device": adapter.device_name(), "runs": runs, "load_before": load_before,
            "load_after": os.getloadavg()[0], "quality": quality, "latency": latency,
            "bytes": {name: model_bytes(path) for name, path in paths.items()},
            "format_choice": report.get("format_choice")}


def section(results: dict[str, Any]) -> str:
    keys = [f"b{b}_s{s}" for b, s in SHAPES]
    lat = results["latency"]
    lines = ["## MiniLM encoder goals (issue 13)", "",
             f"{results['device']}, p50 of {results['runs']} interleaved runs per variant and shape; load average "
             f"{results['load_before']:.1f} before the timing, {results['load_after']:.1f} after (2 cores shared: "
             "absolute times move with load, the ratios are from the same rounds). Quality against FP32 on 400 "
             "held-out docstrings and 400 other-domain sentences.", "",
             "| variant | MB | cos / NN docstrings | cos / NN other domain | " +
             " | ".join(f"{k}: ms, × int8, × FP32" for k in keys) + " |", "|---" * (4 + len(keys)) + "|"]
    for name in lat:
        cells = [name, f"{results['bytes'][name] / 1e6:.2f}"]
        for domain in ("docstrings", "other domain"):
            q = results["quality"][domain].get(name)
            cells.append(f"{q['mean_cosine']:.4f} / {q['nn_agreement']:.3f}" if q else "1 / 1")
        for k in keys:
            ms = lat[name][k]["p50_ms"]
            cells.append(f"{ms:.2f}, {lat[ORT_INT8][k]['p50_ms'] / ms:.2f}, {lat[FP32][k]['p50_ms'] / ms:.2f}")
        lines.append("| " + " | ".join(cells) + " |")
    choice = results.get("format_choice")
    if choice:
        lines += ["", f"Format chosen for the default export: **{choice['format']}** — {choice['reason']} "
                      f"(probe timings at load average {choice['load_average']})."]
    return "\n".join(lines + [""])


def goal_lines(results: dict[str, Any]) -> list[str]:
    def mark(ok: bool) -> str:
        return "**met**" if ok else "**not met**"

    lat, q = results["latency"], results["quality"]
    out = []
    d = DEFAULT
    for k in [f"b{b}_s{s}" for b, s in SHAPES]:
        vs_int8 = lat[ORT_INT8][k]["p50_ms"] / lat[d][k]["p50_ms"]
        vs_fp32 = lat[FP32][k]["p50_ms"] / lat[d][k]["p50_ms"]
        out.append(f"- Default export at {k}: ≥ 1.0× int8 dynamic {mark(vs_int8 >= 1.0)} ({vs_int8:.2f}×), "
                   f"≥ 1.6× FP32 {mark(vs_fp32 >= 1.6)} ({vs_fp32:.2f}×).")
    size = results["bytes"][d] / 1e6
    doc, other, int8 = q["docstrings"][d], q["other domain"][d], q["other domain"][ORT_INT8]
    out.append(f"- Default export ({size:.2f} MB) on held-out docstrings: cosine ≥ 0.995 "
               f"{mark(doc['mean_cosine'] >= 0.995 and size <= 16)} ({doc['mean_cosine']:.4f}), NN ≥ 0.95 "
               f"{mark(doc['nn_agreement'] >= 0.95 and size <= 16)} ({doc['nn_agreement']:.3f}).")
    dc, dn = other["mean_cosine"] - int8["mean_cosine"], other["nn_agreement"] - int8["nn_agreement"]
    out.append(f"- Default export on the other domain above int8 dynamic by ≥ 0.003 cosine {mark(dc >= 0.003)} "
               f"({other['mean_cosine']:.4f} vs {int8['mean_cosine']:.4f}) and ≥ 0.02 NN {mark(dn >= 0.02)} "
               f"({other['nn_agreement']:.3f} vs {int8['nn_agreement']:.3f}).")
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True, help="Working folder for the exports and results.json.")
    parser.add_argument("--runs", type=int, default=30)
    args = parser.parse_args(argv)
    results = measure(build(args.out, lambda m: print(m, file=sys.stderr, flush=True)), args.runs)
    (args.out / "results.json").write_text(json.dumps(results, indent=2, ensure_ascii=False) + "\n")
    print(section(results))
    print("\n".join(goal_lines(results)))


if __name__ == "__main__":
    main()
