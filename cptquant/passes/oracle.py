"""The oracle: quantize one layer (or block) to 4 bits for real and measure the task-loss increase.

It uses the exporter's own quantizer (fake_quantize) in the torch model and restores the weights
after each layer. A method's quality is the Spearman rank correlation of its scores with these.
"""

from __future__ import annotations

import math

import torch
from scipy.stats import spearmanr

from ..layer_graph import LayerGraph
from .block_replay import BlockReplay
from .calibration import CalibrationSet
from .common import allocation_units, progress_bar, quantized_weight, replaced_weights, weight_param
from .task_loss import TaskLoss

ORACLE_BITS = 4


def oracle_scores(model: torch.nn.Module, graph: LayerGraph, calib: CalibrationSet, loss: TaskLoss,
                  granularity: str = "layer", block_size: int = 32, clip: str = "absmax",
                  replay: BlockReplay | None = None, progress: bool = True,
                  hot_rows: dict[str, list[int]] | None = None) -> dict[str, float]:
    units = allocation_units(graph, granularity)
    hot_rows = hot_rows or {}
    replay = replay or BlockReplay(model, graph, loss, granularity)
    scores: dict[str, float] = {}
    with progress_bar(progress) as bar:
        task = bar.add_task("Oracle layers", total=len(units))
        for unit, layers in units.items():
            quantized: dict[torch.nn.Parameter, torch.Tensor] = {}
            for layer in layers:
                param = weight_param(model, layer)
                quantized.setdefault(param, quantized_weight(model, layer, ORACLE_BITS, block_size, clip,
                                                                hot_rows.get(layer.name)))
            with replaced_weights(model, quantized):
                scores[unit] = replay.evaluate_unit(unit) - replay.base_loss
            bar.advance(task)
    return scores


def spearman(scores: dict[str, float], reference: dict[str, float]) -> float:
    """Rank correlation over the units both score; NaN when either side is constant."""
    common = sorted(set(scores) & set(reference))
    if len(common) < 3:
        return math.nan
    rho = spearmanr([scores[k] for k in common], [reference[k] for k in common]).statistic
    return float(rho)
