"""GPTQ (Frantar et al. 2022): blocked quantization that compensates each row's rounding error.

Same storage as round-to-nearest (`quantize_blocked`): integer codes [K, N] with a scale (and a
zero point when asymmetric) per block of `block_size` rows along K, so the ONNX writers take the
result unchanged. Rows of the [K, N] weight are input features; they are quantized in order, and
the error of each row is pushed onto the rows not yet quantized through the inverse Hessian of
the layer's inputs (H = E[x xᵀ]), which minimises ‖X Wq − X W‖ greedily instead of ‖Wq − W‖.

Each block's scale and zero point are chosen when quantization reaches its first row, from the
block's weights as updated by the errors of the earlier rows (group-wise GPTQ). With `act_order`
the rows go by decreasing input energy H_ii instead, and every block's scale is fixed up front
from the original weights ("static groups"), which keeps the contiguous-block storage.
"""

from __future__ import annotations

import numpy as np
import torch

from .quantize import QuantizedWeight, block_codes, block_params, check_options

# Rows quantized between two full updates of the remaining weight ("lazy batch" of the paper);
# rounded to a multiple of the block size so a block never straddles two batches.
LAZY_ROWS = 128
# Extra dampening tried, as multiples of the requested one, if the Cholesky factorisation fails.
_DAMP_RETRIES = (1.0, 10.0, 100.0)


def inverse_hessian_cholesky(hessian: np.ndarray, damp: float = 0.01,
                             overwrite: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """The upper Cholesky factor U of (dampened H)⁻¹ (so H⁻¹ = Uᵀ U), float64, and the dead-input mask.

    Inputs that are always zero (H_ii = 0) get H_ii = 1: their weight rows are irrelevant and are
    zeroed by the caller, and the 1 keeps H invertible. At most three K x K float64 matrices live at once
    (K = 10240 on OPT-2.7B's fc2: 0.84 GB each), each freed as soon as the next exists; with `overwrite`
    a float64 `hessian` is used (and changed) in place instead of copied.
    """
    h = np.asarray(hessian, dtype=np.float64) if overwrite else np.array(hessian, dtype=np.float64)
    if h.ndim != 2 or h.shape[0] != h.shape[1]:
        raise ValueError(f"hessian must be square, got shape {h.shape}")
    dead = np.diag(h) <= 0
    h[dead, :] = 0.0
    h[:, dead] = 0.0
    h[dead, dead] = 1.0
    base = damp * float(np.mean(np.diag(h)))
    for factor in _DAMP_RETRIES:
        # With J the row reversal, J H J = L Lᵀ gives H = R Rᵀ for the upper triangular R = J L J,
        # so H⁻¹ = (R⁻¹)ᵀ R⁻¹ and U = R⁻¹: one Cholesky and one triangular solve, no full inverse.
        damped = torch.from_numpy(h).flip(0, 1)  # a copy; the dampening goes onto its diagonal in place
        damped.diagonal().add_(factor * base)
        lower, info = torch.linalg.cholesky_ex(damped)
        del damped
        if int(info) == 0:
            del h
            eye = torch.eye(lower.shape[0], dtype=torch.float64)
            lower_inv = torch.linalg.solve_triangular(lower, eye, upper=False)
            del lower, eye
            return lower_inv.flip(0, 1).numpy(), dead
    raise np.linalg.LinAlgError("the Hessian is not positive definite even after dampening")


def gptq_quantize(weight_kn: np.ndarray, hessian: np.ndarray, bits: int, block_size: int = 32,
                  symmetric: bool = True, clip: str = "absmax", damp: float = 0.01,
                  act_order: bool = False) -> QuantizedWeight:
    """Quantize a [K, N] weight with GPTQ given the [K, K] Hessian of its inputs; blocks run along K.

    `damp` adds damp·mean(diag H) to the diagonal. With H = identity this is round-to-nearest.
    `act_order` quantizes rows by decreasing H_ii (the most active inputs first); the blocks then
    take their scales from the original weights up front ("static groups"), so the storage stays
    contiguous blocks along K.
    """
    check_options(bits, clip)
    weight = np.array(weight_kn, dtype=np.float32)  # a copy: updated in place with the errors
    k, n = weight.shape
    if k % block_size:
        raise ValueError(f"block size {block_size} does not divide the input size {k}")
    if np.shape(hessian) != (k, k):
        raise ValueError(f"hessian shape {np.shape(hessian)} does not match the weight's K={k}")
    diag = np.diag(hessian)
    weight[diag <= 0] = 0.0  # dead inputs: the row never contributes
    num_blocks = k // block_size
    scales = np.empty((num_blocks, n), dtype=np.float32)
    zero_points = np.empty((num_blocks, n), dtype=np.uint8)  # returned only when asymmetric
    order = np.arange(k)
    if act_order:
        order = np.argsort(-diag, kind="stable")
        scales[:], zp = block_params(weight.reshape(num_blocks, block_size, n), bits, symmetric, clip)
        if zp is not None:
            zero_points[:] = zp
    # the reordered Hessian is a copy of our own: factorised in place
    upper = inverse_hessian_cholesky(np.asarray(hessian)[np.ix_(order, order)], damp, overwrite=True)[0]
    upper = upper.astype(np.float32)
    weight = weight[order]  # row j is input order[j]; identity order without act_order

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
                scale, zp = block_params(rows[None, i : i + block_size], bits, symmetric, clip)
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
