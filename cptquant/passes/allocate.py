"""From sensitivity scores to bits: k-harmonic means clusters, or the best plan within a budget.

Clustering (no budget): KHM (Zhang 1999) groups the scores into as many clusters as bit widths;
clusters are ranked by their centre, so the most sensitive cluster gets the most bits whatever
label the algorithm gave it (the reference code used raw KMeans labels). Scores are clustered on
a log scale: sensitivities span orders of magnitude, and on a linear scale one outlier takes a
cluster alone while everything else lands in the cheapest one.

Budget (`target_bits` or `max_size_mb`): predicted damage of a unit at b bits is
score * 4^(4 - b) (each extra bit halves the quantization step, so the error energy falls 4x;
the score is the damage at 4 bits). Starting from the fewest bits everywhere, a greedy pass buys
the upgrade with the largest damage reduction per extra byte that still fits, until none fits.
It never exceeds the budget; if the cheapest plan already does, that is an error.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
import numpy.typing as npt

from ..errors import CptqError
from ..plan import symmetric_for
from ..quant.storage import FP16_NODE_BYTES, NODE_BYTES, ZERO_POINT_NODE_BYTES, WeightShape, weight_nbytes

KHM_P = 3.5
MB = 1_000_000  # size budgets are decimal megabytes, like file sizes
FIXED_PARAM_BYTES = 4  # biases and norms stay FP32 in the export


def khm_cluster(values: npt.ArrayLike, k: int, p: float = KHM_P, seed: int = 0,
                max_iter: int = 200) -> tuple[npt.NDArray[np.float64], npt.NDArray[np.intp]]:
    """1-D k-harmonic means. Returns (centres sorted high to low, rank of each value's cluster: 0 = highest)."""
    points = np.asarray(values, dtype=np.float64)
    distinct = np.unique(points)
    if len(distinct) <= k:
        # As many clusters as distinct values (duplicates share one): nothing to optimise.
        centres = distinct[::-1]
        return centres, np.array([int(np.flatnonzero(centres == v)[0]) for v in points])
    span = float(distinct[-1] - distinct[0])
    # Deterministic start: evenly spaced quantiles, nudged by a seeded jitter far below the data's spread.
    centres = np.quantile(points, (np.arange(k) + 0.5) / k)
    centres = centres + np.random.default_rng(seed).uniform(-1e-6, 1e-6, k) * span
    floor = 1e-9 * span  # a point sitting on a centre would divide by zero
    for _ in range(max_iter):
        distance = np.maximum(np.abs(points[:, None] - centres[None, :]), floor)
        # KHM update: m_j = Σ_i q_ij x_i / Σ_i q_ij with q_ij = d_ij^-(p+2) / (Σ_l d_il^-p)^2
        q = distance ** -(p + 2) / (distance ** -p).sum(1, keepdims=True) ** 2
        updated = (q * points[:, None]).sum(0) / q.sum(0)
        if np.max(np.abs(updated - centres)) <= 1e-12 * span:
            centres = updated
            break
        centres = updated
    centres = np.sort(centres)[::-1]
    # Hard assignment: nearest centre; on a tie the higher centre (more bits) wins.
    labels = np.argmin(np.abs(points[:, None] - centres[None, :]), axis=1)
    return centres, labels


def log_scale(scores: npt.NDArray[np.float64]) -> npt.NDArray[np.float64]:
    """log10 of the scores, with zero or negative ones clamped just below the smallest positive one."""
    positive = scores[scores > 0]
    floor = positive.min() / 10 if len(positive) else 1.0
    logs: npt.NDArray[np.float64] = np.log10(np.maximum(scores, floor))
    return logs


def cluster_bits(scores: dict[str, float], bit_widths: tuple[int, ...], seed: int = 0) -> tuple[dict[str, int], list[float]]:
    names = list(scores)
    widths = sorted(set(bit_widths), reverse=True)
    centres, ranks = khm_cluster(log_scale(np.array([scores[n] for n in names])), len(widths), seed=seed)
    # Fewer distinct scores than widths: spread the ranks over the widths from the top.
    bits = {name: widths[min(int(rank), len(widths) - 1)] for name, rank in zip(names, ranks)}
    return bits, [float(c) for c in centres]


def unit_bytes(weights: Sequence[WeightShape], bits: int, block_size: int, zero_points: str = "auto",
               weight_format: str = "qdq") -> int:
    """Bytes the exporter writes for a unit's weights at `bits` (quant/storage.py), plus its nodes and
    names (`NODE_BYTES`, and as much again for a table's hot-row lookup). A weight that several ONNX files
    store (`WeightShape.copies`: an encoder-decoder's decoder layers) counts once per file, nodes included."""
    if bits >= 16:  # a tied head reads its table's FP16 copy through the table's Cast
        return sum(w.copies * (weight_nbytes(w, bits, block_size, True, weight_format)
                               + (0 if w.tied_head else FP16_NODE_BYTES)) for w in weights)
    symmetric = symmetric_for(bits, zero_points)
    nbytes = sum(w.copies * weight_nbytes(w, bits, block_size, symmetric, weight_format) for w in weights)
    # Measured on a tiny OPT (the longest layer names of the test models): a hot-row lookup's ten nodes take
    # ~2.1 KB; a tied head's MatMulNBits with the Reshape/Cast nodes adapting a table's tensors ~0.8 KB per
    # table read, its Concat and the Shape/Expand/GatherElements back to vocabulary order ~0.4 KB.
    hot_tables = sum(w.copies for w in weights if w.table and w.hot_rows and bits == 4)
    tables_read = sum(w.copies * (2 if w.hot_rows and bits == 4 else 1) for w in weights if w.tied_head)
    heads_hot = sum(w.copies for w in weights if w.tied_head and w.hot_rows and bits == 4)
    # --format dynamic at 4 bits: the constant-folded int8 expansion of each MatMul weight, ~1.7 KB of nodes.
    expansions = (sum(w.copies for w in weights if not w.table and not w.tied_head)
                  if weight_format == "dynamic" and bits == 4 else 0)
    files = max((w.copies for w in weights), default=1)  # the unit's own nodes, in each file that stores it
    zero_points_named = 0 if symmetric else sum(w.copies for w in weights)
    return (nbytes + NODE_BYTES * (files + 4 * hot_tables + 2 * tables_read + heads_hot + 3 * expansions)
            + ZERO_POINT_NODE_BYTES * zero_points_named)


def predicted_damage(score: float, bits: int) -> float:
    return max(score, 0.0) * 4.0 ** (4 - bits)


def budget_bits(scores: dict[str, float], params: dict[str, int], bit_widths: tuple[int, ...], *,
                target_bits: float | None = None, max_size_mb: float | None = None, block_size: int = 32,
                fixed_bytes: float = 0, zero_points: str = "auto", weight_format: str = "qdq",
                weights: Mapping[str, Sequence[WeightShape]] | None = None) -> dict[str, int]:
    """Per-unit bits minimising Σ predicted damage with cost <= budget (average bits, or bytes).

    `fixed_bytes`: what the file holds whatever the plan (graph, biases, norms), counted in a size budget.
    `weights`: each unit's weights as stored, which a size budget prices (`unit_bytes`).
    """
    if max_size_mb is not None and target_bits is None and (weights is None or not set(scores) <= set(weights)):
        raise ValueError("a size budget needs the shapes of every unit's weights")
    widths = sorted(set(bit_widths))
    names = list(scores)
    if target_bits is not None:
        if not widths[0] <= target_bits <= widths[-1]:
            raise CptqError(f"--target-bits {target_bits} is outside [{widths[0]}, {widths[-1]}], the range of the bit widths")
        total = sum(params.values())

        def cost(name: str, bits: int) -> float:
            return params[name] * bits

        budget = target_bits * total
        unit = "bits"
    elif max_size_mb is not None and weights is not None:
        shapes = weights

        def cost(name: str, bits: int) -> float:
            return unit_bytes(shapes[name], bits, block_size, zero_points, weight_format)

        budget = max_size_mb * MB - fixed_bytes
        unit = "bytes"
    else:
        raise ValueError("a budget needs target_bits or max_size_mb")
    chosen = {name: widths[0] for name in names}
    spent = sum(cost(n, chosen[n]) for n in names)
    if spent > budget * (1 + 1e-12):
        needed = (spent / sum(params.values()) if unit == "bits"
                  else (spent + fixed_bytes) / MB)
        what = f"{needed:.3f} bits per weight" if unit == "bits" else f"{needed:.3f} MB"
        raise CptqError(f"the budget cannot be met: even every layer at {widths[0]} bits needs {what}")
    while True:
        best, best_gain = None, 0.0
        for name in names:
            for bits in widths:
                if bits <= chosen[name]:
                    continue
                extra = cost(name, bits) - cost(name, chosen[name])
                if spent + extra > budget:
                    continue
                gain = (predicted_damage(scores[name], chosen[name]) - predicted_damage(scores[name], bits)) / extra
                if gain > best_gain:
                    best, best_gain = (name, bits), gain
        if best is None:
            return chosen
        name, bits = best
        spent += cost(name, bits) - cost(name, chosen[name])
        chosen[name] = bits
