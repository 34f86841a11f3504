"""Blocked weight quantization in numpy: the one quantizer used by the exporter, the oracle and TDMPQ.

Weights are given as [K, N] (K = the input dimension, the axis blocks run along), the layout of an
ONNX MatMul weight and of a blocked `DequantizeLinear(axis=0)`.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np

from ..options import CLIP_METHODS

# Shrink factors tried by the MSE clip search, largest first (1.0 = plain absmax).
_MSE_RATIOS = np.linspace(1.0, 0.5, 21, dtype=np.float32)
# Weights per slice of columns that round-to-nearest quantizes (and measures the error of) at once: 16 MB of
# float32, whatever the layer's size.
_CHUNK_ELEMENTS = 1 << 22
# Weights per slice of columns the MSE clip search tries its ratios on: 2 MB of float32, so that its ~10 passes
# per ratio over each temporary stay in the core's cache (a 8192 x 2048 weight: 3.8 s -> 2.0 s). Columns are
# searched independently: the same scales to the last bit.
_SEARCH_ELEMENTS = 1 << 19


def column_step(k: int, elements: int = _CHUNK_ELEMENTS) -> int:
    """Columns per slice of a [k, N] weight, for slices of about `elements` values."""
    return max(1, elements // k)


@dataclass
class QuantizedWeight:
    q: np.ndarray  # integers, [K, N]; int8 holding int4/int8 values (symmetric) or uint8 (asymmetric)
    scale: np.ndarray  # float32, [K // block_size, N]
    zero_point: np.ndarray | None  # uint8, same shape as scale; None when symmetric
    bits: int
    block_size: int
    scale_bytes: int = 4  # as stored: float32, or 2 where the writer keeps FP16 scales

    @property
    def symmetric(self) -> bool:
        return self.zero_point is None

    def dequantize(self) -> np.ndarray:
        k, n = self.q.shape
        q = self.q.astype(np.float32).reshape(k // self.block_size, self.block_size, n)
        if self.zero_point is not None:
            q -= self.zero_point.astype(np.float32)[:, None, :]
        q *= self.scale[:, None, :]  # broadcast per block: no repeated copy of the scales
        return q.reshape(k, n)

    def columns(self, columns: slice) -> QuantizedWeight:
        zero_point = None if self.zero_point is None else self.zero_point[:, columns]
        return replace(self, q=self.q[:, columns], scale=self.scale[:, columns], zero_point=zero_point)

    def squared_error(self, weight: np.ndarray, mean: bool = False) -> float:
        """Σ (or the mean) of (dequantized − weight)² over the [K, N] `weight`; a wide one (a table, an LM
        head) a slice of columns at a time, so that no temporary of its whole size is made."""
        k, n = self.q.shape
        step = column_step(k)
        if step >= n:
            error = (self.dequantize() - weight) ** 2
            return float(np.mean(error) if mean else np.sum(error))
        total = sum(float(np.sum((self.columns(slice(start, start + step)).dequantize()
                                  - weight[:, start:start + step]) ** 2)) for start in range(0, n, step))
        return total / (k * n) if mean else total

    def nbytes(self) -> int:
        """Bytes this weight takes in the ONNX file: packed integers, scales and zero points."""
        q_bytes = self.q.size * self.bits // 8
        zp_bytes = 0 if self.zero_point is None else self.zero_point.size * self.bits // 8
        return q_bytes + self.scale.size * self.scale_bytes + zp_bytes


_TINY = np.finfo(np.float32).tiny


def _safe_scale(scale: np.ndarray) -> np.ndarray:
    """A scale of 0 (an all-zero block, or one so small the division underflows) becomes 1: q is 0 there."""
    return np.where(scale > _TINY, scale, 1.0).astype(np.float32)


def _blocks(weight: np.ndarray, block_size: int) -> np.ndarray:
    k, n = weight.shape
    if k % block_size:
        raise ValueError(f"block size {block_size} does not divide the input size {k}")
    return weight.reshape(k // block_size, block_size, n)


def _symmetric_codes(blocks: np.ndarray, scale: np.ndarray, bits: int) -> np.ndarray:
    qmax = 2 ** (bits - 1) - 1
    codes: np.ndarray = np.clip(np.rint(blocks / scale[:, None, :]), -qmax - 1, qmax)
    return codes


def _asymmetric_codes(blocks: np.ndarray, scale: np.ndarray, zero_point: np.ndarray, bits: int) -> np.ndarray:
    codes: np.ndarray = np.clip(np.rint(blocks / scale[:, None, :]) + zero_point[:, None, :], 0, 2**bits - 1)
    return codes


def _squared_error(dequantized: np.ndarray, blocks: np.ndarray, row_weights: np.ndarray | None) -> np.ndarray:
    """Σ over each block's rows of (dequantized − weight)², each row weighted when `row_weights` [K/B, B] is given."""
    err: np.ndarray = (dequantized - blocks) ** 2
    if row_weights is not None:
        err *= row_weights[:, :, None]
    total: np.ndarray = err.sum(axis=1)
    return total


def _symmetric_scale(blocks: np.ndarray, bits: int, clip: str, row_weights: np.ndarray | None) -> np.ndarray:
    qmax = 2 ** (bits - 1) - 1
    absmax = np.abs(blocks).max(axis=1)  # [K/B, N]
    if clip != "mse":
        return _safe_scale(absmax / qmax)
    best_err = np.full(absmax.shape, np.inf, dtype=np.float32)
    best_scale = _safe_scale(absmax / qmax)
    for ratio in _MSE_RATIOS:
        scale = _safe_scale(ratio * absmax / qmax)
        err = _squared_error(_symmetric_codes(blocks, scale, bits) * scale[:, None, :], blocks, row_weights)
        better = err < best_err
        best_err = np.where(better, err, best_err)
        best_scale = np.where(better, scale, best_scale)
    return _safe_scale(best_scale)


def _asymmetric_params(blocks: np.ndarray, bits: int, clip: str,
                       row_weights: np.ndarray | None) -> tuple[np.ndarray, np.ndarray]:
    levels = 2**bits - 1
    lo = np.minimum(blocks.min(axis=1), 0.0)  # keep 0 exactly representable
    hi = np.maximum(blocks.max(axis=1), 0.0)

    def params(lo_: np.ndarray, hi_: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        scale = _safe_scale((hi_ - lo_) / levels)
        return scale, np.clip(np.rint(-lo_ / scale), 0, levels)

    if clip != "mse":
        return params(lo, hi)
    best_scale, best_zp = params(lo * _MSE_RATIOS[0], hi * _MSE_RATIOS[0])  # the loop's first ratio: kept where no ratio is better
    best_err = np.full(lo.shape, np.inf, dtype=np.float32)
    for ratio in _MSE_RATIOS:
        scale, zp = params(lo * ratio, hi * ratio)
        q = _asymmetric_codes(blocks, scale, zp, bits)
        err = _squared_error((q - zp[:, None, :]) * scale[:, None, :], blocks, row_weights)
        better = err < best_err
        best_err = np.where(better, err, best_err)
        best_scale = np.where(better, scale, best_scale)
        best_zp = np.where(better, zp, best_zp)
    return best_scale, best_zp


def block_params(blocks: np.ndarray, bits: int, symmetric: bool, clip: str,
                 row_weights: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray | None]:
    """Per-block scale and zero point (None when symmetric) of float32 `blocks` [num_blocks, block, N].

    Shared by round-to-nearest and GPTQ. The MSE clip search weighs each row's squared error by
    `row_weights` [num_blocks, block] when given: GPTQ passes its inputs' energies H_kk, so the search
    minimises the layer's output error (diagonal part) instead of the weight's.
    """
    num_blocks, block, n = blocks.shape
    step = column_step(num_blocks * block, _SEARCH_ELEMENTS)
    if clip == "mse" and n > step:
        parts = [block_params(blocks[:, :, start:start + step], bits, symmetric, clip, row_weights)
                 for start in range(0, n, step)]
        zero_points = [zp for _, zp in parts if zp is not None]
        return (np.concatenate([scale for scale, _ in parts], axis=1),
                np.concatenate(zero_points, axis=1) if zero_points else None)
    if symmetric:
        return _symmetric_scale(blocks, bits, clip, row_weights).astype(np.float32), None
    scale, zp = _asymmetric_params(blocks, bits, clip, row_weights)
    return scale.astype(np.float32), zp.astype(np.uint8)


def block_codes(blocks: np.ndarray, scale: np.ndarray, zero_point: np.ndarray | None, bits: int) -> np.ndarray:
    """Integer codes of `blocks` [num_blocks, rows, N] under per-block `scale`/`zero_point` [num_blocks, N]:
    int8 when symmetric, uint8 when asymmetric (the `QuantizedWeight` conventions)."""
    if zero_point is None:
        return _symmetric_codes(blocks, scale, bits).astype(np.int8)
    return _asymmetric_codes(blocks, scale, zero_point.astype(np.float32), bits).astype(np.uint8)


def searched_clip(clip: str) -> str:
    """The clip GPTQ's codes take for option `clip`: auto (the default) means the search, which GPTQ weighs by
    its inputs' energy; round-to-nearest reads auto as absmax (every `clip != "mse"` here and in the passes)."""
    return "absmax" if clip == "absmax" else "mse"


def check_options(bits: int, clip: str) -> None:
    if bits not in (4, 8):
        raise ValueError(f"bits must be 4 or 8, got {bits}")
    if clip not in CLIP_METHODS:
        raise ValueError(f"clip must be one of {CLIP_METHODS}, got {clip!r}")


def quantize_blocked(weight: np.ndarray, bits: int, block_size: int = 32, symmetric: bool = True,
                     clip: str = "absmax") -> QuantizedWeight:
    """Quantize a [K, N] weight in blocks of `block_size` along K to `bits` (4 or 8), round-to-nearest."""
    check_options(bits, clip)
    weight = np.asarray(weight, dtype=np.float32)
    k, n = weight.shape
    step = column_step(k)
    if step >= n:
        return _quantize_columns(weight, bits, block_size, symmetric, clip)
    # Columns are quantized independently: a wide weight (an embedding table) goes a slice of columns at a
    # time, so that the search's float temporaries are ~_CHUNK_ELEMENTS, not several copies of the weight.
    parts = [_quantize_columns(weight[:, start:start + step], bits, block_size, symmetric, clip)
             for start in range(0, n, step)]
    zero_points = [part.zero_point for part in parts if part.zero_point is not None]
    return QuantizedWeight(np.concatenate([part.q for part in parts], axis=1),
                           np.concatenate([part.scale for part in parts], axis=1),
                           np.concatenate(zero_points, axis=1) if zero_points else None, bits, block_size)


def _quantize_columns(weight: np.ndarray, bits: int, block_size: int, symmetric: bool, clip: str) -> QuantizedWeight:
    blocks = _blocks(weight, block_size)
    scale, zero_point = block_params(blocks, bits, symmetric, clip)
    q = block_codes(blocks, scale, zero_point, bits)
    return QuantizedWeight(q.reshape(weight.shape), scale, zero_point, bits, block_size)


def quantize_columns_within(weight: np.ndarray, qmax: int) -> QuantizedWeight:
    """Symmetric int8 codes per output column of a [K, N] weight, within ±`qmax`, round-to-nearest: what ORT's
    `reduce_range` writes with 63 (7 bits). An 8-bit weight (`bits` 8: int8 on disk) on a narrower grid."""
    bits = qmax.bit_length() + 1  # 63: the symmetric 7-bit grid
    if 2 ** (bits - 1) - 1 != qmax:
        raise ValueError(f"qmax must be 2^b - 1, got {qmax}")
    weight = np.asarray(weight, dtype=np.float32)
    return replace(_quantize_columns(weight, bits, weight.shape[0], True, "absmax"), bits=8)


def fake_quantize(weight: np.ndarray, bits: int, block_size: int = 32, symmetric: bool = True,
                  clip: str = "absmax") -> np.ndarray:
    """Quantize then dequantize: what the deployed model computes with, in float32."""
    if bits >= 16:
        return np.asarray(weight, dtype=np.float16).astype(np.float32)
    return quantize_blocked(weight, bits, block_size, symmetric, clip).dequantize()
