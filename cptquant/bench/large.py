"""`make bench-large`: peak memory and time of exports of large OPT-shaped models (issue 15's goals).

Each export runs in a fresh process under bench/export_memory.py (peak RSS per step); the models are the
random-weight OPT shapes of samples/random_models.py. Writes OUT/benchmarks-large.md and large-results.json.

    python -m cptquant.bench.large --out docs [--shapes opt-640m opt-2.7b]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

# (label, cptq-export options) per export; --no-verify: the short verification's sessions are not the export's
EXPORTS = (("--bits 4", ["--bits", "4", "--no-verify"]),
           ("tdmpq 4.5 bits", ["--method", "tdmpq", "--target-bits", "4.5", "--no-verify"]))
PEAK_GOAL = 1.5  # x the FP32 weight bytes
BASELINE_640M_S = 11 * 60  # the 640 M --bits 4 export before this work (issue 15, at cb7875b)


def run_export(folder: Path, options: list[str], work: Path) -> dict[str, Any]:
    out = work / "out"
    shutil.rmtree(out, ignore_errors=True)
    figures = work / "figures.json"
    command = [sys.executable, "-m", "cptquant.bench.export_memory", "--json", str(figures), "--",
               str(folder), *options, "-o", str(out), "--no-progress"]
    subprocess.run(command, check=False)
    result: dict[str, Any] = json.loads(figures.read_text())
    result["output_bytes"] = sum(p.stat().st_size for p in out.glob("model.onnx*")) if out.is_dir() else 0
    shutil.rmtree(out, ignore_errors=True)
    shutil.rmtree(work / ".cptq-cache", ignore_errors=True)
    return result


def section(results: dict[str, dict[str, dict[str, Any]]], minutes: float) -> str:
    lines = ["# Large models: peak memory and time of an export", "",
             f"`make bench-large` on {platform.node()} ({os.cpu_count()} cores), {minutes:.0f} min, load average "
             f"{os.getloadavg()[0]:.1f} at the end. Peak RSS per step of a fresh `cptq-export` process "
             "(bench/export_memory.py: VmRSS sampled every 20 ms, memory-mapped pages included; the overall peak is "
             "the process's high-water mark). Random-weight OPT shapes (samples/random_models.py).", ""]
    goals = []
    for shape, by_export in results.items():
        for label, r in by_export.items():
            weights = r["fp32_weight_bytes"]
            lines += [f"## {shape}, `{label}`", "",
                      f"FP32 weights {weights / 1e9:.2f} GB; exit code {r['exit_code']}; {r['wall_s'] / 60:.1f} min; "
                      f"output {r['output_bytes'] / 1e6:.0f} MB; peak {r['peak_bytes'] / 1e9:.2f} GB = "
                      f"{r['peak_over_weights']:.2f}× the FP32 weights.", "",
                      "| step | peak RSS (GB) | × FP32 weights |", "|---|---|---|"]
            lines += [f"| {step} | {peak / 1e9:.2f} | {peak / weights:.2f} |" for step, peak in r["steps"].items()]
            lines.append("")
            ok = r["exit_code"] == 0 and r["peak_over_weights"] <= PEAK_GOAL
            goals.append(f"- {shape} `{label}` peak ≤ {PEAK_GOAL}× the FP32 weights: {'**met**' if ok else '**not met**'}"
                         f" ({r['peak_over_weights']:.2f}×).")
            if shape == "opt-640m" and label == "--bits 4":
                fast = r["exit_code"] == 0 and r["wall_s"] <= BASELINE_640M_S / 2
                goals.append(f"- opt-640m `--bits 4` at least 2× faster than 11 min: {'**met**' if fast else '**not met**'}"
                             f" ({r['wall_s'] / 60:.1f} min).")
    return "\n".join(lines + ["## Goals", ""] + goals) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path("docs"))
    parser.add_argument("--shapes", nargs="+", default=["opt-640m"], help="OPT shapes (samples/random_models.py)")
    parser.add_argument("--exports", nargs="+", default=[label for label, _ in EXPORTS],
                        choices=[label for label, _ in EXPORTS])
    args = parser.parse_args(argv)
    from ..testing import sample_recipe

    start = time.perf_counter()
    work = Path(os.environ.get("CPTQ_BENCH_DIR", ".cptq-bench")) / "large"
    work.mkdir(parents=True, exist_ok=True)
    results: dict[str, dict[str, dict[str, Any]]] = {}
    for shape in args.shapes:
        folder = sample_recipe("random_models").ensure_opt_random(shape)
        for label, options in EXPORTS:
            if label in args.exports:
                print(f"[large] {shape} {label}", file=sys.stderr, flush=True)
                results.setdefault(shape, {})[label] = run_export(folder, options, work)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "large-results.json").write_text(json.dumps(results, indent=2) + "\n")
    (args.out / "benchmarks-large.md").write_text(section(results, (time.perf_counter() - start) / 60))
    print(f"wrote {args.out / 'benchmarks-large.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
