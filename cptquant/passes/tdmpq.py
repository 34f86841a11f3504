"""TDMPQ: a second-order Taylor estimate of the task-loss increase under each layer's 4-bit error.

For a layer with weight W and quantization error δ = fake_quantize(W, 4) - W (the exporter's own
quantizer), ΔL ≈ |Σ g·δ| + ½ Σ F·δ², with g the mean gradient and F the diagonal curvature:
the empirical Fisher (mean of per-batch g², default) or a Hutchinson estimate of the Hessian
diagonal (z ⊙ Hz, one extra double-backward per batch). Gradients for every layer come from one
backward pass per calibration batch (the reference code perturbed one weight by unit noise and
read the sum of logits instead).

Losses measured against the FP32 outputs (classification KL, feature cosine) have exactly zero
gradient at FP32, so their first-order term and empirical Fisher vanish. For them the backward
pass runs on a random output direction whose gradient has the loss's Gauss-Newton matrix as
covariance (task_loss.TaskLoss.output_for_curvature); F is then the Gauss-Newton diagonal.
"""

from __future__ import annotations

import contextlib

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

from ..layer_graph import LayerGraph
from .calibration import CalibrationSet
from .common import allocation_units, progress_bar, quantized_weight, weight_param
from .task_loss import TaskLoss

CURVATURES = ("fisher", "hutchinson")
PROBE_BITS = 4  # the error that matters most for allocation: the cheapest width


def tdmpq_scores(model: torch.nn.Module, graph: LayerGraph, calib: CalibrationSet, loss: TaskLoss,
                 granularity: str = "layer", block_size: int = 32, clip: str = "absmax",
                 curvature: str = "fisher", seed: int = 0, progress: bool = True) -> dict[str, float]:
    units = allocation_units(graph, granularity)
    # parameter -> its 4-bit error δ, kept in bfloat16: a score needs 3 significant digits, and
    # half the memory keeps the pass within 2x the model (no gradient or curvature buffers either).
    errors: dict[torch.nn.Parameter, torch.Tensor] = {}
    for layers in units.values():
        for layer in layers:
            param = weight_param(model, layer)
            if param not in errors:
                quantized = quantized_weight(model, layer, PROBE_BITS, block_size, clip)
                errors[param] = (quantized - param.detach()).to(torch.bfloat16)
                del quantized
    targets = list(errors)
    # Per parameter, summed over batches with the batch weights: g·δ and Σ d·δ² (d: curvature diagonal).
    first = dict.fromkeys(targets, 0.0)
    second = dict.fromkeys(targets, 0.0)
    zero_gradient = loss.has_zero_gradient_at_reference()
    gen = torch.Generator().manual_seed(seed)
    saved_flags = {p: p.requires_grad for p in model.parameters()}
    for p in model.parameters():
        p.requires_grad_(p in errors)
    step = _FisherStep(targets, errors, first, second, zero_gradient) if curvature == "fisher" else None
    # Hutchinson differentiates twice; only the math attention kernel has a double backward on CPU.
    kernel = sdpa_kernel(SDPBackend.MATH) if curvature == "hutchinson" else contextlib.nullcontext()
    try:
        with progress_bar(progress) as bar, kernel:
            task = bar.add_task("TDMPQ backward", total=len(calib.batches))
            for index in range(len(calib.batches)):
                weight = loss.batch_weight(index)
                objective = loss.output_for_curvature(model, index, gen) if zero_gradient \
                    else loss.batch_loss(model, index)
                if step is not None:
                    step.run(objective, weight)
                else:
                    _hutchinson_step(objective, targets, errors, first, second, weight, zero_gradient, gen)
                bar.advance(task)
    finally:
        if step is not None:
            step.close()
        for p, flag in saved_flags.items():
            p.requires_grad_(flag)
            p.grad = None
    scores = {}
    for unit, layers in units.items():
        unit_params = {weight_param(model, layer): None for layer in layers}
        scores[unit] = abs(sum(first[p] for p in unit_params)) + 0.5 * sum(second[p] for p in unit_params)
    return scores


class _FisherStep:
    """One backward pass per batch; each gradient is reduced to two numbers as soon as it is ready.

    A post-accumulate-grad hook takes g·δ and Σ (g·δ)² (= Σ g²δ², the empirical Fisher term) and
    frees the gradient, so at most a few gradients exist at once, never a copy of the model.
    """

    def __init__(self, targets, errors, first, second, zero_gradient):
        self.weight = 0.0
        self.handles = [p.register_post_accumulate_grad_hook(self._hook(p, errors[p], first, second, zero_gradient))
                        for p in targets]

    def _hook(self, param, error, first, second, zero_gradient):
        def reduce(p):
            product = p.grad * error
            if not zero_gradient:
                first[param] += self.weight * float(product.sum())
            second[param] += self.weight * float(product.square().sum())
            p.grad = None
        return reduce

    def run(self, objective: torch.Tensor, weight: float) -> None:
        self.weight = weight
        objective.backward()

    def close(self) -> None:
        for handle in self.handles:
            handle.remove()


def _hutchinson_step(objective, targets, errors, first, second, weight, zero_gradient, gen) -> None:
    """d = z ⊙ Hz with Rademacher z: one double backward, so all gradients are held at once here."""
    # allow_unused: a layer the loss never reads (BERT's pooler under mean pooling) has g = 0.
    grads = torch.autograd.grad(objective, targets, create_graph=True, allow_unused=True, materialize_grads=True)
    probes = [torch.randint(0, 2, p.shape, generator=gen).to(p.dtype) * 2 - 1 for p in targets]
    used = [i for i, g in enumerate(grads) if g.requires_grad]
    hessian_probes = torch.autograd.grad([grads[i] for i in used], targets, grad_outputs=[probes[i] for i in used],
                                         allow_unused=True, materialize_grads=True)
    for p, g, z, hz in zip(targets, grads, probes, hessian_probes):
        error = errors[p].float()
        if not zero_gradient:
            first[p] += weight * float((g.detach() * error).sum())
        second[p] += weight * float((z * hz * error.square()).sum())
