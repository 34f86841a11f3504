"""GPTQ (Frantar et al. 2022): blocked quantization that compensates each row's rounding error.

Same storage as round-to-nearest (`quantize_blocked`): integer codes [K, N] with a scale (and a
zero point when asymmetric) per block of `block_size` rows along K, so the ONNX writers take the
result unchanged. Rows of the [K, N] weight are input features; they are quantized in order, and
the error of each row is pushed onto the rows not yet quantized through the inverse Hessian of
the layer's inputs (H = E[x xᵀ]), which minimises ‖X Wq − X W‖ greedily instead of ‖Wq − W‖.

Each block's scale and zero point are chosen when quantization reaches its first row, from the
block's weights as updated by the errors of the earlier rows (group-wise GPTQ). With `act_order`
the rows go by decreasing input energy H_ii instead, and every block's scale is fixed up front
from the original weights ("static groups"), which keeps the contiguous-block storage. With `clip="mse"` (or
"auto", the exporter's default) the search for each block's clipping range weighs each row's squared error by
its input energy H_kk: what matters is the layer's output error, not the weight's (SmolLM2, every linear 4-bit:
KL from FP32 0.116 -> 0.098).
"""

from __future__ import annotations

from typing import cast

import numpy as np
import torch
from scipy.linalg import lapack

from .quantize import QuantizedWeight, block_codes, block_params, check_options, searched_clip

# Rows quantized between two full updates of the remaining weight ("lazy batch" of the paper);
# rounded to a multiple of the block size so a block never straddles two batches.
LAZY_ROWS = 128
# Extra dampening tried, as multiples of the requested one, if the Cholesky factorisation fails.
_DAMP_RETRIES = (1.0, 10.0, 100.0)


def inverse_hessian_cholesky(hessian: np.ndarray, damp: float = 0.01,
                             overwrite: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """The upper Cholesky factor U of (dampened H)⁻¹ (so H⁻¹ = Uᵀ U), float64, and the dead-input mask.

    Inputs that are always zero (H_ii = 0) get H_ii = 1: their weight rows are irrelevant and are
    zeroed by the caller, and the 1 keeps H invertible. Two K x K float64 matrices live at once (K = 10240
    on OPT-2.7B's fc2: 0.84 GB each): H, reversed and dampened in place, and its Cholesky factor, inverted in
    place. U is returned as a (non-contiguous) view of the factor's memory. With `overwrite` a C-contiguous
    float64 `hessian` is H's memory (and is changed); otherwise it is copied first.
    """
    h = np.asarray(hessian, dtype=np.float64) if overwrite else np.array(hessian, dtype=np.float64)
    if h.ndim != 2 or h.shape[0] != h.shape[1]:
        raise ValueError(f"hessian must be square, got shape {h.shape}")
    if not (h.flags.c_contiguous and h.flags.writeable):
        h = np.array(h)
    dead = np.diag(h) <= 0
    h[dead, :] = 0.0
    h[:, dead] = 0.0
    h[dead, dead] = 1.0
    base = damp * float(np.mean(np.diag(h)))
    # With J the row reversal, J H J = L Lᵀ gives H = R Rᵀ for the upper triangular R = J L J,
    # so H⁻¹ = (R⁻¹)ᵀ R⁻¹ and U = R⁻¹: one Cholesky and one triangular inverse, no full inverse.
    _reverse_rows_and_columns(h)  # J H J, in place
    reversed_h = torch.from_numpy(h)  # shares h's memory
    lower = _dampened_cholesky(reversed_h, base).numpy()
    del reversed_h
    # L⁻¹ in L's own memory by LAPACK's triangular inverse: a third of the work of solving L X = I (K = 8,192:
    # 3.3 s against 6.8 s). L is column-major (torch returns LAPACK's layout), so trtri works on it in place.
    lower_inv, info = lapack.dtrtri(lower, lower=1, overwrite_c=1)
    if info != 0:
        raise np.linalg.LinAlgError(f"the Hessian's Cholesky factor is singular (trtri info {info})")
    # U = J L⁻¹ J
    return lower_inv[::-1, ::-1], dead


def _dampened_cholesky(h: torch.Tensor, base: float) -> torch.Tensor:
    """The lower Cholesky factor of h + factor·base·I for the first factor of _DAMP_RETRIES that gives one; h's
    diagonal is left dampened (by that factor)."""
    undamped = h.diagonal().clone()
    for factor in _DAMP_RETRIES:
        h.diagonal().add_(factor * base)
        lower, info = torch.linalg.cholesky_ex(h)
        if int(info) == 0:
            return cast(torch.Tensor, lower)
        del lower
        h.diagonal().copy_(undamped)  # the next dampening starts from H again
    raise np.linalg.LinAlgError("the Hessian is not positive definite even after dampening")


def _reverse_rows_and_columns(a: np.ndarray) -> None:
    """a ← J a J (a[::-1, ::-1]) in place, a pair of rows at a time (numpy's own would copy the whole matrix)."""
    k = a.shape[0]
    for i in range(k // 2):
        j = k - 1 - i
        top = a[i, ::-1].copy()
        a[i] = a[j, ::-1]
        a[j] = top
    if k % 2:
        a[k // 2] = a[k // 2, ::-1].copy()


def _permute_in_place(a: np.ndarray, order: np.ndarray, columns: bool) -> None:
    """a ← a[order] (rows), and with `columns` then a ← a[:, order] too, in place: the columns one row at a
    time, the rows along the permutation's cycles with one spare row."""
    if columns:
        for row in a:
            row[:] = row[order]
    done = np.zeros(len(order), dtype=bool)
    for start in range(len(order)):
        if done[start] or order[start] == start:
            continue
        spare = a[start].copy()
        i = start
        while True:
            done[i] = True
            j = int(order[i])
            if j == start:
                a[i] = spare
                break
            a[i] = a[j]
            i = j


def gptq_quantize(weight_kn: np.ndarray, hessian: np.ndarray, bits: int, block_size: int = 32,
                  symmetric: bool = True, clip: str = "absmax", damp: float = 0.01,
                  act_order: bool = False, overwrite_hessian: bool = False) -> QuantizedWeight:
    """Quantize a [K, N] weight with GPTQ given the [K, K] Hessian of its inputs; blocks run along K.

    `damp` adds damp·mean(diag H) to the diagonal. With H = identity this is round-to-nearest.
    `act_order` quantizes rows by decreasing H_ii (the most active inputs first); the blocks then
    take their scales from the original weights up front ("static groups"), so the storage stays
    contiguous blocks along K. With `overwrite_hessian` a float64 `hessian` is reordered and factorised in
    place (the caller's array is garbage afterwards): no K x K copy of it is made.
    """
    check_options(bits, clip)
    clip = searched_clip(clip)
    # A C-ordered copy, updated in place with the errors: a Gemm's transposed weight (GemmView) arrives column-major,
    # where every row update strides across memory (2048 x 2048: 4x slower; opt-640m's --bits 4 quantize step 20 -> 6.5 min).
    weight = np.array(weight_kn, dtype=np.float32, order="C")
    k, n = weight.shape
    if k % block_size:
        raise ValueError(f"block size {block_size} does not divide the input size {k}")
    if np.shape(hessian) != (k, k):
        raise ValueError(f"hessian shape {np.shape(hessian)} does not match the weight's K={k}")
    diag = np.diag(hessian).copy()  # not a view: the Hessian may be reordered in place
    weight[diag <= 0] = 0.0  # dead inputs: the row never contributes
    num_blocks = k // block_size
    scales = np.empty((num_blocks, n), dtype=np.float32)
    zero_points = np.empty((num_blocks, n), dtype=np.uint8)  # returned only when asymmetric
    order = np.arange(k)
    if act_order:
        order = np.argsort(-diag, kind="stable")
        scales[:], zp = block_params(weight.reshape(num_blocks, block_size, n), bits, symmetric, clip,
                                     row_weights=np.maximum(diag, 0.0).reshape(num_blocks, block_size))
        if zp is not None:
            zero_points[:] = zp
    if overwrite_hessian and isinstance(hessian, np.ndarray) and hessian.dtype == np.float64:
        if act_order:
            _permute_in_place(hessian, order, columns=True)
        reordered = hessian
    else:  # a copy of our own
        reordered = np.asarray(hessian)[np.ix_(order, order)]
    # factorised in place (its memory then holds the float64 factor, which `upper` copies to float32). Column-major,
    # as torch left it before the factor was solved in place: the products below round by the operands' layout.
    upper = np.asfortranarray(inverse_hessian_cholesky(reordered, damp, overwrite=True)[0], dtype=np.float32)
    del reordered
    if act_order:
        _permute_in_place(weight, order, columns=False)  # row j is input order[j]

    codes = np.empty((k, n), dtype=np.int8 if symmetric else np.uint8)
    lazy = max(1, LAZY_ROWS // block_size) * block_size
    for start in range(0, k, lazy):
        stop = min(start + lazy, k)
        rows = weight[start:stop]  # a view: the in-batch updates land in `weight`
        u = upper[start:stop, start:stop]
        errors = np.empty((stop - start, n), dtype=np.float32)
        for i in range(stop - start):
            group = order[start + i] // block_size
            if not act_order and (start + i) % block_size == 0:
                # The block starts here: its scale comes from its rows as updated so far.
                scale, zp = block_params(rows[None, i : i + block_size], bits, symmetric, clip,
                                         row_weights=np.maximum(diag[start + i : start + i + block_size], 0.0)[None])
                scales[group] = scale[0]
                if zp is not None:
                    zero_points[group] = zp[0]
            scale = scales[group : group + 1]
            zp = None if symmetric else zero_points[group : group + 1]
            q = block_codes(rows[None, i : i + 1], scale, zp, bits)[0, 0]
            codes[order[start + i]] = q
            zp_float = np.float32(0.0) if zp is None else zp[0].astype(np.float32)
            dequantized = (q.astype(np.float32) - zp_float) * scale[0]  # as QuantizedWeight.dequantize
            errors[i] = (rows[i] - dequantized) / u[i, i]
            rows[i + 1 :] -= np.outer(u[i, i + 1 :], errors[i])
        weight[stop:] -= upper[start:stop, stop:].T @ errors
    return QuantizedWeight(codes, scales, None if symmetric else zero_points, bits, block_size)
