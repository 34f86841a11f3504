"""TDMPQ: a second-order Taylor estimate of the task-loss change under each layer's 4-bit error.

For a layer with weight W and quantization error δ = fake_quantize(W, 4) - W (the exporter's own
quantizer), ΔL ≈ g·δ + ½ Σ F·δ², with g the mean gradient of the task loss and F the diagonal of
its Gauss-Newton matrix (the true Fisher for cross-entropy and KL), or a Hutchinson estimate of the
Hessian diagonal (z ⊙ Hz, one extra double-backward per batch). Gradients for every layer come
from one backward pass per calibration batch (the reference code perturbed one weight by unit noise
and read the sum of logits instead).

Two choices that differ from the textbook recipe, both measured (docs/ARCHITECTURE.md):
- Under the default task losses (KL or cosine to the FP32 outputs) g = 0 at FP32, so the score is
  the curvature term alone. Under a language model's `--lm-loss ce` the first-order term keeps its
  sign: 4-bit rounding of some layers lowers the calibration text's loss, and the CE oracle measures
  exactly that (with |g·δ| Spearman 0.46 against it on the small LM, signed 0.99) — but that sign
  does not carry to other text, which is why KL is the default.
- F is the Gauss-Newton diagonal, from a backward pass on labels drawn from the model's own
  prediction (task_loss.TaskLoss.curvature_objective), not the square of the batch gradient: that
  "empirical Fisher" underestimates the curvature by about the number of tokens per batch. Each
  batch costs one backward (about 3 forward passes); under `ce`, F on every 4th batch and g on the
  others. The full quadratic form (Σ g·δ)² with the same sampled labels (an unbiased estimate of
  δᵀFδ) ranked worse than the diagonal on the small LM (0.93 against 0.99). Under the default losses the
  pass reads the first half of the batches (CURVATURE_FRACTION): it ranks as well, at half the cost.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.checkpoint import checkpoint
from torch.utils.hooks import RemovableHandle

from ..layer_graph import Layer, LayerGraph, block_container
from .calibration import CalibrationSet
from .common import allocation_units, progress_bar, quantized_weight, transformer_blocks, weight_param
from .task_loss import TaskLoss

PROBE_BITS = 4  # the error that matters most for allocation: the cheapest width
# Language models under --lm-loss ce: the Gauss-Newton backward runs on every 4th batch (from the first), the
# gradient on the others, so that every batch costs one backward. A diagonal summed over a layer's weights needs few samples.
# Measured on the trained small LM (8 batches): Spearman 0.94 at 2.9 FPE; with the gradient on every batch
# too, 0.98 at 3.6 FPE, and 4.4 on OPT-125M (4 batches), over the 4 FPE goal.
LM_CURVATURE_EVERY = 4
# Under the default task losses (KL, cosine: g = 0, the score is the curvature term) the pass reads the first half of
# the calibration batches. Spearman against the oracle, all / half / a quarter of the samples: MiniLM 0.993 / 0.994 /
# 0.992, small LM 0.994 / 0.993 / 0.992, SmolLM2 at block granularity 0.928 / 0.922 / 0.922; half the cost (the
# backward passes are ~3 FPE over the whole set).
CURVATURE_FRACTION = 1 / 2
# Models whose weights take more than this (2 GB: where the export takes its streaming path) recompute each block's
# activations in the backward (`recomputed_in_backward`): +1 forward per backward, ~0.5 FPE, where keeping every
# block's activations costs memory (2.75 GB of the TDMPQ step on OPT-2.7B); smaller models keep them.
RECOMPUTE_ABOVE_BYTES = 2**31


def tdmpq_scores(model: torch.nn.Module, graph: LayerGraph, calib: CalibrationSet, loss: TaskLoss,
                 granularity: str = "layer", block_size: int = 32, clip: str = "absmax",
                 curvature: str = "fisher", seed: int = 0, progress: bool = True,
                 hot_rows: dict[str, list[int]] | None = None) -> dict[str, float]:
    """`hot_rows`: embedding rows the export keeps at 8 bits (passes/hot_rows.py), whose δ is the 8-bit error."""
    units = allocation_units(graph, granularity)
    errors = _ProbeErrors(model, units, block_size, clip, hot_rows or {})
    targets = errors.params
    # Per parameter, summed over batches with the batch weights: g·δ and Σ F·δ².
    first = dict.fromkeys(targets, 0.0)
    second = dict.fromkeys(targets, 0.0)
    zero_gradient = loss.has_zero_gradient_at_reference()
    gen = torch.Generator().manual_seed(seed)
    saved_flags = {p: p.requires_grad for p in model.parameters()}
    for p in model.parameters():
        p.requires_grad_(p in errors.layers)
    reducer = _GradientReducer(targets, errors, first, second) if curvature == "fisher" else None
    # Sparse embedding gradients: a dense one is a second copy of the (often largest) table.
    sparse_before = {m: m.sparse for m in model.modules() if isinstance(m, torch.nn.Embedding)}
    if reducer is not None:
        for module in sparse_before:
            module.sparse = True
    # Hutchinson differentiates twice; only the math attention kernel has a double backward on CPU. A large
    # model's one backward (Fisher) recomputes each block's activations from its input instead of keeping them all.
    large = sum(p.numel() * p.element_size() for p in model.parameters()) > RECOMPUTE_ABOVE_BYTES
    blocks = transformer_blocks(model, block_container(model) if graph.num_blocks and large else None)
    kernel = sdpa_kernel(SDPBackend.MATH) if curvature == "hutchinson" else recomputed_in_backward(blocks)
    curvature_weight = first_weight = 0.0
    # The curvature alone (the default losses) needs few samples: the first CURVATURE_FRACTION of the batches.
    used = len(calib.batches) if not zero_gradient else max(1, math.ceil(len(calib.batches) * CURVATURE_FRACTION))
    single_batch = used == 1
    try:
        with progress_bar(progress) as bar, kernel:
            task = bar.add_task("TDMPQ backward", total=used)
            for index in range(used):
                weight = loss.batch_weight(index)
                output = loss.output(model, index)
                if reducer is None:
                    _hutchinson_step(loss.loss_of(output, index), targets, errors, first, second, weight, gen)
                    curvature_weight += weight
                else:
                    with_curvature = zero_gradient or index % LM_CURVATURE_EVERY == 0
                    # One backward per batch: the gradient on most batches, the curvature on every 4th
                    # (both on a lone batch).
                    if not zero_gradient and (not with_curvature or single_batch):
                        reducer.backward(loss.loss_of(output, index), weight, "first", retain_graph=with_curvature)
                        first_weight += weight
                    if with_curvature:
                        reducer.backward(loss.curvature_objective(output, index, gen), weight, "second")
                        curvature_weight += weight
                del output
                bar.advance(task)
    finally:
        if reducer is not None:
            reducer.close()
        for module, sparse in sparse_before.items():
            module.sparse = sparse
        for p, flag in saved_flags.items():
            p.requires_grad_(flag)
            p.grad = None
    rescale = 1.0 / curvature_weight if curvature_weight else 0.0  # the batches that estimated F stand for all
    scores: dict[str, float] = {}
    for unit, layers in units.items():
        unit_params = {weight_param(model, layer): None for layer in layers}
        scale_first = 1.0 / first_weight if first_weight else 0.0
        scores[unit] = sum(scale_first * first[p] + 0.5 * rescale * second[p] for p in unit_params)
    return scores


@contextlib.contextmanager
def recomputed_in_backward(blocks: list[torch.nn.Module]) -> Iterator[None]:
    """Each block's forward under activation checkpointing: the backward pass keeps each block's input and
    recomputes what is inside it when it gets there. The activations of every block at once were most of the
    pass's memory (2.75 GB more on OPT-2.7B's 32 blocks at 8 × 128 tokens); the cost is one more forward pass per
    backward, and the gradients are the same (the recomputation runs the same kernels on the same inputs)."""
    own = {block: block.__dict__.get("forward") for block in blocks}  # a forward set on the instance (a hook's)
    for block in blocks:
        forward = block.forward

        def checkpointed(*args: Any, _forward: Callable[..., Any] = forward, **kwargs: Any) -> Any:
            return checkpoint(_forward, *args, use_reentrant=False, **kwargs)

        block.forward = checkpointed
    try:
        yield
    finally:
        for block, hooked in own.items():
            if hooked is None:
                del block.forward  # the class's forward again
            else:
                block.forward = hooked


class _ProbeErrors:
    """Each target parameter's 4-bit error δ = quantized − W (the exporter's quantizer; 8-bit for an embedding's
    hot rows), in bfloat16, made again each time a gradient needs it rather than held for every parameter:
    holding them all was half the model's size for the whole pass. A score needs 3 significant digits, and
    the values are the same each time, so the scores are too."""

    def __init__(self, model: torch.nn.Module, units: dict[str, list[Layer]], block_size: int, clip: str,
                 hot_rows: dict[str, list[int]]) -> None:
        self.model, self.block_size, self.clip, self.hot_rows = model, block_size, clip, hot_rows
        self.layers: dict[torch.nn.Parameter, Layer] = {}  # each target parameter, with the first layer that reads it
        for layers in units.values():
            for layer in layers:
                self.layers.setdefault(weight_param(model, layer), layer)
        self.params = list(self.layers)

    def of(self, param: torch.nn.Parameter) -> torch.Tensor:
        layer = self.layers[param]
        quantized = quantized_weight(self.model, layer, PROBE_BITS, self.block_size, self.clip,
                                     self.hot_rows.get(layer.name))
        return quantized.sub_(param.detach()).to(torch.bfloat16)


class _GradientReducer:
    """Each gradient is reduced to one number as soon as it is ready: g·δ, or Σ (g·δ)² = Σ g²δ².

    A post-accumulate-grad hook does it and frees the gradient, so at most a few gradients exist
    at once, never a copy of the model.
    """

    def __init__(self, targets: list[torch.nn.Parameter], errors: _ProbeErrors,
                 first: dict[torch.nn.Parameter, float], second: dict[torch.nn.Parameter, float]) -> None:
        self.weight, self.term = 0.0, "first"
        # torch leaves Tensor.register_post_accumulate_grad_hook unannotated
        self.handles: list[RemovableHandle] = [
            p.register_post_accumulate_grad_hook(self._hook(p, errors, first, second))  # type: ignore[no-untyped-call]
            for p in targets]

    def _hook(self, param: torch.nn.Parameter, errors: _ProbeErrors, first: dict[torch.nn.Parameter, float],
              second: dict[torch.nn.Parameter, float]) -> Callable[[torch.Tensor], None]:
        def reduce(p: torch.Tensor) -> None:
            grad = p.grad
            assert grad is not None  # the hook runs once the gradient has been accumulated
            error = errors.of(param)
            if grad.is_sparse:  # an embedding's gradient: only the rows of the batch's tokens
                grad = grad.coalesce()
                product = grad.values().mul_(error[grad.indices()[0]]).flatten()
            else:
                product = grad.mul_(error).flatten()  # in place: no second model-sized tensor
            if self.term == "first":
                first[param] += self.weight * float(product.sum())
            else:
                second[param] += self.weight * float(torch.dot(product, product))
            p.grad = None
            del error
        return reduce

    def backward(self, objective: torch.Tensor, weight: float, term: str, retain_graph: bool = False) -> None:
        self.weight, self.term = weight, term
        torch.autograd.backward(objective, retain_graph=retain_graph)  # objective.backward(), annotated

    def close(self) -> None:
        for handle in self.handles:
            handle.remove()


def _hutchinson_step(objective: torch.Tensor, targets: list[torch.nn.Parameter],
                     errors: _ProbeErrors, first: dict[torch.nn.Parameter, float],
                     second: dict[torch.nn.Parameter, float], weight: float, gen: torch.Generator) -> None:
    """d = z ⊙ Hz with Rademacher z: one double backward, so all gradients are held at once here."""
    # allow_unused: a layer the loss never reads (BERT's pooler under mean pooling) has g = 0.
    grads = torch.autograd.grad(objective, targets, create_graph=True, allow_unused=True, materialize_grads=True)
    probes = [torch.randint(0, 2, p.shape, generator=gen).to(p.dtype) * 2 - 1 for p in targets]
    used = [i for i, g in enumerate(grads) if g.requires_grad]
    hessian_probes = torch.autograd.grad([grads[i] for i in used], targets, grad_outputs=[probes[i] for i in used],
                                         allow_unused=True, materialize_grads=True)
    for p, g, z, hz in zip(targets, grads, probes, hessian_probes):
        error = errors.of(p).float()
        first[p] += weight * float((g.detach() * error).sum())
        second[p] += weight * float((z * hz * error.square()).sum())
