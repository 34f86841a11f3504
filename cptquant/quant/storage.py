"""How each kernel stores a quantized weight: the tensors it reads, their bytes, and their values.

One storage class per way of writing a weight. `tensors()` gives the layout from the weight's shape
and the plan's choices alone; `nbytes()` adds it up; `encode()` turns quantized codes into exactly
those arrays. The allocator prices plans with `nbytes()` before anything is written, the lowering
passes write what `encode()` returns and count `nbytes()` in the report, so a size budget and the
file on disk come from the same layout. Names and nodes are not weights: the allocator adds
`NODE_BYTES` per quantized unit for them. Which ONNX Runtime kernel reads each layout, and why, is in
docs/ort-kernels.md.

Shapes follow the quantizer: a weight is [K, N] with blocks of `block_size` along K (for an
embedding table, K is the hidden size and N the rows).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np

from ..options import fitting_block_size
from ..plan import HOT_ROW_BITS
from .quantize import QuantizedWeight

FORMAT_QDQ = "qdq"  # standard DequantizeLinear -> MatMul; ORT fuses it into MatMulNBits
FORMAT_NBITS = "nbits"  # com.microsoft.MatMulNBits written directly
FORMAT_DYNAMIC = "dynamic"  # com.microsoft.DynamicQuantizeMatMul: int8 per-column weights, dynamic activations
FORMATS = (FORMAT_QDQ, FORMAT_NBITS, FORMAT_DYNAMIC)
FORMAT_AUTO = "auto"  # not a format: `--format auto` measures qdq and dynamic before the plan (commands/format_choice.py)

KERNEL_MATMUL_NBITS = "MatMulNBits"
KERNEL_GATHER_BQ = "GatherBlockQuantized"
KERNEL_DYNAMIC = "DynamicQuantizeMatMul"
KERNEL_FP16 = "fp16"  # FP16 initializer + Cast, folded at session start: no kernel of its own
LOW_BIT_KERNELS = (KERNEL_MATMUL_NBITS, KERNEL_GATHER_BQ, KERNEL_DYNAMIC)

# The nodes and initializer names a quantized unit adds: what the layouts leave out (~560 bytes per
# layer measured on a tiny OPT in --format qdq, whose layer names are long, plus a margin; 256 before, which let a size
# budget be overshot by 1 %).
NODE_BYTES = 640
# What an asymmetric weight's zero-point tensor adds besides its bytes: its initializer's name and header
# (~110 bytes per layer measured on a tiny T5 at 4 bits, whose zero points the 8-bit layers of the OPT above lack).
ZERO_POINT_NODE_BYTES = 128
# A 16-bit weight's Cast back to float32 and the names of its FP16 initializer and cast output (~230 bytes per
# layer measured on a tiny T5).
FP16_NODE_BYTES = 256

_DTYPE_BITS = {"int4": 4, "uint4": 4, "int8": 8, "uint8": 8, "int16": 16, "int32": 32, "int64": 64,
               "float16": 16, "float32": 32}


@dataclass(frozen=True)
class TensorLayout:
    shape: tuple[int, ...]
    dtype: str  # ONNX element type: int4/uint4 are packed two per byte over the flattened tensor

    @property
    def nbytes(self) -> int:
        return math.ceil(math.prod(self.shape) * _DTYPE_BITS[self.dtype] / 8)


def codes_dtype(bits: int, symmetric: bool) -> str:
    return ("int" if symmetric else "uint") + str(bits)


def fp16_holds(values: np.ndarray) -> bool:
    """Whether FP16 keeps these factors (block scales, block ratios): no overflow, no non-zero lost."""
    half = values.astype(np.float16)
    return bool(np.all(np.isfinite(half)) and np.all((half != 0) | (values == 0)))


def stored_factors(values: np.ndarray) -> tuple[np.ndarray, str]:
    """Float32 factors as the file keeps them: FP16 where it holds them (a Cast that ORT folds restores
    float32), else float32. Returns the values the model computes with and their storage type."""
    if fp16_holds(values):
        return values.astype(np.float16).astype(np.float32), "float16"
    return values, "float32"


def pack_uint4_last_axis(values: np.ndarray) -> np.ndarray:
    """Pack 4-bit unsigned values two per byte along the last axis, first value in the low nibble.

    This is the uint8 layout of com.microsoft.GatherBlockQuantized (bits=4) and MatMulNBits.
    """
    values = np.asarray(values, dtype=np.uint8)
    if values.shape[-1] % 2:
        values = np.concatenate([values, np.zeros(values.shape[:-1] + (1,), np.uint8)], axis=-1)
    return (values[..., 0::2] & 0x0F) | ((values[..., 1::2] & 0x0F) << 4)


def unpack_uint4_last_axis(packed: np.ndarray, length: int) -> np.ndarray:
    packed = np.asarray(packed, dtype=np.uint8)
    out = np.empty(packed.shape[:-1] + (packed.shape[-1] * 2,), np.uint8)
    out[..., 0::2] = packed & 0x0F
    out[..., 1::2] = packed >> 4
    return out[..., :length]


def _packed_length(length: int, bits: int) -> int:
    return math.ceil(length * bits / 8)


def _unsigned_codes(qw: QuantizedWeight) -> np.ndarray:
    """uint8 codes; symmetric ones shifted by 2^(bits-1), the zero point a kernel assumes without one."""
    codes: np.ndarray = qw.q.astype(np.int16) + 2 ** (qw.bits - 1) if qw.symmetric else qw.q
    return codes.astype(np.uint8)


def _as_laid_out(layout: dict[str, TensorLayout], arrays: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """`arrays`, after checking they are what `layout` (and so the allocator) counts. 4-bit codes are held
    in int8/uint8 arrays until written."""
    for role, spec in layout.items():
        array = arrays[role]
        held = {"int4": "int8", "uint4": "uint8"}.get(spec.dtype, spec.dtype)
        if set(arrays) != set(layout) or array.shape != spec.shape or array.dtype != np.dtype(held):
            raise RuntimeError(f"{role}: {array.dtype}{list(array.shape)} written where the layout has {spec}")
    return arrays


class _Layout:
    """A storage whose bytes are the sum of its tensors' (`tensors()` takes the same arguments)."""

    def tensors(self, *args: Any, **kwargs: Any) -> dict[str, TensorLayout]:
        raise NotImplementedError

    def nbytes(self, *args: Any, **kwargs: Any) -> int:
        return sum(t.nbytes for t in self.tensors(*args, **kwargs).values())


class BlockedQdq(_Layout):
    """`--format qdq`: codes [K, N] (int4/int8, or uint when asymmetric), a scale and zero point per
    block, read by a blocked DequantizeLinear that ORT fuses with the MatMul into MatMulNBits."""

    kernel = KERNEL_MATMUL_NBITS

    def tensors(self, k: int, n: int, bits: int, block_size: int, symmetric: bool,
                factors: str = "float16") -> dict[str, TensorLayout]:
        blocks = (k // block_size, n)
        layout = {"codes": TensorLayout((k, n), codes_dtype(bits, symmetric)), "scales": TensorLayout(blocks, factors)}
        if not symmetric:
            layout["zero_points"] = TensorLayout(blocks, codes_dtype(bits, False))
        return layout

    def encode(self, qw: QuantizedWeight) -> dict[str, np.ndarray]:
        """Codes as int8/uint8 holding the bit width's values (packed when written), float32 scales."""
        arrays = {"codes": qw.q, "scales": qw.scale}
        if qw.zero_point is not None:  # asymmetric
            arrays["zero_points"] = qw.zero_point
        k, n = qw.q.shape
        return _as_laid_out(self.tensors(k, n, qw.bits, qw.block_size, qw.symmetric, "float32"), arrays)


class BlockedNBits(_Layout):
    """`--format nbits` (and the FusedGemm repair): com.microsoft.MatMulNBits' own layout, codes per output
    column [N, blocks, block bytes] packed low nibble first, scales [N * blocks], zero points per column."""

    kernel = KERNEL_MATMUL_NBITS

    def tensors(self, k: int, n: int, bits: int, block_size: int, symmetric: bool,
                factors: str = "float16") -> dict[str, TensorLayout]:
        blocks = k // block_size
        layout = {"codes": TensorLayout((n, blocks, _packed_length(block_size, bits)), "uint8"),
                  "scales": TensorLayout((n * blocks,), factors)}
        if not symmetric:
            layout["zero_points"] = TensorLayout((n * _packed_length(blocks, bits),), "uint8")
        return layout

    def encode(self, qw: QuantizedWeight) -> dict[str, np.ndarray]:
        k, n = qw.q.shape
        blocks = k // qw.block_size
        codes = np.ascontiguousarray(_unsigned_codes(qw).T).reshape(n, blocks, qw.block_size)
        arrays = {"codes": pack_uint4_last_axis(codes) if qw.bits == 4 else codes,
                  "scales": np.ascontiguousarray(qw.scale.T).reshape(-1)}  # the kernel reads [N * blocks]
        if qw.zero_point is not None:  # asymmetric
            zp = np.ascontiguousarray(qw.zero_point.T)
            arrays["zero_points"] = (pack_uint4_last_axis(zp) if qw.bits == 4 else zp).reshape(-1)
        return _as_laid_out(self.tensors(k, n, qw.bits, qw.block_size, qw.symmetric, "float32"), arrays)


INT8_MAX = 127
# ORT's `reduce_range`: int8 weights within ±63. x86 CPUs with AVX2 but no VNNI multiply uint8 activations by
# int8 weights with vpmaddubsw, which sums pairs of products in int16: full-range weights saturate it (outputs
# off by up to ~18 %), 7-bit ones cannot (255 · 64 · 2 < 32767). docs/ort-kernels.md has the figures.
REDUCED_RANGE_MAX = 63


@dataclass(frozen=True)
class DynamicInt8(_Layout):
    """`--format dynamic`: com.microsoft.DynamicQuantizeMatMul reads an int8 [K, N] weight and a float32
    scale per output column. 8 bits: exactly that. 4 bits: the blocked codes stay 4-bit on disk with
    per-block ratios (block scale / column scale) and zero points; constant-foldable ops expand them to
    int8 at session start. `weight_max`: the int8 codes' range, ±127, or ±63 where the CPU's int8 GEMM
    would saturate (`REDUCED_RANGE_MAX`); the bytes are the same."""

    weight_max: int = INT8_MAX
    kernel = KERNEL_DYNAMIC

    def tensors(self, k: int, n: int, bits: int, block_size: int, symmetric: bool,
                factors: str = "float16") -> dict[str, TensorLayout]:
        if bits == 8:  # symmetric per output column whatever the plan says
            return {"codes": TensorLayout((k, n), "int8"), "column_scales": TensorLayout((n,), "float32")}
        blocks = k // block_size
        layout = {"codes": TensorLayout((blocks, block_size, n), codes_dtype(bits, symmetric)),
                  "ratios": TensorLayout((blocks, 1, n), factors)}
        if not symmetric:
            layout["zero_points"] = TensorLayout((blocks, 1, n), codes_dtype(bits, False))
        layout["column_scales"] = TensorLayout((n,), "float32")
        return layout

    def encode(self, qw: QuantizedWeight) -> dict[str, np.ndarray]:
        """8 bits: `qw` is per column (one block of K), within ±`weight_max`. 4 bits: column scale
        max|W4| / `weight_max`, so the effective weight is the 4-bit one rounded once more onto the column's
        int8 grid."""
        k, n = qw.q.shape
        if qw.bits == 8:
            arrays = {"codes": qw.q, "column_scales": qw.scale.reshape(n)}
            return _as_laid_out(self.tensors(k, n, 8, k, True), arrays)
        blocks = k // qw.block_size
        column_scale = np.abs(qw.dequantize()).max(axis=0) / np.float32(self.weight_max)
        column_scale = np.where(column_scale > 0, column_scale, 1).astype(np.float32)
        ratio = (qw.scale / column_scale).astype(np.float32)  # [K/B, N]; FP16 keeps it to 2^-11 relative
        arrays = {"codes": qw.q.reshape(blocks, qw.block_size, n), "ratios": ratio.reshape(blocks, 1, n)}
        if qw.zero_point is not None:  # asymmetric
            arrays["zero_points"] = qw.zero_point.reshape(blocks, 1, n)
        arrays["column_scales"] = column_scale
        return _as_laid_out(self.tensors(k, n, qw.bits, qw.block_size, qw.symmetric, "float32"), arrays)

    @staticmethod
    def effective_weight(arrays: dict[str, np.ndarray], ratios: np.ndarray) -> np.ndarray:
        """The float weight the kernel computes with, given the ratios as stored: the int8 expansion in
        ORT's float32 steps, times the column scales."""
        codes = arrays["codes"]
        blocks, block_size, n = codes.shape
        expected = codes.astype(np.float32)
        if "zero_points" in arrays:
            expected = expected - arrays["zero_points"].astype(np.float32)
        int8 = np.rint(expected * ratios.reshape(blocks, 1, n)).reshape(blocks * block_size, n)
        weight: np.ndarray = int8 * arrays["column_scales"]
        return weight


class BlockQuantizedTable(_Layout):
    """An embedding table [rows, hidden] for com.microsoft.GatherBlockQuantized: uint8 codes per row
    (4-bit packed two per byte), FP16 scales per block along the hidden size (the kernel then returns
    FP16 rows), zero points per row, none when symmetric (the kernel assumes 2^(bits-1))."""

    kernel = KERNEL_GATHER_BQ

    def tensors(self, hidden: int, rows: int, bits: int, block_size: int, symmetric: bool) -> dict[str, TensorLayout]:
        blocks = hidden // block_size
        layout = {"codes": TensorLayout((rows, _packed_length(hidden, bits)), "uint8"),
                  "scales": TensorLayout((rows, blocks), "float16")}
        if not symmetric:
            layout["zero_points"] = TensorLayout((rows, _packed_length(blocks, bits)), "uint8")
        return layout

    def encode(self, qw: QuantizedWeight) -> dict[str, np.ndarray]:
        """`qw` quantized the table transposed ([hidden, rows]: blocks along the hidden size)."""
        codes = np.ascontiguousarray(_unsigned_codes(qw).T)
        arrays = {"codes": pack_uint4_last_axis(codes) if qw.bits == 4 else codes,
                  "scales": np.ascontiguousarray(qw.scale.T).astype(np.float16)}
        if qw.zero_point is not None:  # asymmetric
            zp = np.ascontiguousarray(qw.zero_point.T)
            arrays["zero_points"] = pack_uint4_last_axis(zp) if qw.bits == 4 else zp
        hidden, rows = qw.q.shape
        return _as_laid_out(self.tensors(hidden, rows, qw.bits, qw.block_size, qw.symmetric), arrays)


def hot_slot_dtype(table_rows: int) -> np.dtype:
    """Storage of a hot-row table's slot table (one entry per token id, in [-rows, rows))."""
    return np.dtype(np.int16 if table_rows <= np.iinfo(np.int16).max else np.int32)


class HotRowTable:
    """A 4-bit table whose hot rows sit in a second, 8-bit symmetric table; a slot table sends each
    token id to its row: >= 0 in the cold table, -1 - row in the hot one."""

    kernel = KERNEL_GATHER_BQ
    table = BlockQuantizedTable()

    def nbytes(self, hidden: int, rows: int, hot: int, bits: int, block_size: int, symmetric: bool) -> int:
        if hot == rows:  # every row hot (a hand-written plan): one 8-bit table
            return self.table.nbytes(hidden, rows, HOT_ROW_BITS, block_size, True)
        return (self.table.nbytes(hidden, hot, HOT_ROW_BITS, block_size, True)
                + self.table.nbytes(hidden, rows - hot, bits, block_size, symmetric)
                + rows * hot_slot_dtype(rows).itemsize)

    @staticmethod
    def slots(rows: int, hot: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """The slot table, and the cold rows in table order."""
        is_hot = np.zeros(rows, dtype=bool)
        is_hot[hot] = True
        cold = np.flatnonzero(~is_hot)
        slot = np.empty(rows, dtype=hot_slot_dtype(rows))
        slot[cold] = np.arange(cold.size)
        slot[hot] = -1 - np.arange(hot.size)
        return slot, cold


def shares_tied_table(weight_format: str) -> bool:
    """Whether a 4/8-bit LM head tied to a token embedding reads the table's own codes (`TiedHead`): in
    every format whose MatMul kernel is MatMulNBits, which reads the table's layout as it is."""
    return weight_format in (FORMAT_QDQ, FORMAT_NBITS)


class TiedHead:
    """An LM head tied to a 4/8-bit token embedding: com.microsoft.MatMulNBits over the table's own
    codes, scales and zero points (GatherBlockQuantized's [rows, hidden] layout is MatMulNBits' [N, K]
    one; Reshape and Cast, folded by ORT, adapt the shapes and the FP16 scales), so the table is stored
    once. With hot rows, one MatMulNBits per table, their logits concatenated, and, unless the hot rows
    are the first rows of the vocabulary (then the concatenation is in vocabulary order), a GatherElements putting
    them back in order: its index table is all the head adds to the file."""

    kernel = KERNEL_MATMUL_NBITS

    def nbytes(self, rows: int, hot: int, hot_prefix: bool = False) -> int:
        return rows * np.dtype(np.int32).itemsize if 0 < hot < rows and not hot_prefix else 0


class Fp16Weight:
    """16 bits: the weight as FP16, restored to float32 by a Cast that ORT folds at session start."""

    kernel = KERNEL_FP16

    def nbytes(self, size: int) -> int:
        return 2 * size


class InputSmoothing:
    """`--format dynamic` outlier channels: 1/s per input channel, float32, for a Mul before the kernel."""

    def nbytes(self, k: int) -> int:
        return 4 * k


MATMUL_STORAGE = {FORMAT_QDQ: BlockedQdq(), FORMAT_NBITS: BlockedNBits(), FORMAT_DYNAMIC: DynamicInt8()}


@dataclass(frozen=True)
class WeightShape:
    """One weight as the file stores it, for pricing a plan: [K, N], or a table's hidden size and rows."""

    k: int
    n: int
    table: bool = False
    hot_rows: int = 0  # a table's rows kept at 8 bits when it is at 4 (a tied head: its table's)
    hot_prefix: bool = False  # those rows are ids 0 .. hot_rows - 1 (a tied head then needs no reordering)
    tied_head: bool = False  # an LM head that shares a token embedding's parameter (the table is priced there)
    copies: int = 1  # ONNX files of the export that each store it (an encoder-decoder's decoders: 2)


def weight_nbytes(weight: WeightShape, bits: int, block_size: int, symmetric: bool, weight_format: str) -> int:
    """Bytes one weight takes in the file at `bits` (16: FP16): what the lowering writes for it. In
    `--format dynamic` a MatMul weight also counts its possible input smoothing (4 bytes per input
    channel: an upper bound, since only the calibration text decides where it applies)."""
    block_size = fitting_block_size(weight.k, block_size)  # as every plan gives that layer
    if weight.tied_head and (bits >= 16 or shares_tied_table(weight_format)):
        return TiedHead().nbytes(weight.n, weight.hot_rows if bits == 4 else 0, weight.hot_prefix)  # FP16: one copy too
    if bits >= 16:
        return Fp16Weight().nbytes(weight.k * weight.n)
    if weight.table:
        if weight.hot_rows and bits == 4:
            return HotRowTable().nbytes(weight.k, weight.n, weight.hot_rows, bits, block_size, symmetric)
        return BlockQuantizedTable().nbytes(weight.k, weight.n, bits, block_size, symmetric)
    nbytes = MATMUL_STORAGE[weight_format].nbytes(weight.k, weight.n, bits, block_size, symmetric)
    if weight_format == FORMAT_DYNAMIC:
        nbytes += InputSmoothing().nbytes(weight.k)
    return nbytes
