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
    params: dict[torch.nn.Parameter, torch.Tensor] = {}  # parameter -> its 4-bit error δ
    for layers in units.values():
        for layer in layers:
            param = weight_param(model, layer)
            if param not in params:
                params[param] = quantized_weight(model, layer, PROBE_BITS, block_size, clip) - param.detach()
    targets = list(params)
    gradient_sum = {p: torch.zeros_like(p) for p in targets}
    curvature_sum = {p: torch.zeros_like(p) for p in targets}
    zero_gradient = loss.has_zero_gradient_at_reference()
    gen = torch.Generator().manual_seed(seed)
    saved_flags = {p: p.requires_grad for p in model.parameters()}
    for p in model.parameters():
        p.requires_grad_(p in params)
    # Hutchinson differentiates twice; only the math attention kernel has a double backward on CPU.
    kernel = sdpa_kernel(SDPBackend.MATH) if curvature == "hutchinson" else contextlib.nullcontext()
    try:
        with progress_bar(progress) as bar, kernel:
            task = bar.add_task("TDMPQ backward", total=len(calib.batches))
            for index in range(len(calib.batches)):
                weight = loss.batch_weight(index)
                objective = loss.output_for_curvature(model, index, gen) if zero_gradient \
                    else loss.batch_loss(model, index)
                # allow_unused: a layer the loss never reads (BERT's pooler under mean pooling) has g = 0.
                grads = torch.autograd.grad(objective, targets, create_graph=curvature == "hutchinson",
                                            allow_unused=True, materialize_grads=True)
                if curvature == "hutchinson":
                    probes = [torch.randint(0, 2, p.shape, generator=gen).to(p.dtype) * 2 - 1 for p in targets]
                    used = [i for i, g in enumerate(grads) if g.requires_grad]
                    hessian_probes = torch.autograd.grad([grads[i] for i in used], targets,
                                                         grad_outputs=[probes[i] for i in used],
                                                         allow_unused=True, materialize_grads=True)
                    diagonals = [z * hz for z, hz in zip(probes, hessian_probes)]
                else:
                    diagonals = [g.detach() ** 2 for g in grads]
                for p, g, d in zip(targets, grads, diagonals):
                    if not zero_gradient:
                        gradient_sum[p] += weight * g.detach()
                    curvature_sum[p] += weight * d.detach()
                bar.advance(task)
    finally:
        for p, flag in saved_flags.items():
            p.requires_grad_(flag)
    scores = {}
    for unit, layers in units.items():
        unit_params = {weight_param(model, layer): None for layer in layers}
        first = sum(float((gradient_sum[p] * params[p]).sum()) for p in unit_params)
        second = sum(float((curvature_sum[p] * params[p] ** 2).sum()) for p in unit_params)
        scores[unit] = abs(first) + 0.5 * second
    return scores
