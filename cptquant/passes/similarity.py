"""How alike a layer's FP32 output y and its quantized output q = y + e are, from running moments (CMPQ's maths).

`PairAccumulator` sums the joint second moments of y and e over tokens (float64, wide outputs sketched
through one fixed random projection); its `score` is 1 - similarity(y, q): `cka` linear CKA, or the
canonical-correlation family (`cca`, `svcca`, `pwcca`) within y's top principal components.
Why these forms, and what they measured, is in cmpq.py's docstring and docs/ARCHITECTURE.md.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator

import torch

PROJECTION_DIM = 128  # wider outputs are sketched to this many features, the same projection on both sides
MAX_COMPONENTS = 32
SVCCA_VARIANCE = 0.99
EIGEN_FLOOR = 1e-9  # principal components below this fraction of the largest are numerical noise
TINY = 1e-12  # floor of a token's second moment (an all-zero token has nothing to lose)
FEATURE_FLOOR = 1e-4  # a feature's second moment counts as at least this fraction of the mean feature's


class PairAccumulator:
    """Running float64 sums for the joint covariance of an output y and its change e = y_quantized - y."""

    def __init__(self, seed: int) -> None:
        self.seed = seed
        self.projection: torch.Tensor | None = None
        self.n = 0
        self.sums: list[torch.Tensor] | None = None

    def projection_for(self, width: int) -> torch.Tensor | None:
        """The fixed sketch of outputs `width` wide (None when narrow enough to keep whole)."""
        if width > PROJECTION_DIM and self.projection is None:
            gen = torch.Generator().manual_seed(self.seed)
            self.projection = torch.randn(width, PROJECTION_DIM, generator=gen) / math.sqrt(PROJECTION_DIM)
        return self.projection if width > PROJECTION_DIM else None

    def add(self, y: torch.Tensor, e: torch.Tensor, sketched: bool = False) -> None:
        y, e = y.float(), e.float()
        # Each token at unit root mean square, as the next layer's norm reads it: a pre-norm decoder's residual
        # stream carries a few tokens 100-1000x larger than the rest (attention sinks), whose rows would
        # otherwise be all that the moments hold.
        scale = y.pow(2).mean(1, keepdim=True).clamp_min(TINY).rsqrt()
        y, e = y * scale, e * scale
        projection = None if sketched else self.projection_for(y.shape[1])
        if projection is not None:
            y, e = y @ projection, e @ projection
        terms = [t.double() for t in (y.sum(0), e.sum(0), y.T @ y, y.T @ e, e.T @ e)]
        self.sums = terms if self.sums is None else [a + b for a, b in zip(self.sums, terms)]
        self.n += y.shape[0]

    def score(self, variant: str) -> float:
        if self.sums is None or not self.n:
            return 0.0
        # Second moments, not covariances: a quantization error that shifts every token alike (BERT's
        # one-row token-type table) is invisible once means are removed, yet it is among the most harmful.
        cyy, cye, cee = (t / self.n for t in self.sums[2:])
        # Each feature at unit second moment (as canonical correlation sees them): a few massive features of
        # the residual stream would otherwise hide the change of every other one.
        moments = torch.diagonal(cyy)
        inv = moments.clamp_min(float(moments.mean()) * FEATURE_FLOOR + TINY).rsqrt()
        unit = inv[:, None] * inv[None, :]
        cyy, cye, cee = cyy * unit, cye * unit, cee * unit
        # The quantized output q = y + e: its second moment and its cross-moment with y.
        cyq, cqq = cyy + cye, cyy + cye + cye.T + cee
        if variant == "cka":
            return linear_cka_distance(cyy, cyq, cqq)
        return canonical_score(cyy, cyq, cqq, self.n, variant)


@contextlib.contextmanager
def _one_thread() -> Iterator[None]:
    """Small eigenproblems: with several threads on a busy machine each took 50x longer."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def linear_cka_distance(cyy: torch.Tensor, cyq: torch.Tensor, cqq: torch.Tensor) -> float:
    """1 - linear CKA of y and q from their (uncentred) feature moments: 1 - |Y'Q|^2 / (|Y'Y| |Q'Q|)."""
    denominator = float(cyy.norm() * cqq.norm())
    if denominator <= 0:
        return 0.0  # a constant-zero output has nothing to lose
    return float(1.0 - (cyq * cyq).sum() / denominator)


def _eigh(cov: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Eigenvalues (ascending) and eigenvectors (columns) of `cov`, symmetrised against rounding."""
    values, vectors = torch.linalg.eigh((cov + cov.T) / 2)
    return values, vectors


def _principal(cov: torch.Tensor, n_rows: int, variant: str) -> torch.Tensor:
    """The top principal directions of the FP32 output (columns), at most MAX_COMPONENTS and n_rows / 4."""
    values, vectors = _eigh(cov)
    values, vectors = values.flip(0).clamp_min(0.0), vectors.flip(1)
    if values[0] <= 0:
        return vectors[:, :0]
    k = min(MAX_COMPONENTS, max(1, n_rows // 4), int((values > values[0] * EIGEN_FLOOR).sum()))
    if variant == "svcca":
        explained = torch.cumsum(values, 0) / values.sum()
        k = min(k, int(torch.searchsorted(explained, torch.tensor(SVCCA_VARIANCE, dtype=values.dtype))) + 1)
    return vectors[:, :k]


def _whitener(cov: torch.Tensor) -> torch.Tensor:
    values, vectors = _eigh(cov)
    keep = values > values.max() * EIGEN_FLOOR
    return vectors[:, keep] / values[keep].sqrt()


def canonical_score(cyy: torch.Tensor, cyq: torch.Tensor, cqq: torch.Tensor, n_rows: int, variant: str) -> float:
    """1 - mean canonical correlation of y and q within y's top principal subspace (PWCCA: weighted).

    Both sides are projected on the same principal directions, those of the FP32 output: with a
    basis of its own for q, nearly equal eigenvalues let the two bases turn against each other, and
    that mismatch, not the quantization error, dominated 1 - rho (Spearman against the oracle swung
    between 0.56 and 0.88 with the number of components on MiniLM; shared, 0.77-0.84).
    """
    with _one_thread():
        basis = _principal(cyy, n_rows, variant)
        if not basis.shape[1]:
            return 0.0  # a constant output has nothing to lose
        a, c, b = (basis.T @ m @ basis for m in (cyy, cyq, cqq))
        wa, wb = _whitener(a), _whitener(b)
        left, rho, _ = torch.linalg.svd(wa.T @ c @ wb, full_matrices=False)
        rho = rho.clamp(0.0, 1.0)
        if variant != "pwcca":
            return float(1.0 - rho.mean())
        # PWCCA: weight each canonical pair by how much of y projects on its variate.
        loadings = (a @ (wa @ left)).abs().sum(0)
        weights = loadings / loadings.sum()
        return float(1.0 - (weights * rho).sum())
