"""CMPQ: how similar the FP32 output stays to the output with one layer at 4 bits (CKA / CCA).

A layer inside a transformer block is scored by how much quantizing it, alone, changes what the
next block computes. A forward hook on each block re-runs the block on the very input it just received,
once per layer inside it, with that layer's weight replaced by the exporter's own 4-bit
quantization (common.quantized_weight, hot rows included); the next block then re-runs on each of
those outputs with its own arguments, and the joint second moments of its FP32 output y and its
change e are accumulated over real tokens (the last block's layers: at its own output). score =
1 - similarity(y, y + e): `cka` (default) linear CKA, the canonical-correlation family's similarity
index that weighs each direction by its variance; `cca` the mean canonical correlation within y's top
principal components; `svcca` over the components holding 99 % of the variance; `pwcca` each
correlation weighted by how much of y projects on its variate. Before any of them every token is put at
unit root mean square and every feature at unit second moment (similarity.PairAccumulator): the
residual stream of a pre-norm decoder carries a few massive tokens and features that otherwise fill
the moments. One block later, not at the block's own output: an error that the next block amplifies
(or damps) counts as such. Both measured in docs/ARCHITECTURE.md (SmolLM2 at block granularity:
Spearman 0.43 -> 0.87; MiniLM 0.85 -> 0.86). Measuring at a block's output, not the layer's, carries the
error through attention and the MLP into the residual stream, where a query's error is damped by
the softmax and a value's or an FFN input's is not. The paper's form (CCA between a layer's own
input and output) measures how linear the map is, not damage, and ranked like chance (Spearman
0.01 on MiniLM, -0.35 on the small LM): it is gone.

Embedding tables are compared at the first block's output (their change enters at its input);
other layers outside blocks (LM head, pooler, classifier) at their own output; a tied LM head's
score adds to its embedding's. At block granularity a block is re-run once with all its layers
quantized.

The pass reads the first SAMPLE_FRACTION (1/16) of the (seed-shuffled) calibration samples, at least
MIN_SAMPLES, so one forward pass plus two block re-runs per layer costs about (1 + 2 x layers per
block) / 16 forward passes of the full set. What it does not see: how a change grows or fades past the next
block, and whether rounding raises or lowers the loss (docs/ARCHITECTURE.md, figures).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch.utils.hooks import RemovableHandle

from ..layer_graph import ROLE_CONV1D, ROLE_EMBEDDING, Layer, LayerGraph, block_container
from .calibration import CalibrationSet, calibration_subset
from .common import (
    allocation_units,
    forward_options,
    progress_bar,
    quantized_weight,
    replaced_weights,
    transformer_blocks,
    unit_of,
    weight_param,
)
from .similarity import PairAccumulator

BITS = 4  # the width the allocator weighs every other width against (damage(b) = score·4^(4−b))
# Of the calibration samples, at least MIN_SAMPLES: two block re-runs per layer make each sample ~15 forwards.
# Half a batch ranks as well as a whole one (Spearman vs the oracle, 8 / 4 / 2 samples: MiniLM 0.86 / 0.90 / 0.90,
# small LM 0.95 / 0.94 / 0.92, SmolLM2 at block granularity 0.87 / 0.89 / 0.86) at half the cost.
SAMPLE_FRACTION = 1 / 16
MIN_SAMPLES = 4


def _first_tensor(value: object) -> torch.Tensor:
    """A block's hidden-state output: the tensor itself, or the first item of its tuple."""
    if isinstance(value, torch.Tensor):
        return value
    if isinstance(value, (tuple, list)) and value and isinstance(value[0], torch.Tensor):
        return value[0]
    raise TypeError(f"a block returned {type(value).__name__}, not its hidden states")


class _Batch:
    """The attention mask of the batch in flight: which rows of an activation are real tokens."""

    mask: torch.Tensor
    stop_after_front = False

    def rows(self, tensor: torch.Tensor) -> torch.Tensor:
        flat = tensor.reshape(-1, tensor.shape[-1])
        if flat.shape[0] == self.mask.numel():
            return flat[self.mask.reshape(-1).bool()]
        if tensor.dim() >= 2 and tensor.shape[-2] == self.mask.shape[1] and flat.shape[0] < self.mask.numel():
            # broadcast over the batch (BERT's position embeddings): one copy per sample
            return self.rows(tensor.expand(*self.mask.shape, tensor.shape[-1]))
        return flat  # one row per sample (pooler, classifier head): all real


def _quantized(model: torch.nn.Module, layers: list[Layer], block_size: int, clip: str,
               hot_rows: dict[str, list[int]]) -> dict[torch.nn.Parameter, torch.Tensor]:
    new: dict[torch.nn.Parameter, torch.Tensor] = {}
    for layer in layers:
        param = weight_param(model, layer)
        if param not in new:
            new[param] = quantized_weight(model, layer, BITS, block_size, clip, hot_rows.get(layer.name))
    return new


def _layer_change(layer: Layer, module: torch.nn.Module, x: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
    """What the weight change `delta` adds to the layer's output on input x."""
    if layer.role == ROLE_EMBEDDING:
        return F.embedding(x, delta)
    if layer.role == ROLE_CONV1D:
        return x @ delta
    return F.linear(x, delta)


class _Stop(Exception):
    """Raised once the first block's input is known: the rest of the forward pass is not needed."""


def _hidden_states(args: tuple[object, ...], kwargs: dict[str, object]) -> torch.Tensor:
    hidden = args[0] if args else kwargs["hidden_states"]
    if not isinstance(hidden, torch.Tensor):
        raise TypeError(f"a block's hidden states are a {type(hidden).__name__}, not a tensor")
    return hidden


def _run_on(block: torch.nn.Module, args: tuple[object, ...], kwargs: dict[str, object],
            hidden: torch.Tensor) -> torch.Tensor:
    """The block's hidden-state output for other hidden states in place of its input's (hooks not run)."""
    if args:
        return _first_tensor(block.forward(hidden, *args[1:], **kwargs))
    return _first_tensor(block.forward(*args, **{**kwargs, "hidden_states": hidden}))


class _Sketch(NamedTuple):
    """A wide linear layer's weight, bias and 4-bit change, each times the projection P: [in, PROJECTION_DIM]."""

    weight: torch.Tensor
    bias: torch.Tensor | None
    delta: torch.Tensor


def cmpq_scores(model: torch.nn.Module, graph: LayerGraph, calib: CalibrationSet, granularity: str = "layer",
                variant: str = "cka", seed: int = 0, progress: bool = True, block_size: int = 32,
                clip: str = "absmax", hot_rows: dict[str, list[int]] | None = None,
                fraction: float = SAMPLE_FRACTION) -> dict[str, float]:
    """Scores per allocation unit (higher = more sensitive)."""
    pairs = collect_pairs(model, graph, calib, granularity, seed, progress, block_size, clip, hot_rows, fraction)
    return score_pairs(pairs, variant)


@dataclass
class Pairs:
    """What the CMPQ forward collects: per unit (or outside layer) the moments of (FP32 output, its change)."""

    graph: LayerGraph
    granularity: str
    units: dict[str, list[Layer]]
    measured_units: list[str]  # scored from their own accumulator
    outside: list[Layer]  # layers compared at their own output; their score adds to their unit's
    accumulators: dict[str, PairAccumulator]


def collect_pairs(model: torch.nn.Module, graph: LayerGraph, calib: CalibrationSet, granularity: str = "layer",
                  seed: int = 0, progress: bool = True, block_size: int = 32, clip: str = "absmax",
                  hot_rows: dict[str, list[int]] | None = None, fraction: float = SAMPLE_FRACTION) -> Pairs:
    """One forward pass over a calibration subset; each block re-run once per unit inside it."""
    hot_rows = hot_rows or {}
    units = allocation_units(graph, granularity)
    blocks = transformer_blocks(model, block_container(model) if graph.num_blocks else None)
    in_block: dict[int, list[str]] = {}
    front: list[str] = []  # embedding units: measured at the first block's input, where they are combined
    outside: list[Layer] = []  # the rest, and tied heads: measured at their own output
    for unit, layers in units.items():
        if layers[0].block is not None and blocks:
            in_block.setdefault(layers[0].block, []).append(unit)
        elif layers[0].role == ROLE_EMBEDDING and blocks:
            front.append(unit)
    for layer in graph.layers:
        if (layer.block is None or not blocks) and unit_of(graph, layer, granularity) not in front:
            outside.append(layer)
        elif layer.tied_to and layer.block is None:
            outside.append(layer)  # a tied LM head: its own damage at the logits, added to its embedding's
    accumulators: dict[str, PairAccumulator] = {}  # per unit, or per outside layer
    batch = _Batch()
    handles: list[RemovableHandle] = []

    def accumulator(key: str) -> PairAccumulator:
        return accumulators.setdefault(key, PairAccumulator(seed + len(accumulators)))

    # A block's units are compared one block later: block i's re-run outputs wait here until block i + 1 runs,
    # which then re-runs on each of them with its own arguments. The last block's units are compared at its output.
    pending: dict[int, list[tuple[str, torch.Tensor]]] = {}

    def watch_block(index: int, block_units: list[str]) -> None:
        carried: list[tuple[str, torch.Tensor]] = []  # the earlier block's units, through this block

        def before(block: torch.nn.Module, args: tuple[object, ...], kwargs: dict[str, object]) -> None:
            carried.clear()
            for unit, changed_input in pending.pop(index, []):
                carried.append((unit, _run_on(block, args, kwargs, changed_input)))

        def after(block: torch.nn.Module, args: tuple[object, ...], kwargs: dict[str, object], output: object) -> None:
            reference = batch.rows(_first_tensor(output))
            for unit, changed in carried:
                accumulator(unit).add(reference, batch.rows(changed) - reference)
            carried.clear()
            for unit in block_units:
                with replaced_weights(model, _quantized(model, units[unit], block_size, clip, hot_rows)):
                    changed = _first_tensor(block.forward(*args, **kwargs))
                if index + 1 < len(blocks):
                    pending.setdefault(index + 1, []).append((unit, changed))
                else:
                    accumulator(unit).add(reference, batch.rows(changed) - reference)

        handles.append(blocks[index].register_forward_pre_hook(before, with_kwargs=True))
        handles.append(blocks[index].register_forward_hook(after, with_kwargs=True))

    sketches: dict[str, _Sketch] = {}  # wide linear layer -> (W'P, b'P, delta'P), computed once

    def watch_layer(layer: Layer) -> None:
        module = model.get_submodule(layer.name)
        owner = graph[layer.tied_to] if layer.tied_to else layer

        def hook(_module: torch.nn.Module, args: tuple[torch.Tensor, ...], output: torch.Tensor) -> None:
            acc = accumulator(layer.name)
            param = weight_param(model, owner)
            projection = acc.projection_for(output.shape[-1]) if layer.role != ROLE_EMBEDDING else None
            if projection is None:
                delta = _quantized(model, [owner], block_size, clip, hot_rows)[param] - param.detach()
                acc.add(batch.rows(output), batch.rows(_layer_change(layer, module, args[0], delta)))
                return
            # A wide output (an LM head's logits): sketch through the weight, y P = x (W'P) + b P, never
            # materialising the [tokens, vocabulary] output and its change.
            if layer.name not in sketches:
                delta = _quantized(model, [owner], block_size, clip, hot_rows)[param] - param.detach()
                as_in_out = (param.detach() if layer.role == ROLE_CONV1D else param.detach().T)  # [in, out]
                delta_in_out = delta if layer.role == ROLE_CONV1D else delta.T
                bias = getattr(module, "bias", None)
                sketches[layer.name] = _Sketch(as_in_out @ projection,
                                               None if bias is None else bias.detach() @ projection,
                                               delta_in_out @ projection)
            weight_p, bias_p, delta_p = sketches[layer.name]
            x = batch.rows(args[0])
            y = x @ weight_p + (bias_p if bias_p is not None else 0)
            acc.add(y, x @ delta_p, sketched=True)
        handles.append(module.register_forward_hook(hook))

    first_input: list[torch.Tensor] = []
    first_call: list[tuple[tuple[object, ...], dict[str, object]]] = []  # the first block's arguments, this batch

    def record_first_input(_block: torch.nn.Module, args: tuple[object, ...], kwargs: dict[str, object]) -> None:
        first_input.append(_hidden_states(args, kwargs))
        if batch.stop_after_front:
            raise _Stop
        first_call.append((args, kwargs))

    for index in range(len(blocks)):
        watch_block(index, in_block.get(index, []))
    for layer in outside:
        watch_layer(layer)
    if front:
        handles.append(blocks[0].register_forward_pre_hook(record_first_input, with_kwargs=True))
    subset = calibration_subset(calib, fraction, MIN_SAMPLES)
    extra = forward_options(model)
    try:
        with torch.no_grad(), progress_bar(progress) as bar:
            task = bar.add_task("CMPQ forward", total=len(subset.batches))
            for inputs in subset.batches:
                batch.mask, batch.stop_after_front = inputs["attention_mask"], False
                first_input.clear()
                first_call.clear()
                model(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"], **extra)
                if front:  # each embedding, quantized alone, up to the first block's input, then through it
                    args, kwargs = first_call[0]
                    reference = batch.rows(_first_tensor(blocks[0].forward(*args, **kwargs)))
                    batch.stop_after_front = True
                for unit in front:
                    first_input.clear()
                    with replaced_weights(model, _quantized(model, units[unit], block_size, clip, hot_rows)):
                        with contextlib.suppress(_Stop):
                            model(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"], **extra)
                    changed = _run_on(blocks[0], args, kwargs, first_input[0])
                    accumulator(unit).add(reference, batch.rows(changed) - reference)
                bar.advance(task)
    finally:
        for handle in handles:
            handle.remove()
    measured = [*front, *(u for block_units in in_block.values() for u in block_units)]
    return Pairs(graph, granularity, units, measured, outside, accumulators)


def score_pairs(pairs: Pairs, variant: str = "cka") -> dict[str, float]:
    scores = dict.fromkeys(pairs.units, 0.0)
    for unit in pairs.measured_units:
        if unit in pairs.accumulators:
            scores[unit] = pairs.accumulators[unit].score(variant)
    for layer in pairs.outside:
        # A tied head's damage at the logits adds to its embedding's (first-order independence, as the allocator).
        if layer.name in pairs.accumulators:
            scores[unit_of(pairs.graph, layer, pairs.granularity)] += pairs.accumulators[layer.name].score(variant)
    return scores
