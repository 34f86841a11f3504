"""SmolLM2-135M in `make bench`: our exports against the peers that do our job, side by side.

One FP32 ONNX export (optimum, opset 21, KV cache) is shared by every peer built from ONNX (NNCF,
ORT's MatMulNBitsQuantizer); ONNX Runtime GenAI's model builder exports from the same Hugging Face
folder itself; our variants come from `cptq-export` (run in-process with its command line, table
`OURS` below). Every variant is then measured by the same code in the same run:

- MB on disk (the .onnx file and the external data it names);
- quality on ~16k tokens of other-domain text (`corpus.other_domain_paragraphs()`, never the
  calibration docstrings): sliding windows as in runtimes/quality.py, all variants window by
  window; perplexity, mean KL(FP32 || variant) of the next-token distribution, top-1 agreement with FP32;
- what ORT's optimized graph really runs for each weight (bench/kernels.py);
- decode ms/token and 256-token prefill under onnxruntime-genai, all variants interleaved
  (bench/genai_speed.py).

`python -m cptquant.bench --only llm --out DIR` runs this section alone.
"""

from __future__ import annotations

import json
import os
import resource
import shutil
import time
from contextlib import redirect_stderr, redirect_stdout
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from ..onnx_io.baselines import baseline_dir
from ..exporter.genai_config import write_genai_config
from ..onnx_io.onnx_export import MODEL_FILE, export_onnx
from ..runtimes.base import model_bytes
from ..runtimes.cpu import CpuAdapter
from ..onnx_io.inputs import feeds_for
from ..runtimes.quality import TextEncoder, _log_softmax, kl_divergence, token_stream, window_spans
from .genai_speed import GenaiSpeedSettings
from .genai_speed import measure as genai_measure
from .kernels import describe, kernel_census, slow_paths
from .llm_peers import (NncfConfig, build_genai, build_nncf, build_ort_nbits, calibration_feeds, genai_builder_python,
                        genai_versions)

FP32 = "FP32"
TITLE = "SmolLM2-135M-Instruct (real pretrained LLM): cptq against the peers"

# Our variants: (name in the table, cptq-export options). Add a row to benchmark another export.
# 4-bit codes: GPTQ with the MSE clip search (on SmolLM2's linears in a torch simulation: KL 0.133 against
# 0.163 with absmax scales; docs/benchmarks.md, "What was tried").
OURS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("cptq --bits 4", ("--bits", "4", "--clip", "mse")),
    ("cptq tdmpq 4.5 bits", ("--method", "tdmpq", "--target-bits", "4.5", "--clip", "mse")),
    ("cptq tdmpq 5 bits", ("--method", "tdmpq", "--target-bits", "5", "--clip", "mse")),
    ("cptq rule (k_quant_mixed)", ("--method", "rule", "--clip", "mse")),
)
# The k_quant_mixed layer choice through our own exporter: a peer's rule, our kernels and codes.
RULE = "cptq rule (k_quant_mixed)"
# TDMPQ given the rule's file size as its budget (--max-size-mb, measured on the rule's export in the same run).
AT_RULE_SIZE = "cptq tdmpq at the rule's size"
AT_RULE_SIZE_OPTIONS = ("--method", "tdmpq", "--clip", "mse")

# NNCF: the ratio sweep (INT4 share; the rest INT8) at its sizes nearest ours, the other metric, AWQ + scale
# estimation, asymmetric INT4, and all_layers (embedding and LM head at INT4 too).
NNCF: tuple[NncfConfig, ...] = (
    NncfConfig("NNCF INT4_SYM r1.0", ratio=1.0),
    NncfConfig("NNCF INT4_SYM r0.8 Hessian", ratio=0.8),
    NncfConfig("NNCF INT4_SYM r0.8 default metric", ratio=0.8, sensitivity=None),
    NncfConfig("NNCF INT4_ASYM r1.0", mode="INT4_ASYM", ratio=1.0),
    NncfConfig("NNCF INT4_SYM r0.8 Hessian AWQ+SE", ratio=0.8, awq=True, scale_estimation=True),
    NncfConfig("NNCF INT4_SYM r1.0 all_layers", ratio=1.0, all_layers=True),
)
# ORT's GPTQ is left out: it runs the whole model once per distinct MatMul input and calibration sample
# (121 inputs here), about 4 hours on this machine with 16 samples; its build reached 1.7 % in 4 minutes.
ORT_ALGORITHMS = ("default", "k_quant")
GENAI_BUILDS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("GenAI builder int4", ()),
    ("GenAI builder k_quant_mixed", ("algo_config=k_quant_mixed",)),
    ("GenAI builder k_quant_last (int8 LM head)", ("algo_config=k_quant_last",)),
)
BUILDER_INT4 = "GenAI builder int4"


@dataclass
class LlmSettings:
    tokens: int = 16384
    # Every scored token has >= 64 tokens of context; 1.14 forward tokens per scored token (256/128: 2). All
    # variants x 16k tokens is most of this section's time: ~0.27 GFLOP per token and variant.
    window: int = 512
    stride: int = 448
    calib_samples: int = 32  # NNCF's calibration: the first 32 samples of our default calibration set
    # ORT's GPTQ runs the whole model once per distinct MatMul input and sample (121 inputs here): fewer samples.
    ort_gptq_samples: int = 16
    seq_len: int = 128
    speed: GenaiSpeedSettings = field(default_factory=GenaiSpeedSettings)
    include: tuple[str, ...] = ("ours", "nncf", "ort", "genai")

    @classmethod
    def quick(cls) -> "LlmSettings":
        return cls(tokens=2048, calib_samples=16, ort_gptq_samples=8,
                   speed=GenaiSpeedSettings(new_tokens=16, decode_rounds=2, prefill_rounds=2))


@dataclass
class LlmVariant:
    name: str
    family: str  # "FP32", "cptq", "NNCF", "ORT MatMulNBits", "GenAI builder"
    path: Path
    model_bytes: int = 0
    average_bits: float | None = None
    settings: dict = field(default_factory=dict)
    build_s: float = 0.0
    error: str = ""  # why it was not built or not measured
    kernels: dict = field(default_factory=dict)
    quality: dict = field(default_factory=dict)  # perplexity, ppl_increase, kl_divergence, top1_agreement
    speed: dict = field(default_factory=dict)  # decode_ms, prefill_ms under onnxruntime-genai

    @property
    def ok(self) -> bool:
        return not self.error


@dataclass
class LlmResult:
    variants: list[LlmVariant]
    seconds: dict[str, float]  # piece -> wall seconds
    loads: dict[str, float]  # piece -> 1-min load average when it ended
    cpu_seconds: dict[str, float]  # piece -> CPU seconds (process + children)
    settings: dict
    notes: list[str] = field(default_factory=list)

    def by_name(self) -> dict[str, LlmVariant]:
        return {v.name: v for v in self.variants}

    def to_dict(self) -> dict:
        return {"variants": [{**asdict(v), "path": str(v.path)} for v in self.variants], "seconds": self.seconds,
                "cpu_seconds": self.cpu_seconds, "loads": self.loads, "settings": self.settings, "notes": self.notes}


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0] if text else ''}"[:300]


def export_ours(model_dir: Path, options: tuple[str, ...], out: Path, log_file: Path) -> Path:
    """`cptq-export MODEL OPTIONS -o OUT` in this process, exactly as a user runs it (no verification:
    the bench measures)."""
    from ..cli import export_app

    args = [str(model_dir), *options, "-o", str(out / MODEL_FILE), "--force", "--no-verify", "--no-progress"]
    with open(log_file, "w") as sink, redirect_stdout(sink), redirect_stderr(sink):
        code = export_app(args=args, standalone_mode=False)  # a user error returns 2 here instead of exiting
    if code not in (None, 0):
        errors = [line for line in log_file.read_text().splitlines() if line.startswith("error:")]
        raise RuntimeError(errors[-1] if errors else f"cptq-export exited with {code}")
    shutil.rmtree(baseline_dir(out, MODEL_FILE), ignore_errors=True)  # cptq verify's baselines: 0.8 GB each
    return out / MODEL_FILE


def _feeds(session, chunk: np.ndarray, head_size: int) -> dict:
    """feeds_for, plus the head size of an empty KV cache whose last dimension is symbolic (the GenAI
    builder's graph names it `kv_cache_dim`; optimum's states 64)."""
    feeds = feeds_for(session, chunk)
    for name, value in feeds.items():
        if name.startswith("past_key_values") and value.ndim == 4 and value.shape[3] == 0:
            feeds[name] = np.zeros((*value.shape[:3], head_size), dtype=value.dtype)
    return feeds


def score_against_reference(adapter, sessions: dict, reference: str, ids: np.ndarray, window: int, stride: int,
                            head_size: int, log=print) -> dict[str, dict]:
    """Every session on the same windows, one window at a time (full next-token distributions of all
    tokens do not fit in memory): perplexity, mean KL(reference || variant), top-1 agreement with the
    reference, for every variant."""
    nll = {name: [] for name in sessions}
    kl = {name: [] for name in sessions}
    agree = {name: [] for name in sessions}
    spans = window_spans(len(ids), window, stride)
    order = [reference] + [name for name in sessions if name != reference]
    for i, (begin, end, first) in enumerate(spans):
        chunk = ids[begin:end][None, :]
        targets = ids[first:end]
        ref_logp = None
        for name in order:
            logits = adapter.run(sessions[name], _feeds(sessions[name], chunk, head_size))["logits"][0]
            logp = _log_softmax(logits[first - 1 - begin : end - 1 - begin])  # logits at j-1 predict token j
            nll[name].append(-logp[np.arange(len(targets)), targets])
            if ref_logp is None:
                ref_logp = logp
            kl[name].append(kl_divergence(ref_logp, logp))
            agree[name].append(logp.argmax(axis=-1) == ref_logp.argmax(axis=-1))
        if (i + 1) % 16 == 0 or i + 1 == len(spans):
            log(f"  quality: window {i + 1}/{len(spans)}")
    ref_ppl = float(np.exp(np.concatenate(nll[reference]).mean()))
    out = {}
    for name in sessions:
        ppl = float(np.exp(np.concatenate(nll[name]).mean()))
        out[name] = {"perplexity": ppl, "ppl_increase": ppl / ref_ppl - 1.0,
                     "kl_divergence": float(np.concatenate(kl[name]).mean()),
                     "top1_agreement": float(np.concatenate(agree[name]).mean()),
                     "tokens": int(sum(len(x) for x in nll[name]))}
    return out


def _cpu_seconds() -> float:
    """CPU time of this process and its finished children (the GenAI builder runs as one)."""
    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


class _Clock:
    """Wall and CPU seconds of each piece: on a shared machine the wall time stretches with the load, the
    CPU time much less (2 threads: a quiet machine's wall time lies between CPU / 2 and CPU)."""

    def __init__(self, log):
        self.seconds: dict[str, float] = {}
        self.cpu: dict[str, float] = {}
        self.loads: dict[str, float] = {}
        self.log = log

    def run(self, piece: str, fn, *args, **kwargs):
        start, cpu = time.perf_counter(), _cpu_seconds()
        try:
            return fn(*args, **kwargs)
        finally:
            self.seconds[piece] = self.seconds.get(piece, 0.0) + time.perf_counter() - start
            self.cpu[piece] = self.cpu.get(piece, 0.0) + _cpu_seconds() - cpu
            self.loads[piece] = os.getloadavg()[0]
            self.log(f"[llm] {piece}: {self.seconds[piece]:.0f} s, CPU {self.cpu[piece]:.0f} s "
                     f"(load {self.loads[piece]:.1f})")


class _Builds:
    """Each variant's build record (path, seconds, settings) in ROOT/builds.json. With `reuse`, a variant
    whose record and model file exist is not built again (for iterating on the measurement: the table then
    says the build time is an earlier run's); without it ROOT starts empty."""

    def __init__(self, root: Path, reuse: bool):
        self.path = root / "builds.json"
        self.records = json.loads(self.path.read_text()) if reuse and self.path.is_file() else {}

    def get(self, name: str) -> dict | None:
        record = self.records.get(name)
        return record if record and ("error" in record or Path(record["path"]).is_file()) else None

    def put(self, name: str, record: dict) -> None:
        self.records[name] = record
        self.path.write_text(json.dumps(self.records, indent=1, ensure_ascii=False) + "\n")


def run_llm(root: Path, settings: LlmSettings | None = None, log=print, reuse: bool = False) -> LlmResult:
    from ..model_loading import load_model
    from ..testing import ensure_smollm2

    settings = settings or LlmSettings()
    clock = _Clock(log)
    notes: list[str] = []
    if not reuse:
        shutil.rmtree(root, ignore_errors=True)
    root.mkdir(parents=True, exist_ok=True)
    builds = _Builds(root, reuse)
    hf_dir = clock.run("SmolLM2 FP32 folder (cached recipe)", ensure_smollm2)
    loaded = clock.run("load SmolLM2 (torch)", load_model, str(hf_dir))
    fp32_dir = root / "fp32"

    def fp32_export():
        export_onnx(loaded, fp32_dir)
        write_genai_config(fp32_dir, MODEL_FILE)
        return fp32_dir / MODEL_FILE

    variants: list[LlmVariant] = []

    def build(name: str, family: str, make, *args) -> None:
        """make(*args) -> (model path, settings, average bits); a failure is a finding, kept in the table."""
        record = builds.get(name)
        if record is not None:
            log(f"[llm] {name}: reused from an earlier run")
            if "error" in record:
                variants.append(LlmVariant(name, family, Path(), error=record["error"], build_s=record["build_s"]))
            else:
                variants.append(LlmVariant(name, family, Path(record["path"]), average_bits=record["average_bits"],
                                           settings={**record["settings"], "built": "in an earlier run (--reuse)"},
                                           build_s=record["build_s"]))
            return
        start = time.perf_counter()
        try:
            path, config, bits = clock.run(f"build {name}", make, *args)
            if path.parent != fp32_dir:
                write_genai_config(path.parent, path.name)
            variant = LlmVariant(name, family, path, average_bits=bits, settings=config,
                                 build_s=time.perf_counter() - start)
            builds.put(name, {"path": str(path), "average_bits": bits, "settings": config, "build_s": variant.build_s})
        except Exception as exc:  # a variant the exporter does not offer yet, a peer that fails: reported
            variant = LlmVariant(name, family, Path(), error=_first_line(exc), build_s=time.perf_counter() - start)
            builds.put(name, {"error": variant.error, "build_s": variant.build_s})
            log(f"[llm] {name}: not built: {variant.error}")
        variants.append(variant)

    build(FP32, FP32, lambda: (fp32_export(), {}, None))
    config = loaded.config
    head_size = int(getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads)

    def ours(options: tuple[str, ...], out: Path):
        path = export_ours(hf_dir, options, out, root / f"{out.name}.log")
        bits = json.loads((out / "model.report.json").read_text())["average_bits"]
        return path, {"cptq-export": " ".join(options)}, bits

    def peer(make, *args):
        built = make(*args)
        return built.path, built.settings, None

    def folder(name: str) -> Path:
        return root / "cptq" / name.replace(" ", "_").replace("-", "").replace("(", "").replace(")", "").replace("'", "")

    if "ours" in settings.include:
        for name, options in OURS:
            build(name, "cptq", ours, options, folder(name))
        rule = next((v for v in variants if v.name == RULE and v.ok), None)
        if rule is not None:
            budget = f"{model_bytes(rule.path) / 1e6:.2f}"  # decimal MB, as --max-size-mb counts
            build(AT_RULE_SIZE, "cptq", ours, (*AT_RULE_SIZE_OPTIONS, "--max-size-mb", budget), folder(AT_RULE_SIZE))

    probe = CpuAdapter(threads=2).session(fp32_dir / MODEL_FILE)
    calibration = calibration_feeds(loaded, probe, settings.calib_samples, settings.seq_len)
    del probe, loaded

    if "nncf" in settings.include:
        for cfg in NNCF:
            build(cfg.name, "NNCF", peer, build_nncf, fp32_dir, root / "nncf" / cfg.name.replace(" ", "_"), cfg,
                  calibration)
    if "ort" in settings.include:
        for algorithm in ORT_ALGORITHMS:
            build(f"ORT MatMulNBits {algorithm}", "ORT MatMulNBits", peer, build_ort_nbits, fp32_dir,
                  root / "ort" / algorithm, algorithm, calibration[: settings.ort_gptq_samples])
    if "genai" in settings.include:
        python = genai_builder_python()
        if python is None:
            notes.append("GenAI model builder not run: its venv .venv-genai is missing (`make genai-builder`).")
        else:
            notes.append(f"GenAI model builder from .venv-genai ({genai_versions(python)}).")
            for name, extra in GENAI_BUILDS:
                build(name, "GenAI builder", peer, build_genai, hf_dir,
                      root / "genai" / name.split()[2].strip("()"), name, extra, root / "genai-cache")
    del calibration

    for v in variants:
        if v.ok:
            v.model_bytes = model_bytes(v.path)
            try:
                v.kernels = clock.run("kernel census (ORT optimized graphs)", kernel_census, v.path)
            except Exception as exc:  # ORT cannot even load it: that is the finding
                v.error = f"ORT cannot load it: {_first_line(exc)}"

    measured = [v for v in variants if v.ok]
    adapter = CpuAdapter(threads=2)
    encoder = TextEncoder(fp32_dir, config)
    from ..corpus import other_domain_paragraphs

    ids = token_stream(encoder, other_domain_paragraphs(), settings.tokens)

    def quality():
        sessions = {}
        for v in measured:
            try:  # loaded and run once on a few tokens: a model ORT cannot run is reported, not fatal
                session = adapter.session(v.path)
                adapter.run(session, _feeds(session, ids[None, :8], head_size))
                sessions[v.name] = session
            except Exception as exc:
                v.error = f"ORT cannot run it: {_first_line(exc)}"
        return score_against_reference(adapter, sessions, FP32, ids, settings.window, settings.stride, head_size, log)

    scores = clock.run("quality (all variants, window by window)", quality)
    for v in measured:
        v.quality = scores.get(v.name, {})

    with_genai = {v.name: v.path.parent for v in variants if v.ok and (v.path.parent / "genai_config.json").is_file()}
    long_ids = token_stream(encoder, other_domain_paragraphs(), settings.speed.prefill_tokens)
    try:
        speed = clock.run("decode + prefill under onnxruntime-genai (interleaved)", genai_measure, with_genai,
                          long_ids, settings.speed, None, log)
    except ImportError:
        speed = {}
        notes.append("onnxruntime-genai is not installed: no decode or prefill figures.")
    for v in variants:
        v.speed = speed.get(v.name, {})
        if "error" in v.speed:
            notes.append(f"{v.name}: not run under onnxruntime-genai: {v.speed.pop('error')}")
    return LlmResult(variants, clock.seconds, clock.loads, clock.cpu,
                     {"tokens": int(len(ids)), "window": settings.window, "stride": settings.stride,
                      "calibration_samples": settings.calib_samples, "seq_len": settings.seq_len,
                      "ort_gptq_samples": settings.ort_gptq_samples,
                      "speed": asdict(settings.speed), "eval_text": "corpus.other_domain_paragraphs()"}, notes)


# ---------------------------------------------------------------- goals, table, plot


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
                                               o.quality["kl_divergence"] <= p.quality["kl_divergence"] for o in ours)]
    lines.append(f"- SmolLM2 Pareto (for every peer point (MB, KL) a cptq point with ≤ MB and ≤ KL): "
                 f"{_mark(not undominated)} — {len(peers) - len(undominated)} of {len(peers)} peer points dominated"
                 + ("; not dominated: " + "; ".join(f"{p.name} ({p.model_bytes / 1e6:.1f} MB, KL "
                                                    f"{p.quality['kl_divergence']:.3f})" for p in undominated)
                    if undominated else "") + ".")
    if rule is not None and rule.ok and rule.quality:
        small = [o for o in ours if o.model_bytes <= rule.model_bytes]
        best = min(small, key=lambda o: o.quality["kl_divergence"]) if small else None
        ok = best is not None and best.quality["kl_divergence"] <= 0.7 * rule.quality["kl_divergence"]
        lines.append(f"- SmolLM2 at the rule's size ({rule.model_bytes / 1e6:.1f} MB), cptq KL ≤ 0.7× the rule's "
                     f"({rule.quality['kl_divergence']:.3f}): {_mark(ok)} — " +
                     (f"{best.name}: {best.model_bytes / 1e6:.1f} MB, KL {best.quality['kl_divergence']:.3f} "
                      f"({best.quality['kl_divergence'] / rule.quality['kl_divergence']:.2f}×)." if best
                      else "no cptq variant that small."))
    else:
        lines.append(f"- SmolLM2 at the rule's size: **not met** — the rule variant was not measured "
                     f"({rule.error if rule else 'not in the table'}).")
    for bits, dppl, kl in ((4.5, 0.07, 0.10), (5.0, 0.04, None)):
        within = [o for o in ours if o.average_bits is not None and o.average_bits <= bits + 1e-9]
        best = min(within, key=lambda o: o.quality["kl_divergence"]) if within else None
        ok = best is not None and best.quality["ppl_increase"] <= dppl and (
            kl is None or best.quality["kl_divergence"] <= kl)
        goal = f"Δ perplexity ≤ +{100 * dppl:.0f} %" + (f" and KL ≤ {kl:.2f}" if kl else "")
        lines.append(f"- SmolLM2 at ≤ {bits:g} average bits, {goal}: {_mark(ok)} — " + (
            f"{best.name}: {best.average_bits:.2f} bits, {100 * best.quality['ppl_increase']:+.1f} %, KL "
            f"{best.quality['kl_divergence']:.3f}." if best else "no cptq variant within the budget."))
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
            lines.append(f"- SmolLM2 prefill ({result.settings['speed']['prefill_tokens']} tokens, onnxruntime-genai) "
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
             f"(`og.Generator`, greedy, {s['speed']['new_tokens']} new tokens after a {s['speed']['prompt_tokens']}-token "
             f"prompt, {s['speed']['decode_rounds']} interleaved rounds, 2 threads); prefill: `append_tokens` of "
             f"{s['speed']['prefill_tokens']} tokens (median of {s['speed']['prefill_rounds']}). Kernels: what ORT's "
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


def plot_panel(ax, result: LlmResult) -> None:
    """MB against KL (log scale) for every measured variant; cptq's points joined in size order."""
    seen = set()
    for v in result.variants:
        if v.family == FP32 or not v.ok or not v.quality:
            continue
        family = "cptq rule" if v.name == RULE else v.family
        marker, colour = FAMILY_STYLE.get(v.family, ("x", "grey"))
        if v.name == RULE:
            marker, colour = "*", "tab:purple"
        ax.scatter(v.model_bytes / 1e6, max(v.quality["kl_divergence"], 1e-4), marker=marker, color=colour, s=42,
                   zorder=3, label=None if family in seen else family)
        seen.add(family)
        ax.annotate(v.name.removeprefix("cptq ").removeprefix("NNCF ").removeprefix("ORT MatMulNBits ")
                    .removeprefix("GenAI builder "), (v.model_bytes / 1e6, v.quality["kl_divergence"]),
                    fontsize=5.5, xytext=(3, 2), textcoords="offset points")
    ours = sorted(_cptq(result), key=lambda v: v.model_bytes)
    if ours:
        ax.plot([v.model_bytes / 1e6 for v in ours], [v.quality["kl_divergence"] for v in ours], color="tab:blue",
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
