"""`--override PATTERN=BITS`: pin the bits of the layers whose name a regular expression matches.

Like llama.cpp's `--tensor-type`, a pattern is searched in each layer name (`lm_head=8`, `.*down_proj=8`,
`layers\\.0\\.=16`); when several match a layer, the last one given wins. Pins apply after the method's
allocation; with a budget (--target-bits / --max-size-mb) the pinned layers' cost is taken out of the
budget first and the method allocates the rest, so the plan still meets it. A layer sharing its weight
with another (a tied LM head) is one tensor: pinning either pins both.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass, replace

from .errors import CptqError
from .layer_graph import Layer, LayerGraph
from .options import SUPPORTED_BITS, AnalysisOptions, fitting_block_size
from .plan import LayerPlan, Plan, symmetric_for


@dataclass(frozen=True)
class Override:
    text: str  # as the user wrote it
    pattern: re.Pattern[str]
    bits: int


Overrides = tuple[Override, ...]


def parse_overrides(texts: Sequence[str] | None) -> Overrides:
    """Check every `PATTERN=BITS` before any model loads; one line naming the bad one otherwise."""
    parsed = []
    for text in texts or ():
        pattern, sep, bits_text = str(text).rpartition("=")
        if not sep or not pattern:
            raise CptqError(f"--override {text!r} is not PATTERN=BITS (e.g. 'lm_head=8' or '.*down_proj=8')")
        try:
            bits = int(bits_text)
        except ValueError:
            bits = None
        if bits not in SUPPORTED_BITS:
            raise CptqError(f"--override {text!r}: bits {bits_text!r} not supported (use 16, 8 or 4)")
        try:
            compiled = re.compile(pattern)
        except re.error as exc:
            raise CptqError(f"--override {text!r}: not a regular expression ({exc})") from None
        parsed.append(Override(str(text), compiled, bits))
    return tuple(parsed)


def pinned_bits(overrides: Overrides, graph: LayerGraph) -> dict[str, int]:
    """Layer name -> pinned bits, tie partners included; a pattern matching no layer is refused."""
    owner = {layer.name: layer.tied_to or layer.name for layer in graph.layers}
    group_bits: dict[str, int] = {}
    for override in overrides:
        matched = [name for name in owner if override.pattern.search(name)]
        if not matched:
            sample = ", ".join(graph.names()[:4])
            raise CptqError(f"--override {override.text!r} matches no layer of the model (layers look like: {sample}, …)")
        for name in matched:
            group_bits[owner[name]] = override.bits
    return {name: group_bits[group] for name, group in owner.items() if group in group_bits}


def apply_overrides(plan: Plan, pinned: dict[str, int], block_size: int, zero_points: str,
                    graph: LayerGraph) -> Plan:
    """The plan with the pinned layers at their bits (added when the plan left them out), each block fitted to
    the layer (a 16-bit entry of a plan file may carry the default block its input does not divide)."""
    for name, bits in pinned.items():
        old = plan.layers.get(name)
        fitted = fitting_block_size(graph[name].in_features, old.block_size if old else block_size)
        plan.layers[name] = LayerPlan(bits=bits, block_size=fitted,
                                      symmetric=symmetric_for(bits, zero_points), score=old.score if old else None,
                                      hot_rows=old.hot_rows if old and bits == 4 else None)
    if pinned:
        plan.meta = {**plan.meta, "overrides": dict(sorted(pinned.items()))}
    return plan


def _stored(graph: LayerGraph) -> list[Layer]:
    """The layers whose parameters the file holds: a tied LM head reads its embedding's (counted once, as the
    allocator counts them)."""
    return [layer for layer in graph.layers if not layer.tied_to]


def average_bits(plan: Plan, graph: LayerGraph) -> float:
    stored = _stored(graph)
    total = sum(layer.num_params for layer in stored)
    return sum(layer.num_params * plan.layers[layer.name].bits for layer in stored) / total if total else 0.0


def budget_without_pinned(graph: LayerGraph, pinned: dict[str, int], options: AnalysisOptions,
                          hot_rows: dict[str, list[int]]) -> tuple[LayerGraph, AnalysisOptions]:
    """The layer graph of the unpinned layers and the budget left to them: what the allocator then shares out.

    --target-bits T over W weights: the rest get (T·W − Σ pinned weights·bits) / (W − pinned weights).
    --max-size-mb M: the rest get M minus the pinned layers' bytes as the exporter writes them.
    """
    from .passes.allocate import MB, unit_bytes
    from .passes.common import stored_weight_shape

    budget, quantization = options.allocation, options.quantization
    rest = [layer for layer in graph.layers if layer.name not in pinned]
    sub_graph = replace(graph, layers=rest, unquantizable=dict(graph.unquantizable))
    widths = sorted(set(budget.bit_widths))
    if budget.target_bits is not None:
        stored = _stored(graph)
        total = sum(layer.num_params for layer in stored)
        rest_params = sum(layer.num_params for layer in stored if layer.name not in pinned)
        pinned_cost = sum(layer.num_params * pinned[layer.name] for layer in stored if layer.name in pinned)
        if not rest_params:
            if pinned_cost > budget.target_bits * total:
                raise CptqError(f"--target-bits {budget.target_bits} cannot be met: the --override pins every layer, "
                                f"at {pinned_cost / total:.3f} bits per weight")
            return sub_graph, options
        left = (budget.target_bits * total - pinned_cost) / rest_params
        if left < widths[0]:
            raise CptqError(f"--target-bits {budget.target_bits} cannot be met: the --override pins leave "
                            f"{left:.3f} bits per weight to the other layers, below {widths[0]}")
        return sub_graph, options.replaced(target_bits=min(left, widths[-1]))
    if budget.max_size_mb is None:
        raise ValueError("budget_without_pinned needs a budget: --target-bits or --max-size-mb")
    pinned_bytes = 0
    for layer in graph.layers:
        if layer.name in pinned:  # priced as plan_from_scores prices it (a tied head: reading its table)
            shape = stored_weight_shape(graph, layer, hot_rows)
            pinned_bytes += unit_bytes([shape], pinned[layer.name], quantization.block_size, quantization.zero_points,
                                       options.weight_format)
    left_mb = budget.max_size_mb - pinned_bytes / MB
    if left_mb <= 0:
        raise CptqError(f"--max-size-mb {budget.max_size_mb} cannot be met: the --override pins alone take "
                        f"{pinned_bytes / MB:.3f} MB")
    return sub_graph, options.replaced(max_size_mb=left_mb)
