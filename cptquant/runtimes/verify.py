"""`cptq verify`'s engine: check an export folder, measure it against its baselines on each
execution provider, gate the figures on thresholds.

Flow: inspect_output_folder (export_folder.py: refuse bad input before any model runs) -> ensure_baselines
(the exporter's cache, rebuilt from the report's source when missing) -> per adapter: open the three
variants, measure quality, then latency -> gate (gate.py) -> reports (verify_reports.py).
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import onnxruntime as ort

from ..errors import CptqError
from ..model_loading import TASK_CLASSIFICATION, TASK_SEQ2SEQ, LoadedModel
from ..output_folder import VERIFY_CANDIDATE, VERIFY_REPORT_DIR
from ..reports import VerifyReport
from ..version import __version__
from .base import RuntimeAdapter, model_bytes, timed
from .cpu import CpuAdapter, u8s8_gemm_saturates
from .cuda import CudaAdapter
from .export_folder import BASELINES, OutputFolder, ensure_baselines, inspect_output_folder
from .gate import Check, Thresholds, gate
from .memory import measure_peak_rss
from .quality import EvalSet, QualitySettings, TextEncoder, measure_quality
from .seq2seq import open_seq2seq_sessions, seq2seq_latency, seq2seq_probes, seq2seq_quality
from .speed import SpeedSettings, measure_latency, speedups
from .speed_gate import GateSettings, figure_probes, paired_log_ratios, speed_interval

if TYPE_CHECKING:
    from transformers import PretrainedConfig

CANDIDATE = VERIFY_CANDIDATE
# The report's weight_format of `--format dynamic` (quant.storage.FORMAT_DYNAMIC: the runtimes only read folders).
DYNAMIC_FORMAT = "dynamic"
REPORT_DIR = VERIFY_REPORT_DIR  # cptq verify's reports, inside the output folder unless --report-dir says otherwise


def select_adapters(ep: str, threads: int = 2) -> tuple[list[RuntimeAdapter], dict[str, str]]:
    """'auto': every available EP, the others skipped with their reason. A named EP must be available."""
    known: dict[str, Callable[[], RuntimeAdapter]] = {"cpu": lambda: CpuAdapter(threads=threads), "cuda": CudaAdapter}
    names = list(known) if ep.strip() == "auto" else [n.strip().lower() for n in ep.split(",") if n.strip()]
    unknown = [n for n in names if n not in known]
    if not names or unknown:
        raise CptqError(f"--ep must be auto or a comma list of {', '.join(known)} (got {ep!r})")
    adapters: list[RuntimeAdapter] = []
    skipped: dict[str, str] = {}
    for name in dict.fromkeys(names):
        adapter = known[name]()
        ok, why = adapter.available()
        if ok:
            adapters.append(adapter)
        elif ep.strip() == "auto":
            skipped[name] = f"{name.upper()} skipped: {why}"
        else:
            raise CptqError(f"--ep {name} is not available here: {why}")
    return adapters, skipped


# ---------------------------------------------------------------- measuring


def open_sessions(adapter: RuntimeAdapter, variants: dict[str, Path],
                  config: PretrainedConfig) -> tuple[dict[str, ort.InferenceSession], dict[str, dict[str, Any]]]:
    """Open each variant; per variant {bytes_on_disk, open_s, peak_rss_bytes, rss_growth_bytes}.
    Memory comes from a fresh process per variant (memory.py), so the order of opening does not bias it."""
    sessions: dict[str, ort.InferenceSession] = {}
    facts: dict[str, dict[str, Any]] = {}
    length = min(16, int(getattr(config, "max_position_embeddings", 16) or 16))
    for name, path in variants.items():
        try:
            open_s = timed(lambda: sessions.__setitem__(name, adapter.session(path)))
        except Exception as exc:  # ORT rejects a model it cannot load with many exception types
            first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
            raise CptqError(f"onnxruntime cannot load {path} on {adapter.name}: {first}") from None
        try:
            memory = measure_peak_rss(adapter, path, int(config.vocab_size), length)
        except (RuntimeError, OSError) as exc:
            raise CptqError(str(exc)) from None
        facts[name] = {"bytes_on_disk": model_bytes(path), "open_s": round(open_s, 3), **memory}
    return sessions, facts


def measure_on(adapter: RuntimeAdapter, variants: dict[str, Path], out: OutputFolder, eval_set: EvalSet | None,
               quality_settings: QualitySettings, speed_settings: SpeedSettings, progress: bool = True,
               gated: tuple[str, float, GateSettings] | None = None) -> dict[str, Any]:
    """Quality and speed of the candidate and every baseline on one adapter, ratios included.
    `gated` (baseline, threshold, settings): that baseline's speed-up interval is measured until it is
    narrow or clear of the threshold (speed_gate.py); the others get the interval of the rounds taken."""
    # An encoder-decoder export is three files per variant, measured by runtimes/seq2seq.py; the rest is shared.
    by_files = out.task == TASK_SEQ2SEQ
    open_all, quality_of, latency_of, probes_of = ((open_seq2seq_sessions, seq2seq_quality, seq2seq_latency,
                                                    seq2seq_probes) if by_files else
                                                   (open_sessions, measure_quality, measure_latency, figure_probes))
    sessions, facts = open_all(adapter, variants, out.config)
    encoder = TextEncoder(out.folder, out.config, out.trust_remote_code)
    quality = quality_of(out.task, adapter, sessions, encoder, out.config, quality_settings, eval_set,
                         CANDIDATE, progress)
    rounds: dict[str, dict[str, list[float]]] = {}
    latency = latency_of(out.task, adapter, sessions, out.config, speed_settings, progress, rounds)
    speed: dict[str, Any] = {"variants": {name: {**facts[name], "latency": latency[name]} for name in variants},
             "settings": asdict(speed_settings), "interleaved": True}
    cand = facts[CANDIDATE]
    for base in variants:
        if base == CANDIDATE:
            continue
        ref = facts[base]
        speed[f"vs_{base}"] = {
            **speedups(latency, CANDIDATE, base),
            "smaller_on_disk_by": round(ref["bytes_on_disk"] / cand["bytes_on_disk"], 4),
            **{f"{key}_ratio": (round(cand[key] / ref[key], 4) if cand[key] and ref[key] else None)
               for key in ("peak_rss_bytes", "rss_growth_bytes")},
        }
        if gated is not None:
            baseline, threshold, gate_settings = gated
            probes = (probes_of(out.task, adapter, sessions, out.config, speed_settings) if base == baseline
                      else None)
            interval = speed_interval(paired_log_ratios(rounds, CANDIDATE, base), threshold, gate_settings, probes,
                                      CANDIDATE, base)
            speed[f"vs_{base}"]["speedup_interval"] = interval.to_dict()
    return {"device": adapter.device_name(), "onnxruntime": ort.__version__, "quality": quality.to_dict(),
            "speed": speed}


@dataclass
class VerifyResult:
    report: VerifyReport  # report.json: .to_dict() is what `cptq verify` writes
    checks: list[Check] = field(default_factory=list)
    skipped: dict[str, str] = field(default_factory=dict)

    @property
    def passed(self) -> bool:
        return all(c.passed for c in self.checks)


def verify_output(folder: Path, baseline: str = "fp32", ep: str = "auto", thresholds: Thresholds | None = None,
                  eval_set: EvalSet | None = None, quick: bool = False, threads: int = 2, progress: bool = True,
                  loaded: LoadedModel | None = None, quality_settings: QualitySettings | None = None,
                  speed_settings: SpeedSettings | None = None, trust_remote_code: bool = False,
                  source: str | None = None, gate_settings: GateSettings | None = None) -> VerifyResult:
    """`trust_remote_code` and `source` come from the command line only (see cptquant/safety.py)."""
    if baseline not in BASELINES:
        raise CptqError(f"--baseline must be fp16 or fp32 (got {baseline!r})")
    thresholds = thresholds or Thresholds()
    if threads < 1:
        raise CptqError(f"--threads must be at least 1 (got {threads})")
    adapters, skipped = select_adapters(ep, threads)  # before the slow work: a bad --ep fails at once
    out = inspect_output_folder(folder, loaded, trust_remote_code)
    if eval_set is not None and eval_set.labels is not None and out.task != TASK_CLASSIFICATION:
        raise CptqError(f"--eval has labels, but the model's task is {out.task}, not {TASK_CLASSIFICATION}")
    overlap = _calibration_overlap(out, eval_set) if eval_set is not None else None
    warnings = [line for line in (overlap, _saturating_gemm(out)) if line]
    variants = {CANDIDATE: out.model, **ensure_baselines(out, loaded, progress, source)}
    # Only once the input is known good: a refusal stays the one line on stderr.
    for why in skipped.values():
        print(why, file=sys.stderr)  # one plain line: CI logs must not wrap it
    for line in warnings:
        print(f"warning: {line}", file=sys.stderr)
    quality_settings = quality_settings or QualitySettings.for_mode(quick)
    speed_settings = speed_settings or SpeedSettings.for_mode(quick)
    gated = (baseline, thresholds.min_speedup, gate_settings or GateSettings.for_mode(quick))
    per_ep, checks = {}, []
    for adapter in adapters:
        per_ep[adapter.name] = measure_on(adapter, variants, out, eval_set, quality_settings, speed_settings, progress,
                                          gated)
        checks.extend(gate(adapter.name, per_ep[adapter.name], out.task, baseline, thresholds))
    report = VerifyReport(
        cptquant_version=__version__,
        onnxruntime_version=ort.__version__,
        output=str(out.folder.resolve()),
        model=out.report.get("model"),
        task=out.task,
        baseline=baseline,
        quick=quick,
        thresholds=asdict(thresholds),
        variants={name: str(path.parent if out.task == TASK_SEQ2SEQ else path) for name, path in variants.items()},
        eps=per_ep,
        skipped_eps=skipped,
        checks=[c.to_dict() for c in checks],
        passed=all(c.passed for c in checks),
        warnings=warnings,
    )
    return VerifyResult(report, checks, skipped)


def _saturating_gemm(out: OutputFolder) -> str | None:
    """A dynamic export with full-range int8 weights gives wrong products on a CPU whose int8 GEMM saturates."""
    if out.report.get("weight_format") != DYNAMIC_FORMAT or out.report.get("reduce_range") or not u8s8_gemm_saturates():
        return None
    return ("this CPU's int8 GEMM saturates full-range int8 weights (x86 AVX2 without VNNI): this export's "
            "DynamicQuantizeMatMul outputs are off here by up to ~18 %; export it again with --reduce-range")


def _calibration_overlap(out: OutputFolder, eval_set: EvalSet) -> str | None:
    """Evaluation text must be disjoint from the text the export was calibrated on (GPTQ, scores, hot
    rows): the same text in both measures memory, not quality."""
    from ..passes.calibration import calibration_texts_for_overlap

    spec = out.report.get("calibration_text")
    if spec is None:
        return None
    try:
        found = calibration_texts_for_overlap(spec.get("calib"), spec.get("text_field", "text"))
    except CptqError:
        return None  # the calibration file changed or went away since the export: nothing to compare
    if found is None:
        return None
    texts, source = found
    shared = sum(1 for t in eval_set.texts if t.strip() in texts)
    if not shared:
        return None
    return (f"{shared} of the {len(eval_set.texts)} --eval texts are also calibration text ({source}); "
            "quality measured on them overstates the export")


def short_verification(out_folder: Path, loaded_or_none: LoadedModel | None = None, quick: bool = True,
                       baselines: dict[str, Path] | None = None) -> dict[str, Any]:
    """CPU figures for the export report: quality and latency against the FP32 and FP16 baselines.

    No thresholds and no files written; quick mode keeps it to a few seconds for MiniLM (64
    sentences or 512 tokens; latency at batch 1, sequence 16, or 8 decoded tokens). `baselines`
    ({"fp32": path, "fp16": path}: the exporter's, still staged) replaces the cache.
    """
    out = inspect_output_folder(Path(out_folder), loaded_or_none, getattr(loaded_or_none, "trust_remote_code", False))
    variants = {CANDIDATE: out.model,
                **(baselines if baselines is not None else ensure_baselines(out, loaded_or_none, progress=False))}
    speed_settings = SpeedSettings.for_mode(quick)
    if quick:
        speed_settings.encoder_shapes = ((1, 16),)
    measured = measure_on(CpuAdapter(threads=2), variants, out, None, QualitySettings.for_mode(quick), speed_settings,
                          progress=False)
    return {"ep": "cpu", "quick": quick, **measured}
