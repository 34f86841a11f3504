"""Where an export's plan comes from: a plan file, a uniform width, the k_quant_mixed rule, or a sensitivity
method with its allocation; then the user's `--override PATTERN=BITS` pins (overrides.py) on top.

A factory is chosen and checked before any model loads (bad options fail early) and called with the
loaded model and its exported layer graph.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path

from .errors import CptqError
from .layer_graph import LayerGraph
from .model_loading import LoadedModel
from .options import SUPPORTED_BITS, AnalysisOptions, QuantizationOptions
from .overrides import (
    Override,
    Overrides,
    apply_overrides,
    average_bits,
    budget_without_pinned,
    parse_overrides,
    pinned_bits,
)
from .plan import Plan, apply_zero_points, fill_missing_layers, fit_unsized_blocks, uniform_plan
from .reports import ReportExtras

PlanFactory = Callable[[LoadedModel, LayerGraph], Plan]

PASS_METHODS = ("cmpq", "pmpq", "tdmpq", "oracle")
RULE_METHOD = "rule"  # not a pass: the k_quant_mixed layer rule of llama.cpp and ORT GenAI (passes/rule.py)
# TDMPQ is the default: it ranks MiniLM's layers like the measured 4-bit damage (Spearman 0.99, docs/benchmarks.md).
DEFAULT_METHOD = "tdmpq"


def plan_factory(method: str | None, plan_file: Path | Plan | None, bits: int | None,
                 analysis: AnalysisOptions | None = None, progress: bool = True,
                 report_extras: ReportExtras | None = None, default_bits: int | None = None,
                 overrides: Sequence[str] | Overrides = ()) -> PlanFactory:
    """Decide where the plan comes from: a file, a uniform bit width, or a sensitivity method.

    `analysis` holds the calibration, allocation and quantization settings (already validated); without it
    the defaults, and no hot rows for a plan made without a pass.
    A sensitivity method records its cost and calibration in `report_extras` for the export report.
    `default_bits` fills the layers a plan file leaves out (without it such a plan is refused).
    `overrides` (`PATTERN=BITS` texts, overrides.py) pin layers after the allocation, within its budget.
    """
    report_extras = {} if report_extras is None else report_extras
    parsed = [o for o in overrides if isinstance(o, Override)]  # the API may pass Override records itself
    pins: Overrides = tuple(parsed) if len(parsed) == len(overrides) else parse_overrides([str(o) for o in overrides])
    base = _base_factory(method, plan_file, bits, analysis, progress, report_extras, default_bits, pins)
    quantization = _quantization(analysis)
    if not pins:
        return base

    def with_overrides(loaded: LoadedModel, graph: LayerGraph) -> Plan:
        plan = base(loaded, graph)
        pinned = pinned_bits(pins, graph)
        plan = apply_overrides(plan, pinned, quantization.block_size, quantization.zero_points, graph)
        if "average_bits" in plan.meta:
            plan.meta["average_bits"] = round(average_bits(plan, graph), 6)
        return plan

    return with_overrides


def _quantization(analysis: AnalysisOptions | None) -> QuantizationOptions:
    return analysis.quantization if analysis is not None else QuantizationOptions()


def _base_factory(method: str | None, plan_file: Path | Plan | None, bits: int | None,
                  analysis: AnalysisOptions | None, progress: bool, report_extras: ReportExtras,
                  default_bits: int | None, pins: Overrides) -> PlanFactory:
    quantization = _quantization(analysis)
    block_size, clip, zero_points = quantization.block_size, quantization.clip, quantization.zero_points
    given = [name for name, value in (("--method", method), ("--plan", plan_file), ("--bits", bits)) if value]
    if len(given) > 1:
        raise CptqError(f"give only one of --method, --plan and --bits (got {' and '.join(given)})")
    budget = analysis.allocation if analysis is not None else None
    if (bits is not None or plan_file is not None) and budget is not None and (
            budget.target_bits is not None or budget.max_size_mb is not None):
        fixed = f"--bits {bits}" if bits is not None else "--plan"
        raise CptqError(f"{fixed} fixes every layer's bits; it takes no --target-bits or --max-size-mb (use --method)")
    if default_bits is not None:
        if plan_file is None:
            raise CptqError("--default-bits applies to --plan only (it fills the layers a plan file leaves out)")
        if default_bits not in SUPPORTED_BITS:
            raise CptqError(f"--default-bits {default_bits} is not supported (use 16, 8 or 4)")
    if bits is not None:
        if bits not in SUPPORTED_BITS:
            raise CptqError(f"--bits {bits} is not supported (use 16, 8 or 4)")

        def uniform(loaded: LoadedModel, graph: LayerGraph) -> Plan:
            plan = uniform_plan(graph, bits, block_size)
            plan.clip = clip
            plan = apply_zero_points(plan, zero_points)
            if bits == 4 and analysis is not None and analysis.allocation.hot_rows:
                from .passes.hot_rows import calibration_hot_rows, with_hot_rows

                plan = with_hot_rows(plan, calibration_hot_rows(loaded, graph, analysis.calibration))
            return plan

        return uniform
    if plan_file is not None:
        # read now: a bad plan fails before the model is loaded (the Python API may pass a Plan itself)
        plan = plan_file if isinstance(plan_file, Plan) else Plan.load(plan_file)
        if default_bits is None:
            return lambda loaded, graph: fit_unsized_blocks(plan, graph, block_size)
        return lambda loaded, graph: fill_missing_layers(fit_unsized_blocks(plan, graph, block_size), graph,
                                                         default_bits, block_size, zero_points)
    method = method or DEFAULT_METHOD
    if method == RULE_METHOD:
        return _rule_factory(analysis)
    if method not in PASS_METHODS:
        raise CptqError(f"unknown method {method!r}; use one of {', '.join(PASS_METHODS + (RULE_METHOD,))}")
    from .passes import analyze, plan_from_scores

    options = analysis if analysis is not None else AnalysisOptions()
    allocation = options.allocation

    def from_sensitivity(loaded: LoadedModel, graph: LayerGraph) -> Plan:
        result = analyze(loaded, graph, (method,), options, validate=False, progress=progress, forward_repeats=1)
        scores = result.oracle if method == "oracle" else result.scores[method]
        assert scores is not None  # analyze() scores every method it is given, the oracle included
        budgeted = allocation.target_bits is not None or allocation.max_size_mb is not None
        if pins and budgeted:  # the pinned layers' cost comes out of the budget; the method shares out the rest
            pinned = pinned_bits(pins, graph)
            sub_graph, sub_options = budget_without_pinned(graph, pinned, options, result.hot_rows)
            plan = (plan_from_scores(sub_graph, scores, method, sub_options, loaded.display_name,
                                     non_quantizable_params=result.non_quantizable_params, hot_rows=result.hot_rows)
                    if sub_graph.layers else Plan({}, method=method, model=loaded.display_name, clip=clip))
            plan.meta["budget"] = {"target_bits": allocation.target_bits, "max_size_mb": allocation.max_size_mb}
        else:
            plan = plan_from_scores(graph, scores, method, options, loaded.display_name,
                                    non_quantizable_params=result.non_quantizable_params, hot_rows=result.hot_rows)
        # Timings go to the report (the plan stays byte-identical for the same inputs).
        report_extras["analysis"] = {"method": method, "cost_fpe": result.cost_fpe, "seconds": result.seconds,
                                     "calibration": result.calibration, "notes": result.notes}
        return plan

    return from_sensitivity


def _rule_factory(analysis: AnalysisOptions | None) -> PlanFactory:
    """The k_quant_mixed rule (passes/rule.py): a fixed layer choice, so a budget cannot apply."""
    quantization = _quantization(analysis)
    budget = analysis.allocation if analysis is not None else None
    if budget is not None and (budget.target_bits is not None or budget.max_size_mb is not None):
        raise CptqError("--method rule is a fixed layer choice; it takes no --target-bits or --max-size-mb")

    def rule(loaded: LoadedModel, graph: LayerGraph) -> Plan:
        from .passes.rule import rule_plan

        plan = rule_plan(graph, quantization.block_size, loaded.display_name)
        plan.clip = quantization.clip
        plan = apply_zero_points(plan, quantization.zero_points)
        if analysis is not None and analysis.allocation.hot_rows:
            from .passes.hot_rows import calibration_hot_rows, with_hot_rows

            plan = with_hot_rows(plan, calibration_hot_rows(loaded, graph, analysis.calibration))
        return plan

    return rule


