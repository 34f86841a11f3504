"""PMPQ: how much the task loss rises when one layer (or block) loses its smallest weights.

Unstructured magnitude pruning by an amount matched to the layer's 4-bit error: the smallest
weights whose squared sum equals |fake_quantize(W, 4) - W|^2 are zeroed, so sparsity sensitivity
and rounding sensitivity are on one scale (a fixed sparsity for every layer, the old form, removes
from a layer with large 4-bit error about as much as from one with little, and ranked like chance
on the small LM: --sparsity 0.3 keeps it as a variant; several sparsities are averaged). The
damage is measured with the model's own task loss (see task_loss.py), not the accuracy of a
randomly initialised head as in the reference code, through block replay (block_replay.py) on the
first SAMPLE_FRACTION of the calibration samples, so the pass costs about that fraction of the
oracle. Weights are restored bit for bit after each layer. A tied LM head shares its parameter
with the embedding: that parameter is pruned once, under the embedding's name, and the head follows it.
"""

from __future__ import annotations

import torch

from ..layer_graph import Layer, LayerGraph
from ..model_loading import LoadedModel
from .block_replay import BlockReplay
from .calibration import CalibrationSet, calibration_subset
from .common import allocation_units, progress_bar, quantized_weight, restored_afterwards, weight_param
from .task_loss import TaskLoss

MATCHED_BITS = 4  # prune as much as this width's rounding changes the weight
SAMPLE_FRACTION = 1 / 4  # of the calibration samples: the pass costs about this fraction of the oracle


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


def matched_sparsity(weight: torch.Tensor, error_norm_sq: float) -> float:
    """The fraction of smallest-magnitude entries whose removal changes `weight` by `error_norm_sq` (squared L2)."""
    squares = weight.detach().flatten().float().square().sort().values
    count = int(torch.searchsorted(squares.cumsum(0), torch.tensor(error_norm_sq, dtype=squares.dtype)))
    return min(count, weight.numel()) / weight.numel()


def _matched_sparsities(model: torch.nn.Module, layers: list[Layer], block_size: int, clip: str,
                        hot_rows: dict[str, list[int]]) -> dict[torch.nn.Parameter, float]:
    amounts: dict[torch.nn.Parameter, float] = {}
    for layer in layers:
        param = weight_param(model, layer)
        if param not in amounts:  # a shared parameter is pruned once, by its owner's error
            quantized = quantized_weight(model, layer, MATCHED_BITS, block_size, clip, hot_rows.get(layer.name))
            amounts[param] = matched_sparsity(param, float((quantized - param.detach()).float().square().sum()))
    return amounts


def pmpq_scores(loaded: LoadedModel, graph: LayerGraph, calib: CalibrationSet, sparsities: tuple[float, ...] = (),
                granularity: str = "layer", block_size: int = 32, clip: str = "absmax",
                hot_rows: dict[str, list[int]] | None = None, seed: int = 0, progress: bool = True,
                fraction: float = SAMPLE_FRACTION, lm_loss: str = "kl") -> dict[str, float]:
    """Task-loss increase per unit; `sparsities` empty: matched to the 4-bit error, else those fixed fractions."""
    model = loaded.model
    hot_rows = hot_rows or {}
    units = allocation_units(graph, granularity)
    subset = calibration_subset(calib, fraction)
    replay = BlockReplay(model, graph, TaskLoss(loaded, subset, seed, lm_objective=lm_loss), granularity)
    scores: dict[str, float] = {}
    with progress_bar(progress) as bar:
        task = bar.add_task("PMPQ layers", total=len(units) * max(1, len(sparsities)))
        for unit, layers in units.items():
            if sparsities:
                params = list({weight_param(model, layer): None for layer in layers})  # dedup shared parameters
                settings = [dict.fromkeys(params, s) for s in sparsities]
            else:
                settings = [_matched_sparsities(model, layers, block_size, clip, hot_rows)]
            increases = []
            for amounts in settings:
                with restored_afterwards(list(amounts)):
                    for param, sparsity in amounts.items():
                        prune_smallest_(param.data, sparsity)
                    increases.append(replay.evaluate_unit(unit) - replay.base_loss)
                bar.advance(task)
            scores[unit] = sum(increases) / len(increases)
    return scores
