"""What the lowering reads from calibration text: GPTQ's weight quantizer (input Hessians) and the input
smoothing factors of `--format dynamic` (input peaks). The API measures them (passes/measurements.py) and
hands them over as `Measurements`, so that the exporter runs no pass itself.
"""

from __future__ import annotations

from pathlib import Path
from typing import Protocol

import numpy as np

from ..errors import CptqError
from ..layer_graph import ROLE_EMBEDDING, LayerGraph
from ..model_loading import LoadedModel
from ..plan import Plan
from ..quant.weight_quantizers import GPTQ_BITS, Gptq, HessianSource, RoundToNearest

# --format dynamic, --outlier-ratio R: an input channel whose calibration peak p is above R times the layer's
# median channel peak m is scaled down by sqrt(p / m) before the int8 product (its weight row up by as much).
# MiniLM's FFN inputs have 1-4 channels above 6x (peaks ~28 against a median of ~1.9). Swept on MiniLM's
# <= 16 MB plan, mean cosine on held-out docstrings / other-domain prose peaks at R = 3-3.5 (R = 6: 0.99455 /
# 0.99278; 3: 0.99528 / 0.99344; 2: 0.99488 / 0.99312; docs/benchmarks.md): below, the scaled-up weight rows
# coarsen their columns more than the activations gain. At 3, 31 layers scale (q/k/v share one Mul), within
# 1 % of R = 6's latency.
DEFAULT_OUTLIER_RATIO = 3.0


class Measurements(Protocol):
    """What the lowering reads from calibration text; the API builds it (passes/measurements.py), so the
    exporter runs no pass. `calib` / `text_field` name the text for the report."""

    @property
    def calib(self) -> str | None: ...

    @property
    def text_field(self) -> str: ...

    def hessians(self, loaded: LoadedModel, graph: LayerGraph, names: list[str],
                 progress: bool) -> HessianSource: ...

    def input_peaks(self, loaded: LoadedModel, graph: LayerGraph, names: list[str],
                    progress: bool) -> dict[str, np.ndarray]: ...


def _needs(calibration: Measurements | None, what: str) -> Measurements:
    if calibration is None:  # a library caller's mistake: the API always passes one
        raise CptqError(f"{what} needs calibration measurements (calibration=CalibrationMeasurements(...))")
    return calibration


def weight_quantizer(algorithm: str, loaded: LoadedModel, graph: LayerGraph, plan: Plan,
                     calibration: Measurements | None, progress: bool, spill: Path | None = None) -> RoundToNearest:
    """Round-to-nearest, or GPTQ for the planned 4-bit MatMul layers (Hessians measured when first asked; the
    codes memoised for the check's repair kept in `spill`, a scratch folder, where given)."""
    if algorithm == "rtn":
        return RoundToNearest()
    wanted = [name for name, lp in plan.layers.items()
              if lp.bits in GPTQ_BITS and graph[name].role != ROLE_EMBEDDING]
    # A 4-bit table that is also the LM head is quantized for the head: GPTQ with the head's input Hessian.
    # Most of a tied table's damage is in the logits (SmolLM2, table alone at 4 bits: KL 0.102 with round-to-
    # nearest, 0.036 with GPTQ; docs/benchmarks.md), and the rows it changes for the embedding cost less.
    heads = {layer.tied_to: layer.name for layer in graph.layers
             if layer.tied_to and layer.tied_to in plan.layers and plan.layers[layer.tied_to].bits in GPTQ_BITS
             and graph[layer.tied_to].role == ROLE_EMBEDDING}
    wanted += [head for head in heads.values() if head not in wanted]
    if not wanted:
        return Gptq(lambda names: {}, wanted)
    measured = _needs(calibration, "--algorithm gptq")
    return Gptq(lambda names: measured.hessians(loaded, graph, names, progress), wanted, spill, heads)


def input_smoothing(loaded: LoadedModel, graph: LayerGraph, plan: Plan, calibration: Measurements | None,
                    ratio: float, progress: bool) -> dict[str, np.ndarray]:
    """Per-input-channel factors s of each 4/8-bit MatMul layer: sqrt(peak / median peak) where the peak
    exceeds `ratio` x the median (SmoothQuant's alpha = 0.5, against the median channel), else 1."""
    names = [name for name, lp in plan.layers.items() if lp.bits < 16 and graph[name].role != ROLE_EMBEDDING]
    if not names:
        return {}
    peaks = _needs(calibration, "--format dynamic with --outlier-ratio").input_peaks(loaded, graph, names, progress)
    factors = {}
    for name, peak in peaks.items():
        median = np.median(peak)
        if median > 0 and (peak > ratio * median).any():
            factors[name] = np.where(peak > ratio * median, np.sqrt(peak / median), 1).astype(np.float32)
    return factors
