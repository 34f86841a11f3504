"""Sensitivity passes (CMPQ, PMPQ, TDMPQ, the 4-bit oracle) and the bit allocator.

One data flow: calibration batches -> task loss (with FP32 references, once) -> a score per
allocation unit (layer, or block plus embeddings/head) per method -> bits per unit -> a Plan.
Costs are given in forward-pass equivalents (FPE): seconds divided by the time of one plain
forward pass over the same calibration set, measured in the same run.
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any, TypedDict

import torch

from ..errors import CptqError
from ..layer_graph import Layer, LayerGraph
from ..model_loading import LoadedModel
from ..output_folder import pause_point
from ..plan import (
    SUPPORTED_BITS,
    ZERO_POINT_MODES,
    LayerPlan,
    Plan,
    apply_zero_points,
    check_block_size,
)
from ..quant.quantize import CLIP_METHODS
from ..quant.storage import WeightShape
from .allocate import FIXED_PARAM_BYTES, budget_bits, cluster_bits
from .block_replay import BlockReplay
from .calibration import MIN_SAMPLES, MIN_SEQ_LEN, calibration_for
from .cmpq import cmpq_scores
from .common import GRANULARITIES, allocation_units, stored_weight_shape, time_forward, unit_of
from .hot_rows import hot_rows, with_hot_rows
from .oracle import oracle_scores, spearman
from .pmpq import pmpq_scores
from .similarity import CCA_VARIANTS
from .task_loss import LM_OBJECTIVES, LM_TASKS, TaskLoss
from .tdmpq import CURVATURES, tdmpq_scores

METHODS = ("cmpq", "pmpq", "tdmpq", "oracle")


@dataclass
class AnalysisOptions:
    calib: str | None = None
    text_field: str = "text"
    calib_samples: int = 64
    seq_len: int = 128
    seed: int = 0
    sparsity: tuple[float, ...] = ()  # PMPQ: empty = matched to each layer's 4-bit error; else fixed fractions
    bit_widths: tuple[int, ...] = (16, 8, 4)
    granularity: str = "layer"
    target_bits: float | None = None
    max_size_mb: float | None = None
    block_size: int = 32
    clip: str = "absmax"
    cca: str = "cka"  # CMPQ similarity: cka, or cca / svcca / pwcca
    curvature: str = "fisher"  # TDMPQ second-order term: fisher or hutchinson
    lm_loss: str = "kl"  # language models: KL from the FP32 predictions, or "ce" on the calibration text
    zero_points: str = "auto"  # asymmetric weights: auto (at 4 bits), always, never
    weight_format: str = "qdq"  # the export's --format: what a size budget counts differs for "dynamic"
    hot_rows: bool = True  # a 4-bit token embedding keeps the calibration text's tokens at 8 bits (hot_rows.py)


class _CalibrationSummary(TypedDict):
    source: str
    samples: int
    tokens: int
    seq_len: int
    seed: int


class CalibrationSummary(_CalibrationSummary, total=False):
    """What an analysis calibrated on, for its report."""

    lm_loss: str  # language models only: the task loss's objective


@dataclass
class AnalysisResult:
    task: str
    granularity: str
    units: dict[str, list[str]]  # unit -> the layer names it covers
    unit_params: dict[str, int]  # quantizable weights per unit (shared parameters counted once)
    non_quantizable_params: int  # biases, norms...: stored as FP16 whatever the plan
    scores: dict[str, dict[str, float]]  # method -> unit -> score (higher = more sensitive)
    calibration: CalibrationSummary
    oracle: dict[str, float] | None = None
    spearman: dict[str, float] = field(default_factory=dict)  # method -> rank correlation with the oracle
    cost_fpe: dict[str, float] = field(default_factory=dict)  # method -> cost in forward-pass equivalents
    seconds: dict[str, float] = field(default_factory=dict)  # method (and "forward", "setup") -> wall seconds
    base_loss: float | None = None
    notes: list[str] = field(default_factory=list)
    hot_rows: dict[str, list[int]] = field(default_factory=dict)  # table -> rows kept at 8 bits when at 4


def check_options(options: AnalysisOptions, methods: tuple[str, ...] = ()) -> None:
    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        raise CptqError(f"unknown method {unknown[0]!r}; use one of: {', '.join(METHODS)}")
    if any(not 0 < s < 1 for s in options.sparsity):
        raise CptqError(f"sparsity {list(options.sparsity)} must be fractions strictly between 0 and 1")
    if not options.bit_widths or any(b not in SUPPORTED_BITS for b in options.bit_widths):
        raise CptqError(f"bit widths {list(options.bit_widths)} must be chosen from {', '.join(map(str, SUPPORTED_BITS))}")
    if options.granularity not in GRANULARITIES:
        raise CptqError(f"granularity {options.granularity!r} must be one of: {', '.join(GRANULARITIES)}")
    if options.cca not in CCA_VARIANTS:
        raise CptqError(f"CCA variant {options.cca!r} must be one of: {', '.join(CCA_VARIANTS)}")
    if options.lm_loss not in LM_OBJECTIVES:
        raise CptqError(f"--lm-loss {options.lm_loss!r} must be one of: {', '.join(LM_OBJECTIVES)}")
    if options.curvature not in CURVATURES:
        raise CptqError(f"curvature {options.curvature!r} must be one of: {', '.join(CURVATURES)}")
    if options.zero_points not in ZERO_POINT_MODES:
        raise CptqError(f"zero points {options.zero_points!r} must be one of: {', '.join(ZERO_POINT_MODES)}")
    if options.clip not in CLIP_METHODS:
        raise CptqError(f"clip {options.clip!r} must be one of: {', '.join(CLIP_METHODS)}")
    if options.target_bits is not None and options.max_size_mb is not None:
        raise CptqError("give either a target of bits per weight or a maximum size, not both")
    if options.max_size_mb is not None and not 0 < options.max_size_mb < math.inf:  # inf: not JSON, and no budget
        raise CptqError(f"maximum size {options.max_size_mb} MB must be a positive number")
    if options.target_bits is not None and options.bit_widths:
        low, high = min(options.bit_widths), max(options.bit_widths)
        if not low <= options.target_bits <= high:  # the allocator's own rule, checked before any analysis
            raise CptqError(f"--target-bits {options.target_bits:g} is outside [{low}, {high}], the range of the "
                            "bit widths")
    if options.seq_len < MIN_SEQ_LEN:
        raise CptqError(f"--seq-len {options.seq_len} is too short; use at least {MIN_SEQ_LEN} tokens")
    if options.calib_samples < MIN_SAMPLES:
        raise CptqError(f"calibration samples {options.calib_samples} is too few; use at least {MIN_SAMPLES}")
    check_block_size(options.block_size)


def _param_counts(model: torch.nn.Module, graph: LayerGraph,
                  units: dict[str, list[Layer]]) -> tuple[dict[str, int], int]:
    unit_params = {unit: sum(layer.num_params for layer in layers) for unit, layers in units.items()}
    quantizable = {id(model.get_submodule(layer.name).weight) for layers in units.values() for layer in layers}
    other = sum(p.numel() for p in model.parameters() if id(p) not in quantizable)
    return unit_params, other


def analyze(loaded: LoadedModel, graph: LayerGraph, methods: Iterable[str], options: AnalysisOptions,
            validate: bool = False, progress: bool = True, forward_repeats: int = 3) -> AnalysisResult:
    """Score every allocation unit of `loaded` (a LoadedModel) with each method; the oracle too when validating.

    The FPE unit is the median of `forward_repeats` plain forward passes: 3 where costs are compared
    (analyze, bench), 1 in an export, which only reports its cost.
    """
    wanted = tuple(dict.fromkeys(methods))
    check_options(options, wanted)
    model = loaded.model
    model.eval()
    units = allocation_units(graph, options.granularity)
    unit_params, other_params = _param_counts(model, graph, units)
    calib = calibration_for(loaded, options)
    summary = CalibrationSummary(source=calib.source, samples=calib.num_samples, tokens=calib.num_tokens,
                                 seq_len=calib.seq_len, seed=options.seed)
    if loaded.task in LM_TASKS:
        summary["lm_loss"] = options.lm_loss
    result = AnalysisResult(
        task=loaded.task, granularity=options.granularity,
        units={unit: [layer.name for layer in layers] for unit, layers in units.items()},
        unit_params=unit_params, non_quantizable_params=other_params, scores={}, calibration=summary,
    )
    if options.hot_rows and 4 in options.bit_widths:
        result.hot_rows = hot_rows(model, graph, calib, tokenized=loaded.tokenizer is not None)
    for layer in graph.layers:
        if layer.tied_to:
            result.notes.append(f"{layer.name} shares its weight with {layer.tied_to}: scored, pruned and "
                                f"quantized once through that parameter, and given its bits")
    with torch.no_grad():  # warm-up (allocations, kernel selection), not timed
        model(**calib.batches[0])
    fpe = result.seconds["forward"] = time_forward(model, calib, forward_repeats)
    # Shared setup (FP32 reference outputs / MLM mask, base loss): each method that needs it pays for it in its cost.
    start = time.perf_counter()
    # TDMPQ's Gauss-Newton curvature reads the model's own output; only the other passes (and
    # Hutchinson's true Hessian) need the FP32 references of a reference-based loss.
    needs_references = "oracle" in wanted or validate or options.curvature == "hutchinson"
    loss = TaskLoss(loaded, calib, options.seed, references=needs_references, lm_objective=options.lm_loss)
    reference_seconds = time.perf_counter() - start
    needs_base = "oracle" in wanted or validate
    start = time.perf_counter()
    # The unchanged pass: base loss, and the block outputs the oracle replays (PMPQ replays its own subset).
    replay = BlockReplay(model, graph, loss, options.granularity) if needs_base else None
    result.base_loss = replay.base_loss if replay else None
    base_seconds = time.perf_counter() - start
    result.seconds["setup"] = reference_seconds + base_seconds

    run_order = [m for m in METHODS if m in wanted or (m == "oracle" and validate)]
    pause_point("analysis")  # tests: stop mid-analysis (CPTQ_TEST_PAUSE_AT=analysis)
    for method in run_order:
        start = time.perf_counter()
        if method == "cmpq":
            scores = cmpq_scores(model, graph, calib, options.granularity, options.cca, options.seed, progress,
                                 options.block_size, options.clip, result.hot_rows)
            shared = 0.0
        elif method == "pmpq":
            scores = pmpq_scores(loaded, graph, calib, options.sparsity, options.granularity, options.block_size,
                                 options.clip, result.hot_rows, options.seed, progress, lm_loss=options.lm_loss)
            shared = 0.0  # its references and base pass, on its subset, are inside its own time
        elif method == "tdmpq":
            scores = tdmpq_scores(model, graph, calib, loss, options.granularity, options.block_size, options.clip,
                                  options.curvature, options.seed, progress, result.hot_rows)
            shared = reference_seconds if options.curvature == "hutchinson" else 0.0
        else:
            scores = oracle_scores(model, graph, calib, loss, options.granularity, options.block_size, options.clip,
                                   replay, progress, result.hot_rows)
            shared = reference_seconds + base_seconds
        elapsed = time.perf_counter() - start
        result.seconds[method] = elapsed
        result.cost_fpe[method] = (elapsed + shared) / fpe
        if method == "oracle":
            result.oracle = scores
        else:
            result.scores[method] = scores
    if result.oracle is not None:
        result.spearman = {m: spearman(s, result.oracle) for m, s in result.scores.items()}
    return result


def _significant(value: float) -> float:
    return float(f"{value:.6g}")


def plan_from_scores(graph: LayerGraph, scores: dict[str, float], method: str, options: AnalysisOptions,
                     model_name: str, *, non_quantizable_params: int = 0,
                     hot_rows: dict[str, list[int]] | None = None) -> Plan:
    """A plan from one method's scores; the same inputs give a byte-identical Plan.to_json().

    `scores` are per allocation unit of `options.granularity` (layer names; for blocks "block.N"
    plus the layers outside blocks). Layer scores given with block granularity are reduced to the
    block's most sensitive layer. `non_quantizable_params` (AnalysisResult.non_quantizable_params)
    makes a `max_size_mb` budget count the biases and norms too. `hot_rows` (AnalysisResult.hot_rows)
    go into the plan of each table that ends at 4 bits, and a budget counts their 8-bit bytes.
    """
    hot_rows = hot_rows or {}
    check_options(options)
    units = allocation_units(graph, options.granularity)
    unit_scores: dict[str, float] = {}
    for unit, layers in units.items():
        if unit in scores:
            unit_scores[unit] = _significant(float(scores[unit]))
        elif all(layer.name in scores for layer in layers):
            unit_scores[unit] = _significant(max(float(scores[layer.name]) for layer in layers))
        else:
            raise CptqError(f"the {method} scores have no entry for {unit!r}; were they computed at "
                            f"{options.granularity} granularity for this model?")
    # Weights per unit as the exported file stores them: a tied LM head reads its embedding's parameter
    # (one initializer in the export), so its parameters are counted once, with its owner's unit, and
    # its bytes are what reading the table adds (quant/storage.TiedHead).
    unit_params = dict.fromkeys(units, 0)
    weights: dict[str, list[WeightShape]] = {unit: [] for unit in units}
    for layer in graph.layers:
        unit = unit_of(graph, layer, options.granularity)
        if not layer.tied_to:
            unit_params[unit] += layer.num_params
        weights[unit].append(stored_weight_shape(graph, layer, hot_rows))
    # Measured from the FP32 export when the exporter annotated the graph; else biases and norms in FP32.
    fixed_bytes = (graph.fixed_bytes if graph.fixed_bytes is not None
                   else FIXED_PARAM_BYTES * non_quantizable_params)
    budget: dict[str, float | None] | None = None
    centres: list[float] = []
    if options.target_bits is not None or options.max_size_mb is not None:
        unit_bits = budget_bits(unit_scores, unit_params, options.bit_widths, target_bits=options.target_bits,
                                max_size_mb=options.max_size_mb, block_size=options.block_size,
                                fixed_bytes=fixed_bytes, zero_points=options.zero_points,
                                weight_format=options.weight_format, weights=weights)
        budget = {"target_bits": options.target_bits, "max_size_mb": options.max_size_mb}
    else:
        unit_bits, centres = cluster_bits(unit_scores, options.bit_widths, options.seed)
    total = sum(unit_params.values())
    average_bits = sum(unit_params[u] * unit_bits[u] for u in units) / total if total else 0.0
    layer_plans: dict[str, LayerPlan] = {}
    for layer in graph.layers:
        unit = unit_of(graph, layer, options.granularity)
        layer_plans[layer.name] = LayerPlan(bits=unit_bits[unit], block_size=options.block_size, symmetric=True,
                                            score=unit_scores[unit])
    meta: dict[str, Any] = {
        "granularity": options.granularity,
        "bit_widths": sorted(set(options.bit_widths), reverse=True),
        "seed": options.seed,
        "allocation": "budget-greedy" if budget else "khm",
        "budget": budget,
        "khm_log10_centres": [_significant(c) for c in centres],
        "average_bits": _significant(average_bits),
        "unit_scores": unit_scores,
    }
    plan = Plan(layers=layer_plans, method=method, model=model_name, clip=options.clip, meta=meta)
    return with_hot_rows(apply_zero_points(plan, options.zero_points), hot_rows)
