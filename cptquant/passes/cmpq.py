"""CMPQ: canonical correlation between what a layer (or block) reads and what it writes.

A layer whose output is well predicted, linearly, from its input in the directions that carry
most of the signal does little non-trivial work and is scored robust; a low correlation means the
layer reshapes its input and is scored sensitive: score = 1 - mean canonical correlation.

Unlike the reference code (sklearn CCA on mean-pooled states, more dimensions than samples, so
every correlation saturates near 1), we use every real token (padding masked out), reduce each
side to its top principal components (k <= min(64, tokens/4)) and add a ridge to the
covariances. Everything comes from one forward pass with hooks that accumulate covariance
matrices; wide activations (> 128 features) are first mapped through a fixed seeded Gaussian
projection so the accumulators stay small.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from ..layer_graph import ROLE_EMBEDDING, LayerGraph, block_container
from .calibration import CalibrationSet
from .common import allocation_units, block_unit, forward_options, progress_bar

CCA_VARIANTS = ("cca", "svcca", "pwcca")
PROJECTION_DIM = 128  # wider activations are sketched down to this many features (2x the components kept)
MAX_COMPONENTS = 64
SVCCA_VARIANCE = 0.99
RIDGE = 0.05  # added to each retained eigenvalue, as a fraction of their mean
MAX_TOKENS = 4096  # a seeded subset of real tokens is plenty for <= 64 components and bounds the cost


class CovarianceAccumulator:
    """Running sums for the joint covariance of (x, y) over tokens, in float64."""

    def __init__(self, seed: int):
        self.seed = seed
        self.projections: dict[str, torch.Tensor | None] = {}
        self.n = 0
        self.sx = self.sy = self.sxx = self.syy = self.sxy = None

    def _project(self, side: str, values: torch.Tensor) -> torch.Tensor:
        if side not in self.projections:
            dim = values.shape[1]
            if dim > PROJECTION_DIM:
                gen = torch.Generator().manual_seed(self.seed * 2 + (side == "y"))
                self.projections[side] = torch.randn(dim, PROJECTION_DIM, generator=gen) / math.sqrt(PROJECTION_DIM)
            else:
                self.projections[side] = None
        matrix = self.projections[side]
        return values if matrix is None else values @ matrix

    def add(self, x: torch.Tensor, y: torch.Tensor) -> None:
        x = self._project("x", x.float())
        y = self._project("y", y.float())
        terms = [x.sum(0), y.sum(0), x.T @ x, y.T @ y, x.T @ y]
        terms = [t.double() for t in terms]
        if self.sx is None:
            self.sx, self.sy, self.sxx, self.syy, self.sxy = terms
        else:
            self.sx += terms[0]; self.sy += terms[1]; self.sxx += terms[2]; self.syy += terms[3]; self.sxy += terms[4]
        self.n += x.shape[0]

    def covariances(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        mx, my = self.sx / self.n, self.sy / self.n
        cxx = self.sxx / self.n - torch.outer(mx, mx)
        cyy = self.syy / self.n - torch.outer(my, my)
        cxy = self.sxy / self.n - torch.outer(mx, my)
        return cxx.numpy(), cyy.numpy(), cxy.numpy()


def _principal(cov: np.ndarray, n_tokens: int, variant: str) -> tuple[np.ndarray, np.ndarray]:
    values, vectors = np.linalg.eigh((cov + cov.T) / 2)
    order = np.argsort(values)[::-1]
    values, vectors = np.clip(values[order], 0.0, None), vectors[:, order]
    k = max(1, min(MAX_COMPONENTS, n_tokens // 4, int((values > values[0] * 1e-9).sum())))
    if variant in ("svcca", "pwcca") and values.sum() > 0:
        explained = np.cumsum(values) / values.sum()
        k = min(k, int(np.searchsorted(explained, SVCCA_VARIANCE)) + 1)
    return values[:k], vectors[:, :k]


def canonical_score(cxx: np.ndarray, cyy: np.ndarray, cxy: np.ndarray, n_tokens: int, variant: str) -> float:
    """1 - mean (or projection-weighted mean, PWCCA) canonical correlation after PCA + ridge."""
    lx, ux = _principal(cxx, n_tokens, variant)
    ly, uy = _principal(cyy, n_tokens, variant)
    if lx[0] <= 0 or ly[0] <= 0:
        return 0.0  # a constant side carries no information to lose
    dx = lx + RIDGE * lx.mean()
    dy = ly + RIDGE * ly.mean()
    cross = ux.T @ cxy @ uy
    whitened = cross / np.sqrt(dx)[:, None] / np.sqrt(dy)[None, :]
    left, rho, right_t = np.linalg.svd(whitened, full_matrices=False)
    rho = np.clip(rho, 0.0, 1.0)
    if variant != "pwcca":
        return float(1.0 - rho.mean())
    # PWCCA: weight each canonical pair by how much of the output (its principal components)
    # projects onto the output's canonical variate.
    directions = right_t.T / np.sqrt(dy)[:, None]  # canonical weights in the output's PC coordinates
    loadings = np.abs(ly[:, None] * directions).sum(0)
    weights = loadings / loadings.sum() if loadings.sum() > 0 else np.full(len(rho), 1 / len(rho))
    return float(1.0 - (weights * rho).sum())


def _rows(tensor: torch.Tensor, token_rows: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """The sampled real-token rows of an activation ([B, T, d], [B*T, d] or per-sample [B, d])."""
    flat = tensor.detach().reshape(-1, tensor.shape[-1])
    if flat.shape[0] == mask.numel():
        return flat[token_rows]
    return flat  # one row per sample (pooler, classifier head): all real


def _first_tensor(value):
    if isinstance(value, torch.Tensor):
        return value
    if isinstance(value, (tuple, list)) and value and isinstance(value[0], torch.Tensor):
        return value[0]
    return None


def cmpq_scores(model: torch.nn.Module, graph: LayerGraph, calib: CalibrationSet, granularity: str = "layer",
                variant: str = "cca", seed: int = 0, progress: bool = True) -> dict[str, float]:
    """Scores per allocation unit. Embedding tables have no input activations to correlate, so they
    take the score of block 0, the transformation their vectors feed (documented proxy)."""
    units = allocation_units(graph, granularity)
    accumulators: dict[str, CovarianceAccumulator] = {}
    handles = []
    current: list[torch.Tensor] = []  # [sampled flat token indices, attention mask] of the batch in flight

    def watch(module: torch.nn.Module, key: str, block_inputs: bool) -> None:
        acc = accumulators[key] = CovarianceAccumulator(seed + len(accumulators))

        def hook(_module, args, kwargs, output):
            x = args[0] if args else kwargs.get("hidden_states")
            y = _first_tensor(output)
            if isinstance(x, torch.Tensor) and y is not None:
                acc.add(_rows(x, *current), _rows(y, *current))

        handles.append(module.register_forward_hook(hook, with_kwargs=True))

    container = block_container(model) if graph.num_blocks else None
    blocks_container = model.get_submodule(container) if container else None
    needs_block0 = any(layers[0].role == ROLE_EMBEDDING for layers in units.values())
    for unit, layers in units.items():
        if unit.startswith("block."):
            watch(blocks_container[int(unit.split(".")[1])], unit, True)
        elif layers[0].role != ROLE_EMBEDDING:
            watch(model.get_submodule(layers[0].name), unit, False)
    if needs_block0 and block_unit(0) not in accumulators and blocks_container is not None:
        watch(blocks_container[0], block_unit(0), True)
    try:
        with torch.no_grad(), progress_bar(progress) as bar:
            task = bar.add_task("CMPQ forward", total=len(calib.batches))
            per_batch = max(1, MAX_TOKENS // len(calib.batches))
            gen = torch.Generator().manual_seed(seed)
            no_cache = forward_options(model)
            for batch in calib.batches:
                real = batch["attention_mask"].reshape(-1).nonzero().squeeze(1)
                chosen = real[torch.randperm(len(real), generator=gen)[:per_batch]].sort().values
                current[:] = [chosen, batch["attention_mask"]]
                model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], **no_cache)
                bar.advance(task)
    finally:
        for handle in handles:
            handle.remove()
    by_key = {}
    for key, acc in accumulators.items():
        by_key[key] = canonical_score(*acc.covariances(), acc.n, variant) if acc.n else 0.0
    return {unit: by_key.get(unit, by_key.get(block_unit(0), 0.0)) for unit in units}
