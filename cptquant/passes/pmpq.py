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
from .common import allocation_units, progress_bar, restored_afterwards, weight_param
from .task_loss import TaskLoss


@torch.no_grad()
def prune_smallest_(weight: torch.Tensor, sparsity: float) -> None:
    """Zero the `sparsity` fraction of smallest-magnitude entries of `weight`, in place.

    In place, with the magnitudes freed before the mask is built, so that pruning a large embedding
    table needs about one more copy of it at a time (besides the caller's saved original).
    """
    count = int(round(sparsity * weight.numel()))
    if not count:
        return
    flat = weight.view(-1)
    # The count-th smallest magnitude by an in-place partial sort of one copy (linear time; topk took
    # 2 s on OPT's 38M-entry embedding, kthvalue two more copies and an int64 index of it).
    magnitude = flat.abs()
    magnitude.numpy().partition(count - 1)
    threshold = float(magnitude[count - 1])
    del magnitude
    below = flat.abs() < threshold
    # Ties at the threshold are pruned in index order, so that exactly `count` entries become zero.
    at_threshold = (flat.abs() == threshold).nonzero().flatten()[: count - int(below.sum())]
    flat.masked_fill_(below, 0)
    flat[at_threshold] = 0


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
                params = list({weight_param(model, layer): None for layer in layers})  # dedup shared parameters
                with restored_afterwards(params):
                    for param in params:
                        prune_smallest_(param.data, sparsity)
                    increases.append(replay.evaluate_unit(unit) - replay.base_loss)
                bar.advance(task)
            scores[unit] = sum(increases) / len(increases)
    return scores
