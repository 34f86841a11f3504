"""`python -m cptquant.bench.verify_gate --out DIR [--runs N]`: does `cptq verify`'s speed gate hold under load?

Runs `cptq verify` with its default thresholds N times (default 20) on the demo export (MiniLM,
`cptq-export --method tdmpq --max-size-mb 16`, default format) while another process keeps one core
busy, and N times on a model that really is slower than FP32: the same export folder whose model.onnx is
the FP32 baseline with every weight MatMul computed three times (against copies of its weight, so ORT cannot
merge them) and the results averaged: the FP32 outputs, about three times the MatMul work. (The FP16 baseline is
no such model: on a loaded machine it measured faster than FP32.) The first must pass N of N, the second
fail N of N (exit 1 from its speed check).
A full verify of MiniLM takes about a minute on a quiet 2-core machine, several on a busy one: N is an
option (`make bench GATE_RUNS=5`, or `--gate-runs` of `python -m cptquant.bench`).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from ..onnx_io.baselines import baseline_dir
from ..safety import file_sha256

DEMO_EXPORT = ("--method", "tdmpq", "--max-size-mb", "16")
SPEED_CHECK = "speed-up vs fp32"


@dataclass
class GateRuns:
    label: str
    exit_codes: list[int] = field(default_factory=list)
    verdicts: list[str] = field(default_factory=list)  # of the speed check: pass, fail, inconclusive
    estimates: list[float] = field(default_factory=list)
    intervals: list[tuple[float, float]] = field(default_factory=list)
    seconds: list[float] = field(default_factory=list)
    loads: list[float] = field(default_factory=list)  # 1-minute load average before each run

    def count(self, verdict: str) -> int:
        return sum(v == verdict for v in self.verdicts)


@dataclass
class GateResult:
    runs: int
    busy_core: bool
    fast: GateRuns
    slow: GateRuns
    fast_format: str = ""


def _cli(name: str) -> str:
    return str(Path(sys.executable).with_name(name))


def build_exports(root: Path, log: Callable[[str], object] = print) -> tuple[Path, Path, str]:
    """The demo export and its slowed twin (model.onnx replaced by the FP16 baseline), with their caches."""
    fast = root / "demo"
    if not (fast / "model.report.json").is_file():
        log("verify gate: exporting the demo model …")
        subprocess.run([_cli("cptq-export"), *DEMO_EXPORT, "-o", str(fast / "model.onnx"), "--force",
                        "--no-progress", "--no-verify"], check=True, stdout=subprocess.DEVNULL)
    slow = root / "slower-than-fp32"
    shutil.rmtree(slow, ignore_errors=True)
    shutil.copytree(fast, slow, ignore=shutil.ignore_patterns("verify"))
    cache = baseline_dir(fast)
    write_repeated_matmuls(cache / "fp32" / "model.onnx", slow / "model.onnx")
    report = json.loads((slow / "model.report.json").read_text())
    report["sha256"]["model.onnx"] = file_sha256(slow / "model.onnx")  # cptq verify checks it
    report["files"]["model.onnx"] = (slow / "model.onnx").stat().st_size
    (slow / "model.report.json").write_text(json.dumps(report, indent=2, sort_keys=True) + "\n")
    shutil.rmtree(baseline_dir(slow), ignore_errors=True)
    shutil.copytree(cache, baseline_dir(slow))  # the same model's baselines: nothing to rebuild
    fmt = json.loads((fast / "model.report.json").read_text()).get("weight_format", "?")
    return fast, slow, fmt


def write_repeated_matmuls(fp32: Path, out: Path, copies: int = 3) -> None:
    """Every MatMul with a constant weight W becomes (x @ W + x @ W' + ...) / copies, each W' a separate copy of
    W (ORT merges identical nodes, not nodes reading different initializers)."""
    import onnx
    from onnx import helper, numpy_helper

    model = onnx.load(str(fp32))
    graph = model.graph
    weights = {init.name: init for init in graph.initializer}
    nodes = []
    scale = "cptq_bench_one_over_copies"
    graph.initializer.append(numpy_helper.from_array(np.asarray(1 / copies, dtype=np.float32), scale))
    for node in graph.node:
        nodes.append(node)
        if node.op_type != "MatMul" or node.input[1] not in weights:
            continue
        result = node.output[0]
        node.output[0] = total = f"{result}_0"
        for k in range(1, copies):
            copy = onnx.TensorProto()
            copy.CopyFrom(weights[node.input[1]])
            copy.name = f"{node.input[1]}_copy{k}"
            graph.initializer.append(copy)
            nodes += [helper.make_node("MatMul", [node.input[0], copy.name], [f"{result}_p{k}"]),
                      helper.make_node("Add", [total, f"{result}_p{k}"], [f"{result}_{k}"])]
            total = f"{result}_{k}"
        nodes.append(helper.make_node("Mul", [total, scale], [result]))
    del graph.node[:]
    graph.node.extend(nodes)
    onnx.save(model, str(out))


def run_verify(folder: Path, runs: GateRuns) -> None:
    load = os.getloadavg()[0]
    start = time.perf_counter()
    done = subprocess.run([_cli("cptq"), "verify", str(folder), "--ep", "cpu", "--no-progress"],
                          capture_output=True, text=True)
    runs.seconds.append(time.perf_counter() - start)
    runs.loads.append(load)
    runs.exit_codes.append(done.returncode)
    try:
        report = json.loads((folder / "verify" / "report.json").read_text())
        check = next(c for c in report["checks"] if c["name"].startswith(SPEED_CHECK))
    except (OSError, ValueError, StopIteration):
        runs.verdicts.append(f"error (exit {done.returncode}): {done.stderr.strip()[-200:]}")
        return
    runs.verdicts.append(check.get("verdict", "pass" if check["passed"] else "fail"))
    runs.estimates.append(check["measured"])
    runs.intervals.append((check.get("low", check["measured"]), check.get("high", check["measured"])))


def run_gate(root: Path, runs: int, busy_core: bool = True, log: Callable[[str], object] = print) -> GateResult:
    fast_dir, slow_dir, fmt = build_exports(root, log)
    fast, slow = GateRuns("demo export"), GateRuns("slower than FP32 (every MatMul three times)")
    # One core kept busy by another process, as a CI neighbour would: a pure-Python spin loop.
    spinner = subprocess.Popen([sys.executable, "-c", "while True: pass"]) if busy_core else None
    try:
        for i in range(runs):  # alternated, so both see the same spread of machine states
            for folder, into in ((fast_dir, fast), (slow_dir, slow)):
                run_verify(folder, into)
                log(f"verify gate {i + 1}/{runs} {into.label}: exit {into.exit_codes[-1]}, {into.verdicts[-1]}"
                    + (f", {into.estimates[-1]:.3f}×" if into.estimates else ""))
    finally:
        if spinner is not None:
            spinner.kill()
            spinner.wait()
    return GateResult(runs, busy_core, fast, slow, fmt)


def section(result: GateResult) -> str:
    lines = ["## `cptq verify`'s speed gate under load", "",
             f"`cptq verify` with its default thresholds (`--min-speedup 1`, gate on the 95 % interval of the paired "
             f"speed-up vs FP32) run {result.runs} times on each model, alternating, "
             + ("while another process kept one of the 2 cores busy (a Python spin loop). " if result.busy_core else
                "without an added load. ") +
             f"The demo export is `cptq-export {' '.join(DEMO_EXPORT)}` (format chosen: {result.fast_format}); the "
             "slower model is that folder with model.onnx replaced by the FP32 baseline computing every weight "
             "MatMul three times and averaging (outputs as FP32's, three times the MatMul work).", "",
             "| model | exit 0 | exit 1 | speed check pass / inconclusive / fail | speed-up (min–max of estimates) "
             "| lowest interval bound | highest upper bound | s per verify | load avg before |", "|---" * 9 + "|"]
    for runs in (result.fast, result.slow):
        est = runs.estimates or [float("nan")]
        lows = [lo for lo, _ in runs.intervals] or [float("nan")]
        highs = [hi for _, hi in runs.intervals] or [float("nan")]
        lines.append(f"| {runs.label} | {runs.exit_codes.count(0)} | {runs.exit_codes.count(1)} | "
                     f"{runs.count('pass')} / {runs.count('inconclusive')} / {runs.count('fail')} | "
                     f"{min(est):.3f}–{max(est):.3f} | {min(lows):.3f} | {max(highs):.3f} | "
                     f"{sum(runs.seconds) / max(1, len(runs.seconds)):.0f} | "
                     f"{min(runs.loads, default=0):.1f}–{max(runs.loads, default=0):.1f} |")
    return "\n".join(lines + [""])


def goal_lines(result: GateResult) -> list[str]:
    n = result.runs
    ok_fast = result.fast.exit_codes.count(0) == n
    ok_slow = result.slow.exit_codes.count(1) == n and result.slow.count("fail") == n

    def mark(ok: bool) -> str:
        return "**met**" if ok else "**not met**"

    return [f"- `cptq verify` with default thresholds passes {n} of {n} runs with one core busy: {mark(ok_fast)} — "
            f"{result.fast.exit_codes.count(0)} of {n} (speed check {result.fast.count('pass')} pass, "
            f"{result.fast.count('inconclusive')} inconclusive).",
            f"- ... and fails {n} of {n} for a model slower than FP32: {mark(ok_slow)} — "
            f"{result.slow.count('fail')} of {n} speed checks failed, exit 1 in {result.slow.exit_codes.count(1)}."]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True, help="Working folder for the two exports.")
    parser.add_argument("--runs", type=int, default=20)
    parser.add_argument("--no-busy-core", action="store_true", help="Do not add a process that keeps a core busy.")
    args = parser.parse_args(argv)
    log = lambda m: print(m, file=sys.stderr, flush=True)  # noqa: E731
    result = run_gate(args.out, args.runs, not args.no_busy_core, log)
    (args.out / "verify-gate.json").write_text(json.dumps(asdict(result), indent=2) + "\n")
    print(section(result))
    print("\n".join(goal_lines(result)))


if __name__ == "__main__":
    main()
