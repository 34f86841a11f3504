"""PMPQ: how much the task loss rises when one layer (or block) loses its smallest weights.

Unstructured magnitude pruning at sparsity s (several sparsities are averaged); the damage is
measured with the model's own task loss (see task_loss.py), not the accuracy of a randomly
initialised head as in the reference code. Weights are restored bit for bit after each layer.
A tied LM head shares its parameter with the embedding: that parameter is pruned once, under
the embedding's name, and the head follows it.
"""

from __future__ import annotations

import torch

from ..layer_graph import LayerGraph
from .calibration import CalibrationSet
from .block_replay import BlockReplay
from .common import allocation_units, progress_bar, replaced_weights, weight_param
from .task_loss import TaskLoss


def magnitude_pruned(weight: torch.Tensor, sparsity: float) -> torch.Tensor:
    """A copy of `weight` with its `sparsity` fraction of smallest-magnitude entries set to zero."""
    count = int(round(sparsity * weight.numel()))
    pruned = weight.detach().clone()
    if count:
        # kthvalue selects in linear time (topk took 2 s on OPT's 38M-entry embedding); ties at the
        # threshold are pruned in index order so that exactly `count` entries become zero.
        flat = pruned.view(-1)
        magnitude = flat.abs()
        threshold = magnitude.kthvalue(count).values
        below = magnitude < threshold
        at_threshold = (magnitude == threshold).nonzero().flatten()[: count - int(below.sum())]
        flat[below] = 0
        flat[at_threshold] = 0
    return pruned


def pmpq_scores(model: torch.nn.Module, graph: LayerGraph, calib: CalibrationSet, loss: TaskLoss,
                sparsities: tuple[float, ...] = (0.3,), granularity: str = "layer",
                replay: BlockReplay | None = None, progress: bool = True) -> dict[str, float]:
    units = allocation_units(graph, granularity)
    replay = replay or BlockReplay(model, graph, loss, granularity)
    scores: dict[str, float] = {}
    with progress_bar(progress) as bar:
        task = bar.add_task("PMPQ layers", total=len(units) * len(sparsities))
        for unit, layers in units.items():
            increases = []
            for sparsity in sparsities:
                params = {weight_param(model, layer): None for layer in layers}  # dedup shared parameters
                pruned = {param: magnitude_pruned(param, sparsity) for param in params}
                with replaced_weights(model, pruned):
                    increases.append(replay.evaluate_unit(unit) - replay.base_loss)
                bar.advance(task)
            scores[unit] = sum(increases) / len(increases)
    return scores
