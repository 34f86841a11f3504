"""How a layer's weight becomes codes: round-to-nearest, or GPTQ with calibration Hessians.

Both return the same `QuantizedWeight` (codes, per-block scales, zero points), so the rewriting
pass writes either the same way. GPTQ only applies to layers that read activations (an embedding
table only where it is also the LM head, then with the head's input Hessian) and only at 4 bits: at 8
bits round-to-nearest is already within the noise (MiniLM uniform 8-bit: cosine 0.9996), and the
Hessians cost a forward pass.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Protocol

import numpy as np

from .gptq import gptq_quantize
from .quantize import QuantizedWeight, quantize_blocked

ALGORITHMS = ("rtn", "gptq")
GPTQ_BITS = (4,)


class HessianSource(Protocol):
    """Hessians by layer name, each handed over once (a dict; passes/hessian.py's BlockwiseHessians, which
    measures a block's on demand): GPTQ factorises what it is given in place."""

    def pop(self, name: str, default: None, /) -> np.ndarray | None: ...

    def __len__(self) -> int: ...


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

    def wrote(self, layer: str, weight: QuantizedWeight, input_scale: np.ndarray | None = None) -> None:
        """`layer` was quantized outside this quantizer (the dynamic format's ±63 grid): what it now computes with."""

    def release_measurements(self) -> None:
        """Let go of what the codes were computed from (GPTQ's Hessians) once every file is lowered."""


class Gptq(RoundToNearest):
    """GPTQ (act-order, group-wise scales) where a Hessian is known; round-to-nearest elsewhere.

    `hessians(names)` is called once, lazily, with every layer that will need one, and may measure each
    Hessian only when it is read (passes/hessian.py's BlockwiseHessians); the codes are memoised because
    the pipeline may rewrite the graph twice (see the MatMulNBits repair); with `spill`, a folder, the memo's
    codes are kept there, not in memory. A Hessian is read once: it leaves the source and GPTQ factorises it
    in place.
    """

    name = "gptq"

    def __init__(self, hessians: Callable[[list[str]], HessianSource], wanted: list[str],
                 spill: Path | None = None, hessian_of: dict[str, str] | None = None):
        self._collect = hessians
        self._wanted = wanted
        self._hessian_of = hessian_of or {}  # a tied table -> the LM head whose input Hessian it is quantized with
        self._hessians: HessianSource | None = None
        self._used = False
        self._done: dict[tuple[object, ...], _PackedCodes] = {}
        self._spill = spill

    def release_measurements(self) -> None:
        """Drop the Hessians (BlockwiseHessians also holds a block's outputs); a Hessian asked for again (no
        memoised codes) would be measured again."""
        self._hessians = None

    def take_hessian(self, layer: str) -> np.ndarray | None:
        """The layer's Hessian, now the caller's own (free to overwrite; gone once the caller drops it)."""
        if self._hessians is None:
            self._hessians = self._collect(self._wanted) if self._wanted else {}
            self._used = len(self._hessians) > 0
        return self._hessians.pop(self._hessian_of.get(layer, layer), None)

    def wrote(self, layer: str, weight: QuantizedWeight, input_scale: np.ndarray | None = None) -> None:
        """Tell a Hessian source that measures sequentially (BlockwiseHessians.write) what `layer` now computes
        with; a smoothed weight (input_scale) is not the torch layer's, so it is not told."""
        write = getattr(self._hessians, "write", None)
        if callable(write) and input_scale is None:
            write(layer, weight.dequantize)

    def algorithm_for(self, layer: str, bits: int) -> str:
        wanted = layer in self._wanted or self._hessian_of.get(layer) in self._wanted
        return "gptq" if bits in GPTQ_BITS and wanted else "rtn"

    @property
    def used_calibration(self) -> bool:
        return self._used

    def __call__(self, layer: str, weight_kn: np.ndarray, bits: int, block_size: int, symmetric: bool,
                 clip: str, input_scale: np.ndarray | None = None) -> QuantizedWeight:
        scale_key = None if input_scale is None else input_scale.tobytes()
        key = (layer, bits, block_size, symmetric, clip, weight_kn.shape, scale_key)
        if key in self._done:  # the second rewrite: no Hessian is asked for again (they are measured on demand)
            return self._done[key].unpack()
        hessian = self.take_hessian(layer) if self.algorithm_for(layer, bits) == "gptq" else None
        if hessian is None or hessian.shape[0] != weight_kn.shape[0]:
            result = super().__call__(layer, weight_kn, bits, block_size, symmetric, clip)
            self.wrote(layer, result, input_scale)
            return result
        if input_scale is not None:  # the layer will read X / s: its Hessian is diag(1/s) H diag(1/s)
            hessian /= np.outer(input_scale, input_scale)
        quantized = gptq_quantize(weight_kn, hessian, bits, block_size, symmetric, clip, act_order=True,
                                  overwrite_hessian=True)
        del hessian
        self.wrote(layer, quantized, input_scale)
        packed = _PackedCodes.pack(quantized)
        if self._spill is not None:
            self._spill.mkdir(parents=True, exist_ok=True)
            packed = packed.spill(self._spill / f"{len(self._done)}.npy")
        self._done[key] = packed
        return quantized


@dataclass
class _PackedCodes:
    """A 4-bit QuantizedWeight kept for the second rewrite with two codes per byte (its int8 codes would take
    a quarter of the model's FP32 bytes for the whole export)."""

    packed: np.ndarray  # uint8 [K / 2, N]: row 2i in the low nibble, row 2i + 1 in the high one (or, spilled, empty)
    like: QuantizedWeight  # scales, zero points and sizes; its codes array is empty
    file: Path | None = None  # where `packed` was written when spilled (read back by unpack)

    @staticmethod
    def pack(weight: QuantizedWeight) -> _PackedCodes:
        if weight.bits > 4 or weight.q.shape[0] % 2:
            raise ValueError(f"only 4-bit codes with an even K are packed, not {weight.bits} bits / K {weight.q.shape[0]}")
        nibbles = weight.q.view(np.uint8) & 0x0F  # int8 two's complement: the low nibble is the 4-bit code
        packed = nibbles[0::2] | (nibbles[1::2] << 4)
        return _PackedCodes(packed, replace(weight, q=np.empty((0,) + weight.q.shape[1:], weight.q.dtype)))

    def spill(self, file: Path) -> _PackedCodes:
        """The same codes, written to `file` (.npy) instead of held."""
        np.save(file, self.packed, allow_pickle=False)
        return _PackedCodes(np.empty((0,) + self.packed.shape[1:], np.uint8), self.like, file)

    def unpack(self) -> QuantizedWeight:
        packed = np.load(self.file, allow_pickle=False) if self.file is not None else self.packed
        rows = np.empty((2 * packed.shape[0], packed.shape[1]), np.uint8)
        rows[0::2], rows[1::2] = packed & 0x0F, packed >> 4
        if self.like.q.dtype == np.int8:  # symmetric: codes in [-8, 7], sign-extended from the nibble
            return replace(self.like, q=((rows ^ 8).astype(np.int8) - np.int8(8)))
        return replace(self.like, q=rows)
