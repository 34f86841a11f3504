"""Sensitivity passes (CMPQ, PMPQ, TDMPQ, the 4-bit oracle) and the bit allocator.

One data flow: calibration batches -> task loss (with FP32 references, once) -> a score per
allocation unit (layer, or block plus embeddings/head) per method -> bits per unit -> a Plan.
Costs are given in forward-pass equivalents (FPE): seconds divided by the time of one plain
forward pass over the same calibration set, measured in the same run.
"""

from __future__ import annotations

import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any, TypedDict

import torch

from ..errors import CptqError
from ..layer_graph import Layer, LayerGraph
from ..model_loading import LoadedModel
from ..options import AnalysisOptions, fitting_block_size
from ..output_folder import pause_point
from ..plan import LayerPlan, Plan, apply_zero_points
from ..quant.storage import WeightShape
from .allocate import FIXED_PARAM_BYTES, budget_bits, cluster_bits
from .block_replay import BlockReplay
from .calibration import calibration_for
from .cmpq import cmpq_scores
from .common import allocation_units, stored_weight_shape, time_forward, unit_of
from .hot_rows import hot_rows, with_hot_rows
from .oracle import oracle_scores, spearman
from .pmpq import pmpq_scores
from .task_loss import LM_TASKS, TaskLoss
from .tdmpq import tdmpq_scores

METHODS = ("cmpq", "pmpq", "tdmpq", "oracle")


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


def check_methods(methods: Iterable[str]) -> None:
    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        raise CptqError(f"unknown method {unknown[0]!r}; use one of: {', '.join(METHODS)}")


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
    check_methods(wanted)
    allocation, quantization, seed = options.allocation, options.quantization, options.calibration.seed
    model = loaded.model
    model.eval()
    units = allocation_units(graph, allocation.granularity)
    unit_params, other_params = _param_counts(model, graph, units)
    calib = calibration_for(loaded, options.calibration)
    summary = CalibrationSummary(source=calib.source, samples=calib.num_samples, tokens=calib.num_tokens,
                                 seq_len=calib.seq_len, seed=seed)
    if loaded.task in LM_TASKS:
        summary["lm_loss"] = allocation.lm_loss
    result = AnalysisResult(
        task=loaded.task, granularity=allocation.granularity,
        units={unit: [layer.name for layer in layers] for unit, layers in units.items()},
        unit_params=unit_params, non_quantizable_params=other_params, scores={}, calibration=summary,
    )
    if allocation.hot_rows and 4 in allocation.bit_widths:
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
    needs_references = "oracle" in wanted or validate or allocation.curvature == "hutchinson"
    loss = TaskLoss(loaded, calib, seed, references=needs_references, lm_objective=allocation.lm_loss)
    reference_seconds = time.perf_counter() - start
    needs_base = "oracle" in wanted or validate
    start = time.perf_counter()
    # The unchanged pass: base loss, and the block outputs the oracle replays (PMPQ replays its own subset).
    replay = BlockReplay(model, graph, loss, allocation.granularity) if needs_base else None
    result.base_loss = replay.base_loss if replay else None
    base_seconds = time.perf_counter() - start
    result.seconds["setup"] = reference_seconds + base_seconds

    run_order = [m for m in METHODS if m in wanted or (m == "oracle" and validate)]
    pause_point("analysis")  # tests: stop mid-analysis (CPTQ_TEST_PAUSE_AT=analysis)
    for method in run_order:
        start = time.perf_counter()
        if method == "cmpq":
            scores = cmpq_scores(model, graph, calib, allocation.granularity, allocation.cca, seed, progress,
                                 quantization.block_size, quantization.clip, result.hot_rows)
            shared = 0.0
        elif method == "pmpq":
            scores = pmpq_scores(loaded, graph, calib, allocation.sparsity, allocation.granularity, quantization.block_size,
                                 quantization.clip, result.hot_rows, seed, progress, lm_loss=allocation.lm_loss)
            shared = 0.0  # its references and base pass, on its subset, are inside its own time
        elif method == "tdmpq":
            scores = tdmpq_scores(model, graph, calib, loss, allocation.granularity, quantization.block_size, quantization.clip,
                                  allocation.curvature, seed, progress, result.hot_rows)
            shared = reference_seconds if allocation.curvature == "hutchinson" else 0.0
        else:
            scores = oracle_scores(model, graph, calib, loss, allocation.granularity, quantization.block_size, quantization.clip,
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

    `scores` are per allocation unit of `options.allocation.granularity` (layer names; for blocks "block.N"
    plus the layers outside blocks). Layer scores given with block granularity are reduced to the
    block's most sensitive layer. `non_quantizable_params` (AnalysisResult.non_quantizable_params)
    makes a `max_size_mb` budget count the biases and norms too. `hot_rows` (AnalysisResult.hot_rows)
    go into the plan of each table that ends at 4 bits, and a budget counts their 8-bit bytes.
    """
    hot_rows = hot_rows or {}
    allocation, quantization, seed = options.allocation, options.quantization, options.calibration.seed
    units = allocation_units(graph, allocation.granularity)
    unit_scores: dict[str, float] = {}
    for unit, layers in units.items():
        if unit in scores:
            unit_scores[unit] = _significant(float(scores[unit]))
        elif all(layer.name in scores for layer in layers):
            unit_scores[unit] = _significant(max(float(scores[layer.name]) for layer in layers))
        else:
            raise CptqError(f"the {method} scores have no entry for {unit!r}; were they computed at "
                            f"{allocation.granularity} granularity for this model?")
    # Weights per unit as the exported file stores them: a tied LM head reads its embedding's parameter
    # (one initializer in the export), so its parameters are counted once, with its owner's unit, and
    # its bytes are what reading the table adds (quant/storage.TiedHead).
    unit_params = dict.fromkeys(units, 0)
    weights: dict[str, list[WeightShape]] = {unit: [] for unit in units}
    for layer in graph.layers:
        unit = unit_of(graph, layer, allocation.granularity)
        if not layer.tied_to:
            unit_params[unit] += layer.num_params
        weights[unit].append(stored_weight_shape(graph, layer, hot_rows))
    # Measured from the FP32 export when the exporter annotated the graph; else biases and norms in FP32.
    fixed_bytes = (graph.fixed_bytes if graph.fixed_bytes is not None
                   else FIXED_PARAM_BYTES * non_quantizable_params)
    budget: dict[str, float | None] | None = None
    centres: list[float] = []
    if allocation.target_bits is not None or allocation.max_size_mb is not None:
        unit_bits = budget_bits(unit_scores, unit_params, allocation.bit_widths, target_bits=allocation.target_bits,
                                max_size_mb=allocation.max_size_mb, block_size=quantization.block_size,
                                fixed_bytes=fixed_bytes, zero_points=quantization.zero_points,
                                weight_format=options.weight_format, weights=weights)
        budget = {"target_bits": allocation.target_bits, "max_size_mb": allocation.max_size_mb}
    else:
        unit_bits, centres = cluster_bits(unit_scores, allocation.bit_widths, seed)
    total = sum(unit_params.values())
    average_bits = sum(unit_params[u] * unit_bits[u] for u in units) / total if total else 0.0
    layer_plans: dict[str, LayerPlan] = {}
    for layer in graph.layers:
        unit = unit_of(graph, layer, allocation.granularity)
        layer_plans[layer.name] = LayerPlan(bits=unit_bits[unit], symmetric=True, score=unit_scores[unit],
                                            block_size=fitting_block_size(layer.in_features, quantization.block_size))
    meta: dict[str, Any] = {
        "granularity": allocation.granularity,
        "bit_widths": sorted(set(allocation.bit_widths), reverse=True),
        "seed": seed,
        "allocation": "budget-greedy" if budget else "khm",
        "budget": budget,
        "khm_log10_centres": [_significant(c) for c in centres],
        "average_bits": _significant(average_bits),
        "unit_scores": unit_scores,
    }
    plan = Plan(layers=layer_plans, method=method, model=model_name, clip=quantization.clip, meta=meta)
    return with_hot_rows(apply_zero_points(plan, quantization.zero_points), hot_rows)
