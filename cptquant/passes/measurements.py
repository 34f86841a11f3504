"""What the exporter's lowering reads from calibration text, measured here so that the exporter runs no pass.

GPTQ needs each 4-bit layer's input Hessian and `--format dynamic`'s smoothing each layer's per-channel input
peak. The command builds a `CalibrationMeasurements` from its options and hands it to the exporter, which
calls it only when it needs either; the calibration batches are built once and serve both.
"""

from __future__ import annotations

import numpy as np
import numpy.typing as npt

from ..layer_graph import LayerGraph
from ..model_loading import LoadedModel
from ..options import CalibrationOptions
from .calibration import CalibrationSet, calibration_for
from .hessian import BlockwiseHessians, Hessian, collect_input_absmax, hessians_by_block


class CalibrationMeasurements:
    """Hessians and input peaks on the calibration text that `options` names (the offline corpus by default)."""

    def __init__(self, options: CalibrationOptions | None = None) -> None:
        self.options = options or CalibrationOptions()
        self._batches: CalibrationSet | None = None

    @property
    def calib(self) -> str | None:
        return self.options.calib

    @property
    def text_field(self) -> str:
        return self.options.text_field

    def _calibration(self, loaded: LoadedModel) -> CalibrationSet:
        if self._batches is None:
            self._batches = calibration_for(loaded, self.options)
        return self._batches

    def hessians(self, loaded: LoadedModel, graph: LayerGraph, names: list[str],
                 progress: bool) -> dict[str, Hessian] | BlockwiseHessians:
        """Measured block by block as the lowering asks for them (hessian.BlockwiseHessians)."""
        return hessians_by_block(loaded, graph, self._calibration(loaded), names, progress=progress)

    def input_peaks(self, loaded: LoadedModel, graph: LayerGraph, names: list[str],
                    progress: bool) -> dict[str, npt.NDArray[np.float32]]:
        return collect_input_absmax(loaded, graph, self._calibration(loaded), names, progress=progress)
