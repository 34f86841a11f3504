"""The SmolLM2 section in words: its goals (met or not, with the figures), its table, its plot panel, and
`--only llm`'s own page."""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING

from .kernels import describe, slow_paths
from .llm_types import BUILDER_INT4, FP32, RULE, LlmResult, LlmVariant, Quality

if TYPE_CHECKING:
    from matplotlib.axes import Axes

TITLE = "SmolLM2-135M-Instruct (real pretrained LLM): cptq against the peers"


def _quality(v: LlmVariant) -> Quality:
    """A measured variant's figures (the goals and the plot take measured variants only)."""
    if v.quality is None:
        raise ValueError(f"{v.name} has no quality figures")
    return v.quality


def _cptq(result: LlmResult) -> list[LlmVariant]:
    """Our points for the goals: every cptq export but the rule (a peer's layer choice)."""
    return [v for v in result.variants if v.family == "cptq" and v.name != RULE and v.ok and v.quality]


def _peers(result: LlmResult) -> list[LlmVariant]:
    return [v for v in result.variants if v.family not in (FP32, "cptq") and v.ok and v.quality]


def _mark(ok: bool) -> str:
    return "**met**" if ok else "**not met**"


def goals(result: LlmResult) -> list[str]:
    names = result.by_name()
    ours, peers = _cptq(result), _peers(result)
    lines = []
    if not ours:
        return ["- SmolLM2: no cptq variant was measured: every goal **not met**."]
    rule = names.get(RULE)
    if rule is not None and rule.ok and rule.quality:
        peers = peers + [rule]
    undominated = [p for p in peers if not any(o.model_bytes <= p.model_bytes and
                                               _quality(o)["kl_divergence"] <= _quality(p)["kl_divergence"] for o in ours)]
    lines.append(f"- SmolLM2 Pareto (for every peer point (MB, KL) a cptq point with ≤ MB and ≤ KL): "
                 f"{_mark(not undominated)} — {len(peers) - len(undominated)} of {len(peers)} peer points dominated"
                 + ("; not dominated: " + "; ".join(f"{p.name} ({p.model_bytes / 1e6:.1f} MB, KL "
                                                    f"{_quality(p)['kl_divergence']:.3f})" for p in undominated)
                    if undominated else "") + ".")
    if rule is not None and rule.ok and rule.quality:
        small = [o for o in ours if o.model_bytes <= rule.model_bytes]
        best = min(small, key=lambda o: _quality(o)["kl_divergence"]) if small else None
        ok = best is not None and _quality(best)["kl_divergence"] <= 0.7 * _quality(rule)["kl_divergence"]
        lines.append(f"- SmolLM2 at the rule's size ({rule.model_bytes / 1e6:.1f} MB), cptq KL ≤ 0.7× the rule's "
                     f"({_quality(rule)['kl_divergence']:.3f}): {_mark(ok)} — " +
                     (f"{best.name}: {best.model_bytes / 1e6:.1f} MB, KL {_quality(best)['kl_divergence']:.3f} "
                      f"({_quality(best)['kl_divergence'] / _quality(rule)['kl_divergence']:.2f}×)." if best
                      else "no cptq variant that small."))
    else:
        lines.append(f"- SmolLM2 at the rule's size: **not met** — the rule variant was not measured "
                     f"({rule.error if rule else 'not in the table'}).")
    for bits, dppl, kl in ((4.5, 0.07, 0.10), (5.0, 0.04, None)):
        within = [o for o in ours if o.average_bits is not None and o.average_bits <= bits + 1e-9]
        best = min(within, key=lambda o: _quality(o)["kl_divergence"]) if within else None
        ok = best is not None and _quality(best)["ppl_increase"] <= dppl and (
            kl is None or _quality(best)["kl_divergence"] <= kl)
        goal = f"Δ perplexity ≤ +{100 * dppl:.0f} %" + (f" and KL ≤ {kl:.2f}" if kl else "")
        lines.append(f"- SmolLM2 at ≤ {bits:g} average bits, {goal}: {_mark(ok)} — " + (
            f"{best.name}: {best.average_bits:.2f} bits, {100 * _quality(best)['ppl_increase']:+.1f} %, KL "
            f"{_quality(best)['kl_divergence']:.3f}." if best else "no cptq variant within the budget."))
    fp32, builder = names.get(FP32), names.get(BUILDER_INT4)
    timed = [o for o in ours if o.speed.get("decode_ms")]
    if fp32 and fp32.speed.get("decode_ms") and timed:
        base = fp32.speed["decode_ms"]
        if builder is not None and builder.speed.get("decode_ms"):
            small = [o for o in timed if o.model_bytes <= builder.model_bytes]
            best = min(small or timed, key=lambda o: o.speed["decode_ms"])
            vs_fp32, vs_builder = base / best.speed["decode_ms"], builder.speed["decode_ms"] / best.speed["decode_ms"]
            ok = bool(small) and vs_fp32 >= 2.5 and vs_builder >= 1.0
            lines.append(f"- SmolLM2 decode under onnxruntime-genai ≥ 2.5× FP32 and ≥ 1.0× the builder's int4 "
                         f"({builder.model_bytes / 1e6:.1f} MB) at ≤ its size: {_mark(ok)} — "
                         + ("" if small else "no cptq variant as small; fastest cptq variant: ")
                         + f"{best.name} ({best.model_bytes / 1e6:.1f} MB): {vs_fp32:.2f}× FP32, {vs_builder:.2f}× "
                           f"the builder's int4.")
        else:
            best = min(timed, key=lambda o: o.speed["decode_ms"])
            lines.append(f"- SmolLM2 decode under onnxruntime-genai ≥ 2.5× FP32 and ≥ 1.0× the builder's int4: "
                         f"**not met** — the builder's int4 model was not measured; {best.name}: "
                         f"{base / best.speed['decode_ms']:.2f}× FP32.")
        prefill = [o for o in ours if o.speed.get("prefill_ms")]
        if fp32.speed.get("prefill_ms") and prefill:
            ratios = {o.name: fp32.speed["prefill_ms"] / o.speed["prefill_ms"] for o in prefill}
            lines.append(f"- SmolLM2 prefill ({result.settings['speed'].prefill_tokens} tokens, onnxruntime-genai) "
                         f"no slower than FP32: {_mark(min(ratios.values()) >= 1.0)} — " +
                         ", ".join(f"{n} {r:.2f}× FP32's speed" for n, r in ratios.items()) + ".")
    else:
        lines.append("- SmolLM2 decode and prefill under onnxruntime-genai: **not met** — not measured.")
    return lines


def _kernel_note(v: LlmVariant) -> str:
    if not v.kernels:
        return "–"
    slow = slow_paths(v.kernels)
    return describe(v.kernels) + (f" (**{slow} weights dequantized on every call**)" if slow else "")


def section(result: LlmResult) -> str:
    names = result.by_name()
    fp32 = names[FP32]
    s = result.settings
    lines = [f"## {TITLE}", "",
             f"One FP32 ONNX export (optimum, opset 21, KV cache) shared by NNCF and ORT's quantizer; the GenAI model "
             f"builder exports from the same FP32 Hugging Face folder; cptq variants are `cptq-export` runs. Quality "
             f"against FP32 on {s['tokens']} tokens of other-domain text ({s['eval_text']}: legal prose and a user "
             f"manual, never the calibration docstrings), sliding windows of {s['window']} tokens, stride "
             f"{s['stride']}, every variant on the same windows; KL = mean KL(FP32 ‖ variant) of the next-token "
             f"distribution; top-1 = agreement with FP32's top token. Calibration for the data-aware peers (NNCF, "
             f"ORT GPTQ): our default calibration set ({s['calibration_samples']} samples of ≤ {s['seq_len']} tokens of "
             f"the offline docstring corpus; ORT's GPTQ {s['ort_gptq_samples']} of them: it runs the whole model once per "
             f"distinct MatMul input and sample). Decode: median ms per cached step under onnxruntime-genai "
             f"(`og.Generator`, greedy, {s['speed'].new_tokens} new tokens after a {s['speed'].prompt_tokens}-token "
             f"prompt, {s['speed'].decode_rounds} interleaved rounds, 2 threads); prefill: `append_tokens` of "
             f"{s['speed'].prefill_tokens} tokens (median of {s['speed'].prefill_rounds}). Kernels: what ORT's "
             "optimized CPU graph runs for each weight.", "",
             "SmolLM2's weights come from a Q4_1 GGUF file (≤ 16 distinct values per block of 32 along the input): "
             "8-bit requantization is near-lossless by construction, 4-bit requantization is not (our grid and "
             "every peer's differ from Q4_1's), so 4-bit damage here is larger than on a model trained in float.", "",
             "| variant | MB | avg bits | perplexity | Δ ppl | KL | top-1 | decode ms/token (genai) | × FP32 | "
             "prefill 256 ms | built in | kernels in ORT's graph |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    base_decode = fp32.speed.get("decode_ms")
    for v in result.variants:
        if not v.ok:
            lines.append(f"| {v.name} | – | – | – | – | – | – | – | – | – | {v.build_s:.0f} s | not measured: "
                         f"{v.error.replace('|', '/')} |")
            continue
        q, sp = v.quality, v.speed
        lines.append("| " + " | ".join([
            v.name, f"{v.model_bytes / 1e6:.1f}", "–" if v.average_bits is None else f"{v.average_bits:.2f}",
            f"{q['perplexity']:.2f}" if q else "–",
            ("0" if v.name == FP32 else f"{100 * q['ppl_increase']:+.1f} %") if q else "–",
            f"{q['kl_divergence']:.3f}" if q else "–", f"{q['top1_agreement']:.3f}" if q else "–",
            f"{sp['decode_ms']:.1f}" if sp.get("decode_ms") else "–",
            f"{base_decode / sp['decode_ms']:.2f}" if sp.get("decode_ms") and base_decode else "–",
            f"{sp['prefill_ms']:.0f}" if sp.get("prefill_ms") else "–",
            f"{v.build_s:.0f} s" if v.name != FP32 else "–", _kernel_note(v)]) + " |")
    lines += ["", "Settings of each peer:", ""]
    for v in result.variants:
        if v.family not in (FP32,) and v.settings:
            lines.append(f"- {v.name}: " + ", ".join(f"{k} {val}" for k, val in v.settings.items()))
    lines += ["", *[f"- {n}" for n in result.notes], "", "Time of each piece: wall seconds, CPU seconds (this "
              "process and its subprocesses), and the 1-minute load average when it ended — above 2 means other "
              "work shared the 2 cores and stretched the wall time:", "", "| piece | wall s | CPU s | load |",
              "|---|---|---|---|"]
    for piece, seconds in result.seconds.items():
        lines.append(f"| {piece} | {seconds:.0f} | {result.cpu_seconds.get(piece, float('nan')):.0f} | "
                     f"{result.loads.get(piece, float('nan')):.1f} |")
    lines += ["", f"_SmolLM2: {sum(result.seconds.values()) / 60:.1f} minutes wall, "
              f"{sum(result.cpu_seconds.values()) / 60:.1f} CPU minutes for this section._", ""]
    return "\n".join(lines)


FAMILY_STYLE = {"cptq": ("o", "tab:blue"), "NNCF": ("s", "tab:orange"), "ORT MatMulNBits": ("^", "tab:green"),
                "GenAI builder": ("D", "tab:red")}


def plot_panel(ax: Axes, result: LlmResult) -> None:
    """MB against KL (log scale) for every measured variant; cptq's points joined in size order."""
    seen = set()
    for v in result.variants:
        if v.family == FP32 or not v.ok or not v.quality:
            continue
        family = "cptq rule" if v.name == RULE else v.family
        marker, colour = FAMILY_STYLE.get(v.family, ("x", "grey"))
        if v.name == RULE:
            marker, colour = "*", "tab:purple"
        ax.scatter(v.model_bytes / 1e6, max(_quality(v)["kl_divergence"], 1e-4), marker=marker, color=colour, s=42,
                   zorder=3, label=None if family in seen else family)
        seen.add(family)
        ax.annotate(v.name.removeprefix("cptq ").removeprefix("NNCF ").removeprefix("ORT MatMulNBits ")
                    .removeprefix("GenAI builder "), (v.model_bytes / 1e6, _quality(v)["kl_divergence"]),
                    fontsize=5.5, xytext=(3, 2), textcoords="offset points")
    ours = sorted(_cptq(result), key=lambda v: v.model_bytes)
    if ours:
        ax.plot([v.model_bytes / 1e6 for v in ours], [_quality(v)["kl_divergence"] for v in ours], color="tab:blue",
                linewidth=1)
    ax.set_yscale("log")
    ax.set_xlabel("MB on disk (model + external data)")
    ax.set_ylabel("mean KL(FP32 ‖ variant), next token")
    ax.set_title("SmolLM2-135M: size against KL divergence from FP32", fontsize=10)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7)


def write_alone(result: LlmResult, out: Path, minutes: float, load: str) -> None:
    """`--only llm`: this section alone, its goals, its plot and the raw figures, into OUT."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from .report import machine

    out.mkdir(parents=True, exist_ok=True)
    fig, ax = plt.subplots(figsize=(7.5, 5))
    plot_panel(ax, result)
    fig.tight_layout()
    fig.savefig(out / "pareto-llm.png", dpi=110)
    plt.close(fig)
    text = ["# Benchmarks: SmolLM2 section only", "",
            f"`python -m cptquant.bench --only llm` in {minutes:.0f} minutes. Machine: {machine()}. {load}", "",
            "![size against KL](pareto-llm.png)", "", "## Goals (SmolLM2)", "", *goals(result), "", section(result)]
    (out / "benchmarks-llm.md").write_text("\n".join(text))
    (out / "llm-results.json").write_text(json.dumps(result.to_dict(), indent=1, ensure_ascii=False) + "\n")
