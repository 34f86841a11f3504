"""The one task loss every pass measures damage with (PMPQ, TDMPQ, the oracle).

It needs no labels: causal and masked LMs use their own training objective on the calibration
text; classifiers and feature extractors are compared with the FP32 model's outputs, computed
once here and reused by every pass.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..model_loading import TASK_CAUSAL_LM, TASK_CLASSIFICATION, TASK_MASKED_LM
from .calibration import CalibrationSet

MLM_MASK_FRACTION = 0.15


def mean_pool(hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    weights = mask.unsqueeze(-1).to(hidden.dtype)
    return (hidden * weights).sum(1) / weights.sum(1).clamp_min(1.0)


class TaskLoss:
    """`batch_loss(model, i)` (differentiable) and `evaluate(model)` over the calibration set."""

    def __init__(self, loaded, calib: CalibrationSet, seed: int = 0):
        self.task = loaded.task
        self.calib = calib
        self.inputs = [dict(b) for b in calib.batches]  # what the model is fed (MLM: with [MASK]s)
        self.targets: list[torch.Tensor] = []  # MLM labels, or FP32 reference outputs
        if self.task == TASK_MASKED_LM:
            self._make_mlm_mask(loaded, seed)
        elif self.task != TASK_CAUSAL_LM:
            with torch.no_grad():
                self.targets = [self._output(loaded.model, b) for b in self.inputs]

    def _make_mlm_mask(self, loaded, seed: int) -> None:
        tokenizer = loaded.tokenizer
        mask_id = tokenizer.mask_token_id if tokenizer is not None and tokenizer.mask_token_id is not None \
            else int(loaded.config.vocab_size) - 1
        gen = torch.Generator().manual_seed(seed + 1)
        for batch in self.inputs:
            real = batch["attention_mask"].bool().clone()
            if tokenizer is not None:  # never mask [CLS] / [SEP]
                real[:, 0] = False
                real[torch.arange(real.shape[0]), batch["attention_mask"].sum(1) - 1] = False
            chosen = (torch.rand(real.shape, generator=gen) < MLM_MASK_FRACTION) & real
            # At least one masked token per row with real tokens, so every sample contributes.
            first_real = real.float().argmax(1)
            chosen[torch.arange(real.shape[0]), first_real] |= real.any(1)
            labels = torch.where(chosen, batch["input_ids"], torch.full_like(batch["input_ids"], -100))
            batch["input_ids"] = torch.where(chosen, torch.full_like(batch["input_ids"], mask_id), batch["input_ids"])
            self.targets.append(labels)

    def _output(self, model, batch) -> torch.Tensor:
        # No KV cache: nothing reads it, and blocks replayed by BlockReplay could not fill it.
        extra = {"use_cache": False} if self.task == TASK_CAUSAL_LM else {}
        out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], **extra)
        if self.task == TASK_CLASSIFICATION:
            return out.logits
        if self.task in (TASK_CAUSAL_LM, TASK_MASKED_LM):
            return out.logits
        return mean_pool(out.last_hidden_state, batch["attention_mask"])

    def batch_loss(self, model, index: int) -> torch.Tensor:
        batch = self.inputs[index]
        output = self._output(model, batch)
        if self.task == TASK_CAUSAL_LM:
            # Labels shifted left (last position ignored) instead of slicing the logits: no copy of them.
            labels = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100).roll(-1, dims=1)
            labels[:, -1] = -100
            return F.cross_entropy(output.flatten(0, 1), labels.flatten(), ignore_index=-100)
        if self.task == TASK_MASKED_LM:
            return F.cross_entropy(output.flatten(0, 1), self.targets[index].flatten(), ignore_index=-100)
        if self.task == TASK_CLASSIFICATION:
            reference = F.log_softmax(self.targets[index], -1)
            return F.kl_div(F.log_softmax(output, -1), reference, log_target=True, reduction="batchmean")
        return (1.0 - F.cosine_similarity(output, self.targets[index], dim=-1)).mean()

    def batch_weight(self, index: int) -> float:
        return float(self.inputs[index]["input_ids"].shape[0]) / self.calib.num_samples

    @torch.no_grad()
    def evaluate(self, model) -> float:
        """Sample-weighted mean loss over the calibration set."""
        return sum(self.batch_weight(i) * float(self.batch_loss(model, i)) for i in range(len(self.inputs)))

    def has_zero_gradient_at_reference(self) -> bool:
        """KL / cosine to the FP32 outputs are minimal (zero) at FP32: their gradient vanishes there."""
        return self.task not in (TASK_CAUSAL_LM, TASK_MASKED_LM)

    def output_for_curvature(self, model, index: int, gen: torch.Generator) -> torch.Tensor:
        """A scalar whose gradient g has E[g gᵀ] = the Gauss-Newton matrix of the loss at FP32.

        Needed because the empirical Fisher of a loss with zero gradient is zero. We draw a random
        direction u in output space with covariance = the loss's Hessian in its output, and take
        the gradient of u · output (one backward pass, same cost as the loss's own gradient).
        """
        batch = self.inputs[index]
        output = self._output(model, batch)
        if self.task == TASK_CLASSIFICATION:
            # Hessian of KL in the logits = diag(p) - p pᵀ = Cov(onehot(y)) for y ~ p: the true Fisher.
            probs = F.softmax(self.targets[index], -1)
            sampled = torch.multinomial(probs, 1, generator=gen).squeeze(-1)
            return F.cross_entropy(output, sampled, reduction="sum")
        # 1 - cos(e, r) at e = r has Hessian (I - r̂ r̂ᵀ) / |r|² in e.
        reference = self.targets[index]
        norm = reference.norm(dim=-1, keepdim=True).clamp_min(1e-12)
        unit = reference / norm
        z = torch.randn(reference.shape, generator=gen)
        direction = (z - (z * unit).sum(-1, keepdim=True) * unit) / norm
        return (direction * output).sum()
