"""What the exporter's lowering reads from calibration text, measured here so that the exporter runs no pass.

GPTQ needs each 4-bit layer's input Hessian and `--format dynamic`'s smoothing each layer's per-channel input
peak. The command builds a `CalibrationMeasurements` from its options and hands it to the exporter, which
calls it only when it needs either; the calibration batches are built once and serve both.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

from ..layer_graph import LayerGraph
from . import AnalysisOptions
from .calibration import CalibrationSet, build_calibration
from .hessian import collect_input_absmax, hessians_by_block


class CalibrationMeasurements:
    """Hessians and input peaks on the calibration text that `options` names (the offline corpus by default)."""

    def __init__(self, options: AnalysisOptions | None = None):
        self.options = options or AnalysisOptions()
        self._batches: CalibrationSet | None = None

    @property
    def calib(self) -> str | None:
        return self.options.calib

    @property
    def text_field(self) -> str:
        return self.options.text_field

    def _calibration(self, loaded) -> CalibrationSet:
        if self._batches is None:
            o = self.options
            self._batches = build_calibration(loaded, o.calib, o.text_field, o.calib_samples, o.seq_len, o.seed)
        return self._batches

    def hessians(self, loaded, graph: LayerGraph, names: list[str], progress: bool) -> Mapping[str, np.ndarray]:
        """Measured block by block as the lowering asks for them (hessian.BlockwiseHessians)."""
        return hessians_by_block(loaded, graph, self._calibration(loaded), names, progress=progress)

    def input_peaks(self, loaded, graph: LayerGraph, names: list[str], progress: bool) -> dict[str, np.ndarray]:
        return collect_input_absmax(loaded, graph, self._calibration(loaded), names, progress=progress)
