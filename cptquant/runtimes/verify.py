"""`cptq verify`'s engine: check an export folder, measure it against its baselines on each
execution provider, gate the figures on thresholds, and write report.json, report.md and JUnit XML.

Flow: inspect_output_folder (refuse bad input before any model runs) -> ensure_baselines (the
exporter's cache, rebuilt from the report's source when missing) -> per adapter: open the three
variants, measure quality, then latency -> gate -> reports.
"""

from __future__ import annotations

import json
import math
import os
import sys
import xml.etree.ElementTree as ET
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import onnx
import onnxruntime as ort

from .. import __version__
from ..errors import CptqError
from ..model_loading import CLASSIFIER_TASKS, TASK_CAUSAL_LM, TASK_FEATURES, TASK_MASKED_LM, TASKS, TASK_CLASSIFICATION
from ..progress import console
from ..safety import check_file_hashes, refuse_custom_code
from .base import RuntimeAdapter, model_bytes, timed
from .cpu import CpuAdapter
from .cuda import CudaAdapter
from .memory import measure_peak_rss
from .quality import EvalSet, QualitySettings, TextEncoder, measure_quality
from .speed import SpeedSettings, measure_latency, speedups

MODEL_FILE = "model.onnx"
REPORT_FILE = "model.report.json"
BASELINES = ("fp32", "fp16")
CANDIDATE = "quantized"
REPORT_DIR = "verify"  # cptq verify's reports, inside the output folder unless --report-dir says otherwise


# ---------------------------------------------------------------- thresholds


@dataclass
class Thresholds:
    max_ppl_increase: float = 0.02  # relative: 0.02 = perplexity may grow by 2 %
    max_accuracy_drop: float = 0.01  # absolute: 0.01 = one point of accuracy (or of agreement)
    min_cosine: float = 0.99  # mean cosine of pooled embeddings
    min_speedup: float = 1.0  # geometric mean of baseline p50 / candidate p50
    max_kl: float | None = None  # causal LM: mean KL divergence of next-token distributions (None: not gated)


def parse_fraction(text: str, option: str, high: float = math.inf) -> float:
    """'2%' or '0.02' -> 0.02. One clear error for anything else (or above `high`)."""
    raw = str(text).strip()
    try:
        value = float(raw[:-1]) / 100.0 if raw.endswith("%") else float(raw)
    except ValueError:
        raise CptqError(f"{option} must be a number or a percentage like 2% (got {text!r})") from None
    if not math.isfinite(value) or value < 0:
        raise CptqError(f"{option} must be a non-negative finite number (got {text!r})")
    if value > high:
        raise CptqError(f"{option} must be at most {high * 100:g}% (got {text!r})")
    return value


def parse_number(text: str, option: str, low: float = 0.0, high: float = math.inf) -> float:
    try:
        value = float(str(text).strip())
    except ValueError:
        raise CptqError(f"{option} must be a number (got {text!r})") from None
    if not (math.isfinite(value) and low <= value <= high):
        raise CptqError(f"{option} must lie between {low:g} and {high:g} (got {text!r})")
    return value


# ---------------------------------------------------------------- input checks


@dataclass
class OutputFolder:
    folder: Path
    model: Path
    report: dict
    config: Any
    task: str
    signature: tuple = ()  # (input names, output names) of model.onnx
    trust_remote_code: bool = False  # from the command line only, never from the folder or its report


def check_external_data(model: onnx.ModelProto, model_path: Path) -> None:
    """Every external tensor must live in a file inside the model's folder, present and long enough.
    Checked on the proto before ONNX Runtime opens anything: a location like ../../etc/passwd or an
    absolute path would make the runtime read outside the folder it was given."""
    from onnx.external_data_helper import ExternalDataInfo, _get_all_tensors, uses_external_data

    folder = model_path.parent.resolve()
    for tensor in _get_all_tensors(model):
        if not uses_external_data(tensor):
            continue
        info = ExternalDataInfo(tensor)
        location = info.location or ""
        if not location or os.path.isabs(location) or Path(location).drive:
            raise CptqError(f"{model_path}: tensor {tensor.name!r} points to external data at {location!r}, "
                            "outside the model's folder; refusing to load it")
        target = (folder / location).resolve()
        if folder != target and folder not in target.parents:
            raise CptqError(f"{model_path}: tensor {tensor.name!r} points to external data at {location!r}, "
                            "outside the model's folder; refusing to load it")
        if not target.is_file():
            raise CptqError(f"{model_path}: external data file {location!r} is missing (tensor {tensor.name!r})")
        end = (info.offset or 0) + (info.length or 0)
        if end > target.stat().st_size:
            raise CptqError(f"{model_path}: external data file {location!r} is truncated "
                            f"(tensor {tensor.name!r} needs bytes up to {end}, the file has {target.stat().st_size})")


def check_model_file(model_path: Path) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """The model file parses as ONNX and its external data is safe and complete.
    Returns its graph's input and output names (what a baseline must share with the candidate)."""
    if not model_path.is_file():
        raise CptqError(f"{model_path} not found")
    try:
        model = onnx.load(str(model_path), load_external_data=False)
    except Exception as exc:
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise CptqError(f"{model_path} is not a valid ONNX model ({first})") from None
    if not model.graph.node:
        raise CptqError(f"{model_path} is not a valid ONNX model (its graph has no nodes)")
    check_external_data(model, model_path)
    return tuple(i.name for i in model.graph.input), tuple(o.name for o in model.graph.output)


def _export_files(folder: Path) -> tuple[Path, Path]:
    """(model, report) of the export in `folder`: model.onnx and model.report.json, or else the one
    NAME.onnx with a NAME.report.json beside it (what `cptq-export -o folder/NAME.onnx` writes)."""
    default = (folder / MODEL_FILE, folder / REPORT_FILE)
    if default[0].exists() or default[1].exists():
        return default
    pairs = [(folder / (r.name[: -len(".report.json")] + ".onnx"), r) for r in sorted(folder.glob("*.report.json"))]
    pairs = [pair for pair in pairs if pair[0].is_file()]
    if len(pairs) > 1:
        raise CptqError(f"{folder} holds several exports ({', '.join(m.name for m, _ in pairs)}); "
                        "give the .onnx file of the one to verify")
    return pairs[0] if pairs else default


def inspect_output_folder(folder: Path, loaded=None, trust_remote_code: bool = False) -> OutputFolder:
    """`folder` is an export's output folder, or the .onnx file of an export in it.
    `trust_remote_code` comes from the command line; custom code a folder names is refused without it."""
    folder = Path(folder).expanduser()
    if folder.suffix == ".onnx" and folder.is_file():
        model_path, folder = folder, folder.parent
        report_path = folder / (model_path.name[: -len(".onnx")] + ".report.json")
    elif not folder.is_dir():
        raise CptqError(f"{folder} is not a folder; give the output folder of cptq-export")
    else:
        model_path, report_path = _export_files(folder)
    refuse_custom_code(folder, trust_remote_code)  # before any transformers loader could import or prompt
    if loaded is None:  # during an export the report is written after this check
        if not report_path.is_file() or not model_path.is_file():
            missing = [p.name for p in (model_path, report_path) if not p.is_file()]
            raise CptqError(f"{folder} is not a cptquant output folder (missing {', '.join(missing)})")
        try:
            report = json.loads(report_path.read_text())
            task = report["task"]
        except (json.JSONDecodeError, KeyError, TypeError):
            raise CptqError(f"{report_path} is not a cptquant report (unreadable JSON or no \"task\")") from None
        if task not in TASKS:
            raise CptqError(f"{report_path}: unknown task {task!r}")
    else:
        report = json.loads(report_path.read_text()) if report_path.is_file() else {}
        task = loaded.task
    signature = check_model_file(model_path)
    if loaded is not None:
        config = loaded.config
    else:
        check_file_hashes(folder, report.get("sha256"), report_path)  # before any of them is read as a model
        if not (folder / "config.json").is_file():
            raise CptqError(f"{folder} is not a cptquant output folder (missing config.json)")
        from transformers import AutoConfig

        try:
            config = AutoConfig.from_pretrained(str(folder), trust_remote_code=trust_remote_code)
        except Exception as exc:
            raise CptqError(f"{folder}/config.json is unreadable: {str(exc).splitlines()[0]}") from None
    return OutputFolder(folder, model_path, report, config, task, signature, trust_remote_code)


def ensure_baselines(out: OutputFolder, loaded=None, progress: bool = True, source: str | None = None) -> dict[str, Path]:
    """The FP32 and FP16 baselines from the exporter's cache; rebuilt from the model's source when missing,
    unreadable, or not this export's (other inputs or outputs, or another fingerprint of weights and settings).

    `source` (the command line's --source) says where to reload the model from; without it the report's
    source is followed only when safe.baseline_source allows it (a local folder naming no custom code)."""
    from ..exporter.baselines import baseline_dir, baseline_fingerprint, write_fingerprint, write_fp16
    from ..exporter.onnx_export import export_onnx
    from ..output_folder import Staging, claim_output, replace_dir

    cache = baseline_dir(out.folder, out.model.name)
    paths = {name: cache / name / MODEL_FILE for name in BASELINES}
    problem = _cache_problem(cache, out)
    if problem is None and _stale_or_unreadable(paths["fp16"], out) is None:
        return paths
    try:
        with claim_output(cache):  # one rebuild of a cache at a time; staged, then swapped in whole
            if problem is None:  # the FP32 baseline is good: only the FP16 one is made again, from it
                with Staging(cache) as staging:
                    write_fp16(cache / "fp32", staging.out / "fp16")
                    replace_dir(staging, staging.out / "fp16", cache / "fp16")
                return paths
            if loaded is None:
                from ..model_loading import load_model
                from ..safety import baseline_source

                source = baseline_source(out.report.get("source"), source, out.trust_remote_code,
                                         f"baseline cache {cache} {problem}")
                if progress:
                    console.print(f"rebuilding the FP32/FP16 baselines from {source} …")
                try:
                    loaded = load_model(source, out.task, out.trust_remote_code)
                except CptqError as exc:
                    raise CptqError(f"baseline cache {cache} {problem} and cannot be rebuilt from {source}: {exc}") \
                        from None
            fingerprint = baseline_fingerprint(loaded)
            expected = out.report.get("baseline_fingerprint")
            if expected and fingerprint != expected:
                raise CptqError(f"baseline cache {cache} {problem}, and {loaded.source} is not the model this export "
                                f"was made from (fingerprint of its weights and task {fingerprint[:12]}, the report's "
                                f"{str(expected)[:12]}); give --source the original model")
            with Staging(cache) as staging:
                new = staging.out
                export_onnx(loaded, new / "fp32")
                write_fp16(new / "fp32", new / "fp16")
                write_fingerprint(new, fingerprint)
                replace_dir(staging, new, cache)
    except OSError as exc:
        raise CptqError(f"cannot write the baseline cache {cache}: {exc.strerror or exc}") from None
    for name, path in paths.items():
        why = _stale_or_unreadable(path, out)
        if why:
            raise CptqError(f"the {name} baseline {path} does not match {out.model} ({why})")
    return paths


def _cache_problem(cache: Path, out: OutputFolder) -> str | None:
    """Why the cached FP32 baseline cannot serve this export, or None. A cache left by another model (an
    output folder of the same name, a folder copied next to one) must never be compared with silently:
    its inputs and outputs, and then the fingerprint recorded with it, must be this export's."""
    from ..exporter.baselines import read_fingerprint

    fp32 = cache / "fp32" / MODEL_FILE
    if not fp32.is_file():
        return "is missing"
    why = _stale_or_unreadable(fp32, out)
    if why:
        return f"does not match this export ({why})"
    expected = out.report.get("baseline_fingerprint")
    if expected:  # reports from before fingerprints: the inputs and outputs are all there is to compare
        recorded = read_fingerprint(cache)
        if recorded is None:
            return "has no fingerprint to compare with this export's"
        if recorded != expected:
            return f"belongs to another model or export settings (fingerprint {recorded[:12]}, this export's {str(expected)[:12]})"
    return None


def _stale_or_unreadable(path: Path, out: OutputFolder) -> str | None:
    if not path.is_file():
        return "missing"
    try:
        return _stale_reason(path, out)
    except CptqError as exc:  # a cache file cut short by a kill, or damaged: made again
        return str(exc).replace(str(path), path.name)


def _stale_reason(path: Path, out: OutputFolder) -> str | None:
    """Why the baseline at `path` is not one of this export's model, or None when its inputs and outputs match."""
    inputs, outputs = check_model_file(path)
    if not out.signature or (set(inputs), set(outputs)) == (set(out.signature[0]), set(out.signature[1])):
        return None
    if set(inputs) != set(out.signature[0]):
        return f"inputs {_names(inputs)} instead of {_names(out.signature[0])}"
    return f"outputs {_names(outputs)} instead of {_names(out.signature[1])}"


def _names(names, keep: int = 4) -> str:
    return ", ".join(names[:keep]) + (f" … ({len(names)} in all)" if len(names) > keep else "")


def select_adapters(ep: str, threads: int = 2) -> tuple[list[RuntimeAdapter], dict[str, str]]:
    """'auto': every available EP, the others skipped with their reason. A named EP must be available."""
    known = {"cpu": lambda: CpuAdapter(threads=threads), "cuda": CudaAdapter}
    names = list(known) if ep.strip() == "auto" else [n.strip().lower() for n in ep.split(",") if n.strip()]
    unknown = [n for n in names if n not in known]
    if not names or unknown:
        raise CptqError(f"--ep must be auto or a comma list of {', '.join(known)} (got {ep!r})")
    adapters, skipped = [], {}
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


def open_sessions(adapter: RuntimeAdapter, variants: dict[str, Path], config) -> tuple[dict, dict]:
    """Open each variant; per variant {bytes_on_disk, open_s, peak_rss_bytes, rss_growth_bytes}.
    Memory comes from a fresh process per variant (memory.py), so the order of opening does not bias it."""
    sessions, facts = {}, {}
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
               quality_settings: QualitySettings, speed_settings: SpeedSettings, progress: bool = True) -> dict:
    """Quality and speed of the candidate and every baseline on one adapter, ratios included."""
    sessions, facts = open_sessions(adapter, variants, out.config)
    encoder = TextEncoder(out.folder, out.config, out.trust_remote_code)
    quality = measure_quality(out.task, adapter, sessions, encoder, out.config, quality_settings, eval_set,
                              CANDIDATE, progress)
    latency = measure_latency(out.task, adapter, sessions, out.config, speed_settings, progress)
    speed = {"variants": {name: {**facts[name], "latency": latency[name]} for name in variants},
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
    return {"device": adapter.device_name(), "onnxruntime": ort.__version__, "quality": quality.to_dict(),
            "speed": speed}


# ---------------------------------------------------------------- gating


@dataclass
class Check:
    ep: str
    name: str
    measured: float
    threshold: float
    at_most: bool  # True: measured must be <= threshold; False: >=
    percent: bool = False

    @property
    def passed(self) -> bool:
        return self.measured <= self.threshold if self.at_most else self.measured >= self.threshold

    def _fmt(self, x: float) -> str:
        return f"{x * 100:.3g}%" if self.percent else f"{x:.4g}"

    def line(self) -> str:
        relation = ("<=" if self.passed else ">") if self.at_most else (">=" if self.passed else "<")
        verdict = "PASS" if self.passed else "FAIL"
        return f"{verdict} [{self.ep}] {self.name}: {self._fmt(self.measured)} {relation} {self._fmt(self.threshold)}"

    def to_dict(self) -> dict:
        return {"ep": self.ep, "name": self.name, "measured": self.measured, "threshold": self.threshold,
                "comparison": "<=" if self.at_most else ">=", "passed": self.passed, "line": self.line()}


def gate(ep: str, measured: dict, task: str, baseline: str, thresholds: Thresholds) -> list[Check]:
    vs_quality = measured["quality"][f"vs_{baseline}"]
    checks = []
    if task == TASK_CAUSAL_LM:
        checks.append(Check(ep, f"perplexity increase vs {baseline}", vs_quality["ppl_increase"],
                            thresholds.max_ppl_increase, True, percent=True))
        if thresholds.max_kl is not None:
            checks.append(Check(ep, f"mean KL divergence from {baseline}", vs_quality["kl_divergence"],
                                thresholds.max_kl, True))
    elif task in CLASSIFIER_TASKS + (TASK_MASKED_LM,):
        what = "accuracy drop" if measured["quality"]["variants"][CANDIDATE].get("accuracy") is not None \
            else "disagreement (accuracy drop taking the baseline as labels)"
        checks.append(Check(ep, f"{what} vs {baseline}", vs_quality["accuracy_drop"], thresholds.max_accuracy_drop,
                            True, percent=True))
    elif task == TASK_FEATURES:
        checks.append(Check(ep, f"mean cosine vs {baseline}", vs_quality["mean_cosine"], thresholds.min_cosine, False))
    checks.append(Check(ep, f"speed-up vs {baseline} (geometric mean of p50 ratios)",
                        measured["speed"][f"vs_{baseline}"]["geomean_speedup"], thresholds.min_speedup, False))
    return checks


@dataclass
class VerifyResult:
    report: dict
    checks: list[Check] = field(default_factory=list)
    skipped: dict[str, str] = field(default_factory=dict)

    @property
    def passed(self) -> bool:
        return all(c.passed for c in self.checks)


def verify_output(folder: Path, baseline: str = "fp32", ep: str = "auto", thresholds: Thresholds | None = None,
                  eval_set: EvalSet | None = None, quick: bool = False, threads: int = 2, progress: bool = True,
                  loaded=None, quality_settings: QualitySettings | None = None,
                  speed_settings: SpeedSettings | None = None, trust_remote_code: bool = False,
                  source: str | None = None) -> VerifyResult:
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
    warnings = [_calibration_overlap(out, eval_set)] if eval_set is not None else []
    warnings = [w for w in warnings if w]
    variants = {CANDIDATE: out.model, **ensure_baselines(out, loaded, progress, source)}
    # Only once the input is known good: a refusal stays the one line on stderr.
    for why in skipped.values():
        print(why, file=sys.stderr)  # one plain line: CI logs must not wrap it
    for line in warnings:
        print(f"warning: {line}", file=sys.stderr)
    quality_settings = quality_settings or QualitySettings.for_mode(quick)
    speed_settings = speed_settings or SpeedSettings.for_mode(quick)
    result = VerifyResult(report={}, skipped=skipped)
    per_ep = {}
    for adapter in adapters:
        per_ep[adapter.name] = measure_on(adapter, variants, out, eval_set, quality_settings, speed_settings, progress)
        result.checks.extend(gate(adapter.name, per_ep[adapter.name], out.task, baseline, thresholds))
    result.report = {
        "cptquant_version": __version__,
        "onnxruntime_version": ort.__version__,
        "output": str(out.folder.resolve()),
        "model": out.report.get("model"),
        "task": out.task,
        "baseline": baseline,
        "quick": quick,
        "thresholds": asdict(thresholds),
        "variants": {name: str(path) for name, path in variants.items()},
        "eps": per_ep,
        "skipped_eps": skipped,
        "checks": [c.to_dict() for c in result.checks],
        "passed": result.passed,
        "warnings": warnings,
    }
    return result


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


# ---------------------------------------------------------------- reports


def _markdown(report: dict) -> str:
    lines = [f"# cptq verify: {report['model']} ({report['task']})", "",
             f"Output `{report['output']}`, gate baseline **{report['baseline']}**, "
             f"{'quick' if report['quick'] else 'full'} run, cptquant {report['cptquant_version']}, "
             f"onnxruntime {report['onnxruntime_version']}. "
             f"Result: **{'PASS' if report['passed'] else 'FAIL'}**.", ""]
    for why in report["skipped_eps"].values():
        lines += [f"- {why}", ""]
    for line in report.get("warnings", []):
        lines += [f"- **warning**: {line}", ""]
    for ep, measured in report["eps"].items():
        quality, speed = measured["quality"], measured["speed"]
        lines += [f"## {ep}: {measured['device']}", "", "### Quality", ""]
        for name, figures in quality["variants"].items():
            if figures:
                lines.append(f"- {name}: " + ", ".join(f"{k} {v:.6g}" for k, v in figures.items()))
        for key, figures in quality.items():
            if key.startswith("vs_"):
                lines.append(f"- quantized {key.replace('_', ' ')}: " + ", ".join(f"{k} {v:.6g}" for k, v in figures.items()))
        lines += ["", "### Speed (p50 / p90 ms, speed-ups p50 / p90; variants interleaved)", ""]
        names = list(speed["variants"])
        keys = [k for k, v in speed["variants"][names[0]]["latency"].items() if isinstance(v, dict)]
        lines.append("| figure | " + " | ".join(names) + " | speed-up vs " + " | speed-up vs ".join(names[1:]) + " |")
        lines.append("|---" * (1 + 2 * len(names) - 1) + "|")
        for key in keys:
            cells = [f"{speed['variants'][n]['latency'][key]['p50_ms']:.3f} / {speed['variants'][n]['latency'][key]['p90_ms']:.3f}"
                     for n in names]
            ratios = [f"{speed[f'vs_{n}']['latency_speedup'][key]:.3f}× / {speed[f'vs_{n}']['p90_speedup'][key]:.3f}×"
                      for n in names[1:]]
            lines.append(f"| {key} | " + " | ".join(cells + ratios) + " |")
        lines.append("")
        for n in names:
            v = speed["variants"][n]
            rss = (f"peak RSS {v['peak_rss_bytes'] / 1e6:.1f} MB (+{v['rss_growth_bytes'] / 1e6:.1f} MB to open and run it)"
                   if v["peak_rss_bytes"] is not None else "peak RSS n/a")
            extra = f", {v['latency']['tokens_per_s']} tokens/s" if "tokens_per_s" in v["latency"] else ""
            lines.append(f"- {n}: {v['bytes_on_disk'] / 1e6:.2f} MB on disk, {rss}{extra}")
        for n in names[1:]:
            vs = speed[f"vs_{n}"]
            ratios = [f"{vs['smaller_on_disk_by']:.2f}× smaller on disk"]
            ratios += [f"{label} {vs[key]:.3f}×" for key, label in (("peak_rss_bytes_ratio", "peak RSS"),
                                                                   ("rss_growth_bytes_ratio", "RSS growth"),
                                                                   ("tokens_per_s_ratio", "tokens/s"))
                       if vs.get(key) is not None]
            lines.append(f"- quantized vs {n}: " + ", ".join(ratios))
        lines.append("")
    lines += ["## Checks", ""] + [f"- {c['line']}" for c in report["checks"]] + [""]
    return "\n".join(lines)


def write_reports(result: VerifyResult, report_dir: Path) -> tuple[Path, Path]:
    report_dir.mkdir(parents=True, exist_ok=True)
    json_path, md_path = report_dir / "report.json", report_dir / "report.md"
    json_path.write_text(json.dumps(result.report, indent=2, sort_keys=True) + "\n")
    md_path.write_text(_markdown(result.report))
    return json_path, md_path


def write_junit(result: VerifyResult, path: Path) -> Path:
    """One testcase per check, one skipped testcase per EP that could not run."""
    failures = sum(not c.passed for c in result.checks)
    suite = ET.Element("testsuite", name="cptq verify", tests=str(len(result.checks) + len(result.skipped)),
                       failures=str(failures), errors="0", skipped=str(len(result.skipped)))
    for check in result.checks:
        case = ET.SubElement(suite, "testcase", classname=f"cptq.verify.{check.ep}", name=check.name)
        if not check.passed:
            ET.SubElement(case, "failure", message=check.line(), type="threshold").text = check.line()
        # The measured value in an element the JUnit schemas allow (an unknown testcase attribute is not).
        ET.SubElement(case, "system-out").text = check.line()
    for ep, why in result.skipped.items():
        case = ET.SubElement(suite, "testcase", classname=f"cptq.verify.{ep}", name=f"{ep} execution provider")
        ET.SubElement(case, "skipped", message=why)
    root = ET.Element("testsuites")
    root.append(suite)
    ET.indent(root)
    path.parent.mkdir(parents=True, exist_ok=True)
    ET.ElementTree(root).write(path, encoding="utf-8", xml_declaration=True)
    return path


# ---------------------------------------------------------------- export integration


def short_verification(out_folder: Path, loaded_or_none=None, quick: bool = True,
                       baselines: dict[str, Path] | None = None) -> dict:
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
