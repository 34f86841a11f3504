"""How a layer's weight becomes codes: round-to-nearest, or GPTQ with calibration Hessians.

Both return the same `QuantizedWeight` (codes, per-block scales, zero points), so the rewriting
pass writes either the same way. GPTQ only applies to layers that read activations (not embedding
tables) and only at 4 bits: at 8 bits round-to-nearest is already within the noise (MiniLM uniform
8-bit: cosine 0.9996), and the Hessians cost a forward pass.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

import numpy as np

from .gptq import gptq_quantize
from .quantize import QuantizedWeight, quantize_blocked

ALGORITHMS = ("rtn", "gptq")
GPTQ_BITS = (4,)


class RoundToNearest:
    name = "rtn"

    @property
    def used_calibration(self) -> bool:
        """Whether calibration text was read (the report records which)."""
        return False

    def __call__(self, layer: str, weight_kn: np.ndarray, bits: int, block_size: int, symmetric: bool,
                 clip: str, input_scale: np.ndarray | None = None) -> QuantizedWeight:
        """`input_scale` s: `weight_kn` is diag(s) W, to be fed X / s (dynamic-format smoothing)."""
        return quantize_blocked(weight_kn, bits, block_size, symmetric, clip)

    def algorithm_for(self, layer: str, bits: int) -> str:
        return "rtn"


class Gptq(RoundToNearest):
    """GPTQ (act-order, group-wise scales) where a Hessian is known; round-to-nearest elsewhere.

    `hessians(names)` is called once, lazily, with every layer that will need one, and may measure each
    Hessian only when it is read (passes/hessian.py's BlockwiseHessians); the codes are memoised because
    the pipeline may rewrite the graph twice (see the MatMulNBits repair).
    """

    name = "gptq"

    def __init__(self, hessians: Callable[[list[str]], Mapping[str, np.ndarray]], wanted: list[str]):
        self._collect = hessians
        self._wanted = wanted
        self._hessians: Mapping[str, np.ndarray] | None = None
        self._done: dict[tuple[object, ...], QuantizedWeight] = {}

    def hessian(self, layer: str) -> np.ndarray | None:
        if self._hessians is None:
            self._hessians = self._collect(self._wanted) if self._wanted else {}
        return self._hessians.get(layer)

    def algorithm_for(self, layer: str, bits: int) -> str:
        return "gptq" if bits in GPTQ_BITS and layer in self._wanted else "rtn"

    @property
    def used_calibration(self) -> bool:
        return bool(self._hessians)

    def __call__(self, layer: str, weight_kn: np.ndarray, bits: int, block_size: int, symmetric: bool,
                 clip: str, input_scale: np.ndarray | None = None) -> QuantizedWeight:
        scale_key = None if input_scale is None else input_scale.tobytes()
        key = (layer, bits, block_size, symmetric, clip, weight_kn.shape, scale_key)
        if key in self._done:  # the second rewrite: no Hessian is asked for again (they are measured on demand)
            return self._done[key]
        hessian = self.hessian(layer) if self.algorithm_for(layer, bits) == "gptq" else None
        if hessian is None or hessian.shape[0] != weight_kn.shape[0]:
            return super().__call__(layer, weight_kn, bits, block_size, symmetric, clip)
        if input_scale is not None:  # the layer will read X / s: its Hessian is diag(1/s) H diag(1/s)
            hessian = hessian / np.outer(input_scale, input_scale)
        self._done[key] = gptq_quantize(weight_kn, hessian, bits, block_size, symmetric, clip, act_order=True)
        return self._done[key]
