"""One model's benchmark: anchors, sensitivity analysis once, plans at several budgets, exports,
then quality and interleaved latency of every variant in the same run."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..exporter.pipeline import export_quantized, exported_layer_graph
from ..layer_graph import LayerGraph
from ..model_loading import TASK_CAUSAL_LM, LoadedModel
from ..options import AnalysisOptions
from ..passes import AnalysisResult, analyze, plan_from_scores
from ..passes.hot_rows import with_hot_rows
from ..passes.measurements import CalibrationMeasurements
from ..plan import Plan, apply_zero_points, uniform_plan
from ..plan_source import PlanFactory
from ..quant.storage import FORMAT_DYNAMIC, FORMAT_QDQ
from ..runtimes.base import model_bytes
from ..runtimes.cpu import CpuAdapter, u8s8_gemm_saturates
from ..runtimes.quality import EvalSet, QualitySettings, TextEncoder, measure_quality
from ..runtimes.speed import SpeedSettings, measure_latency
from .anchors import FP16, FP32, ORT_INT4, ORT_INT8, build_anchors
from .pass_memory import measure as measure_pass_memory

ANCHORS = (FP32, FP16, ORT_INT8, ORT_INT4)


@dataclass
class ModelSpec:
    key: str
    title: str
    load: Callable[[], LoadedModel]
    methods: tuple[str, ...]  # sensitivity methods whose plans are exported
    target_bits: tuple[float, ...]  # budgets (average bits per weight), besides the default clustering
    size_goal_mb: float | None = None  # one more budget, as a file size (the goal for MiniLM)
    granularity: str = "layer"
    calib_samples: int = 64
    seq_len: int = 128
    calib: str | None = None  # calibration text file; None: the offline corpus
    eval_set: Callable[[], EvalSet] | None = None
    measure_quality: bool = True  # False for random weights: cost and speed only
    validate: bool = True  # run the 4-bit oracle: Spearman, and oracle-ranked plans
    export_methods: tuple[str, ...] | None = None  # methods whose plans are exported (None: all, oracle too)
    # Uniform plans (bits, block size) through the same exporter, for reference. 4 bits in blocks of 16 spends
    # about the bytes of a 4.5-bit mixed plan on finer scales instead: uniform int4 "at equal size".
    uniform: tuple[tuple[int, int], ...] = ((8, 32), (4, 32), (4, 16))
    # Variants (method, budget label) also exported in `--format dynamic` (DynamicQuantizeMatMul); a size budget
    # is re-planned with that format's byte count.
    dynamic: tuple[tuple[str, str], ...] = ()


@dataclass
class Variant:
    name: str
    family: str  # "anchor" or the method that ranked the layers
    path: Path
    model_bytes: int
    average_bits: float | None = None
    budget: str = ""
    quality: dict[str, Any] = field(default_factory=dict)
    latency: dict[str, Any] = field(default_factory=dict)


@dataclass
class ModelResult:
    spec: ModelSpec
    task: str
    variants: list[Variant]
    spearman: dict[str, float]
    cost_fpe: dict[str, float]
    forward_s: float
    seconds: float
    quality_settings: dict[str, Any] = field(default_factory=dict)
    latency_keys: list[str] = field(default_factory=list)
    pass_memory: dict[str, dict[str, Any]] = field(default_factory=dict)  # method -> bench.pass_memory result
    num_blocks: int = 0


def _plans(spec: ModelSpec, graph: LayerGraph, result: AnalysisResult, options: AnalysisOptions,
           model_name: str) -> Iterator[tuple[str, str, Plan]]:
    """(method, budget label, plan) for every method at the default clustering and at each budget."""
    rankings = dict(result.scores)
    if result.oracle is not None:
        rankings["oracle"] = result.oracle
    budgets: list[tuple[str, dict[str, float]]] = [("KHM", {})] + [(f"{b:g} bits", {"target_bits": b}) for b in spec.target_bits]
    if spec.size_goal_mb:
        budgets.append((f"≤{spec.size_goal_mb:g} MB", {"max_size_mb": spec.size_goal_mb}))
    for method, scores in rankings.items():
        if spec.export_methods is not None and method not in spec.export_methods:
            continue
        for label, budget in budgets:
            if method == "oracle" and not budget:
                continue  # the oracle ranks; KHM on its raw damages adds nothing to compare
            opts = options.replaced(**budget)
            yield method, label, plan_from_scores(graph, scores, method, opts, model_name,
                                                  non_quantizable_params=result.non_quantizable_params,
                                                  hot_rows=result.hot_rows)


def _fixed(plan: Plan) -> PlanFactory:
    """A plan factory that returns `plan` whatever the model (the plans here are made before the exports)."""
    return lambda _loaded, _graph: plan


def run_model(spec: ModelSpec, root: Path, progress: bool = True, log: Callable[[str], object] = print) -> ModelResult:
    start = time.perf_counter()
    loaded = spec.load()
    log(f"[{spec.key}] anchors")
    anchors = build_anchors(loaded, root / "anchors")
    variants = [Variant(name, "anchor", path, model_bytes(path)) for name, path in anchors.items()]

    graph, _ = exported_layer_graph(loaded, anchors[FP32].parent)
    options = AnalysisOptions.from_fields(calib=spec.calib, calib_samples=spec.calib_samples, seq_len=spec.seq_len,
                                          granularity=spec.granularity)
    log(f"[{spec.key}] sensitivity: {', '.join(spec.methods)}" + (" + oracle" if spec.validate else ""))
    result = analyze(loaded, graph, spec.methods, options, validate=spec.validate, progress=progress)
    log(f"[{spec.key}] peak memory of each pass (a fresh process each)")
    pass_memory = {}
    for method in spec.methods:
        measured = measure_pass_memory(loaded.source, method, spec.granularity, spec.calib_samples, spec.seq_len,
                                       spec.calib)
        if measured is not None:
            pass_memory[method] = measured

    plans = [("uniform", f"{bits} bits" + (f", block {block}" if block != 32 else ""),
              with_hot_rows(apply_zero_points(uniform_plan(graph, bits, block), "auto"), result.hot_rows))
             for bits, block in spec.uniform]  # as `cptq-export --bits`: hot rows at 4 bits
    plans += list(_plans(spec, graph, result, options, loaded.display_name))
    # GPTQ codes for every cptq variant; one round-to-nearest twin of the first tdmpq budget shows what GPTQ adds.
    runs = [(method, label, plan, "gptq", FORMAT_QDQ) for method, label, plan in plans]
    ablation = next(((m, lb, p) for m, lb, p in plans if m == "tdmpq" and lb != "KHM"), None)
    if ablation:
        runs.append((*ablation, "rtn", FORMAT_QDQ))
    dynamic_options = options.replaced(weight_format=FORMAT_DYNAMIC)
    dynamic_plans = [("uniform", f"{bits} bits" + (f", block {block}" if block != 32 else ""), plan)
                     for (bits, block), (_, _, plan) in zip(spec.uniform, plans)]
    dynamic_plans += list(_plans(spec, graph, result, dynamic_options, loaded.display_name))
    runs += [(m, lb, p, "gptq", FORMAT_DYNAMIC) for m, lb, p in dynamic_plans if (m, lb) in spec.dynamic]
    measurements = CalibrationMeasurements(options.calibration)  # the calibration batches, built once for every export
    reduce_range = u8s8_gemm_saturates()  # what cptq-export does on this CPU
    for method, label, plan, algorithm, fmt in runs:
        family = method if algorithm == "gptq" else f"{method} (RTN)"
        family += " (dynamic)" if fmt == FORMAT_DYNAMIC else ""
        name = f"cptq {method} {label}" + (" (RTN)" if algorithm == "rtn" else "") + (
            " (dynamic)" if fmt == FORMAT_DYNAMIC else "")
        log(f"[{spec.key}] export {name}")
        out = root / "cptq" / f"{method}-{label.replace(' ', '').replace('≤', 'max')}-{algorithm}-{fmt}"
        exported = export_quantized(loaded, _fixed(plan), out, force=True, progress=False,
                                    algorithm=algorithm, calibration=measurements, fmt=fmt,
                                    reduce_range=reduce_range)
        variants.append(Variant(name, family, exported.paths.model,
                                exported.report.model_bytes, exported.report.average_bits, label))

    adapter = CpuAdapter(threads=2)
    config = loaded.config
    sessions = {v.name: adapter.session(v.path) for v in variants}
    model_result = ModelResult(spec, loaded.task, variants, result.spearman, result.cost_fpe,
                               result.seconds["forward"], 0.0, pass_memory=pass_memory,
                               num_blocks=graph.num_blocks)
    if spec.measure_quality:
        log(f"[{spec.key}] quality of {len(variants)} variants")
        settings = QualitySettings.for_mode(False)
        settings.lm_tokens = 16384  # 4-bit damage to a small LM is a few tenths of a percent: measure it on enough text
        encoder = TextEncoder(anchors[FP32].parent, config)
        eval_set = spec.eval_set() if spec.eval_set else None
        # FP32 is the reference: every other variant is compared with it on the same inputs.
        quality = measure_quality(loaded.task, adapter, sessions, encoder, config, settings, eval_set,
                                  candidate=FP32, progress=progress).to_dict()
        model_result.quality_settings = {"n_examples": quality["n_examples"], **quality["settings"]}
        for v in variants:
            v.quality = dict(quality["variants"].get(v.name, {}))
            if v.name != FP32:
                v.quality.update(quality[f"vs_{v.name}"])  # symmetric measures: cosine, agreement
            if "perplexity" in v.quality:  # relative to FP32 (measure_quality's was FP32 relative to v)
                v.quality["ppl_increase"] = v.quality["perplexity"] / quality["variants"][FP32]["perplexity"] - 1
    log(f"[{spec.key}] latency of {len(variants)} variants (interleaved)")
    speed = SpeedSettings.for_mode(False)
    if loaded.task != TASK_CAUSAL_LM:
        speed.encoder_shapes = ((1, 16), (1, 128))
    latency = measure_latency(loaded.task, adapter, sessions, config, speed, progress)
    for v in variants:
        v.latency = latency[v.name]
    model_result.latency_keys = [k for k, stats in latency[FP32].items() if isinstance(stats, dict)]
    model_result.seconds = time.perf_counter() - start
    return model_result
