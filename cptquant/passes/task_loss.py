"""The one task loss every pass measures damage with (PMPQ, TDMPQ, the oracle).

It needs no labels: every model is compared with its own FP32 outputs, computed once here and
reused by every pass. Language models by the KL divergence from the FP32 next-token (or masked-
token) distribution — an encoder-decoder's decoder re-reads its input (seq2seq_inputs.py); classifiers
by KL of their logits; feature extractors by cosine distance.

Why KL and not the LM's cross-entropy on the calibration text (the `ce` objective, kept for
comparison): quantization damage is any change of what the model predicts. The change in
cross-entropy is signed, and its sign belongs to the calibration text: on the trained small LM,
rounding 11 of 26 layers to 4 bits *lowered* the calibration loss, and a plan that spends bytes
by that sign does not transfer to other text (docs/ARCHITECTURE.md, "Task loss").
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..model_loading import CLASSIFIER_TASKS, TASK_CAUSAL_LM, TASK_MASKED_LM, TASK_SEQ2SEQ, LoadedModel
from ..options import LM_OBJECTIVES
from .calibration import CalibrationSet

MLM_MASK_FRACTION = 0.15
LM_TASKS = (TASK_CAUSAL_LM, TASK_MASKED_LM, TASK_SEQ2SEQ)  # predict tokens of the text itself
# The FP32 reference of a language model is kept as its top-k probabilities plus one bin for the rest:
# KL over that coarsened distribution is a lower bound of the full KL (and 0 at FP32, with zero
# gradient), for 2 MB where the full distribution of SmolLM2's 8,192 calibration tokens is 1.6 GB.
REFERENCE_TOP_K = 64


def mean_pool(hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    weights = mask.unsqueeze(-1).to(hidden.dtype)
    return (hidden * weights).sum(1) / weights.sum(1).clamp_min(1.0)


def _sample_rows(probs: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """One class per row drawn from `probs` [rows, classes] by inverse CDF (torch.multinomial took
    1.1 s for 1,024 rows of OPT's 50,272-token vocabulary; this takes a tenth of that)."""
    cdf = probs.cumsum(-1)
    u = torch.rand(probs.shape[0], 1, generator=gen, dtype=cdf.dtype) * cdf[:, -1:]
    return torch.searchsorted(cdf, u).squeeze(-1).clamp_max(probs.shape[-1] - 1)


class TaskLoss:
    """`batch_loss(model, i)` (differentiable) and `evaluate(model)` over the calibration set."""

    def __init__(self, loaded: LoadedModel, calib: CalibrationSet, seed: int = 0, references: bool = True,
                 lm_objective: str = "kl") -> None:
        """`references=False` skips the FP32 reference pass (1 FPE); only the curvature objective works then.

        `lm_objective`: "kl" (default) or "ce", the LM's own cross-entropy on the calibration text.
        """
        if lm_objective not in LM_OBJECTIVES:
            raise ValueError(f"lm_objective must be one of {LM_OBJECTIVES}")
        self.task = loaded.task
        self.calib = calib
        self.is_lm = self.task in LM_TASKS
        self.lm_objective = lm_objective if self.is_lm else None
        self.inputs = [dict(b) for b in calib.batches]  # what the model is fed (MLM: with [MASK]s)
        self.labels: list[torch.Tensor] = []  # MLM labels
        self.targets: list[_TopK | torch.Tensor] = []  # FP32 reference outputs (LMs: a _TopK per batch)
        if self.task == TASK_MASKED_LM:
            self._make_mlm_mask(loaded, seed)
        if references and self.lm_objective != "ce":
            with torch.no_grad():
                for index, batch in enumerate(self.inputs):
                    output = self._output(loaded.model, batch)
                    self.targets.append(_TopK.of(self._predicted(output, index)) if self.is_lm else output)

    def _make_mlm_mask(self, loaded: LoadedModel, seed: int) -> None:
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
            self.labels.append(labels)

    def _output(self, model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        # No KV cache: nothing reads it, and blocks replayed by BlockReplay could not fill it.
        extra = {"use_cache": False} if self.task in (TASK_CAUSAL_LM, TASK_SEQ2SEQ) else {}
        out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], **extra)
        if self.task in CLASSIFIER_TASKS or self.task in LM_TASKS:
            logits: torch.Tensor = out.logits
            return logits
        return mean_pool(out.last_hidden_state, batch["attention_mask"])

    def output(self, model: torch.nn.Module, index: int) -> torch.Tensor:
        """What the loss reads: logits, or pooled embeddings (feature extraction)."""
        return self._output(model, self.inputs[index])

    def batch_loss(self, model: torch.nn.Module, index: int) -> torch.Tensor:
        return self.loss_of(self.output(model, index), index)

    def _lm_labels(self, index: int) -> torch.Tensor:
        """Next-token (causal) or masked-token labels, -100 where nothing is predicted."""
        if self.task == TASK_MASKED_LM:
            return self.labels[index]
        batch = self.inputs[index]
        if self.task == TASK_SEQ2SEQ:  # the decoder read the input shifted right: it predicts each input token
            return batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
        # Labels shifted left (last position ignored) instead of slicing the logits: no copy of them.
        labels = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100).roll(-1, dims=1)
        labels[:, -1] = -100
        return labels

    def _predicting(self, index: int) -> torch.Tensor:
        """Which of the batch's flattened positions predict a token."""
        return self._lm_labels(index).flatten() != -100

    def _predicted(self, logits: torch.Tensor, index: int) -> torch.Tensor:
        """The logits of the positions that predict something: [positions, vocab]."""
        return logits.flatten(0, 1)[self._predicting(index)]

    def loss_of(self, output: torch.Tensor, index: int) -> torch.Tensor:
        if self.lm_objective == "ce":
            return F.cross_entropy(output.flatten(0, 1), self._lm_labels(index).flatten(), ignore_index=-100)
        if not self.targets:
            raise RuntimeError("this TaskLoss was built without FP32 references")
        target = self.targets[index]
        if isinstance(target, _TopK):  # a language model's
            return target.kl_from(self._predicted(output, index))
        if self.task in CLASSIFIER_TASKS:  # per text, or per token (token classification)
            reference = F.log_softmax(target, -1)
            return F.kl_div(F.log_softmax(output, -1), reference, log_target=True, reduction="batchmean")
        return (1.0 - F.cosine_similarity(output, target, dim=-1)).mean()

    def batch_weight(self, index: int) -> float:
        return float(self.inputs[index]["input_ids"].shape[0]) / self.calib.num_samples

    @torch.no_grad()
    def evaluate(self, model: torch.nn.Module) -> float:
        """Sample-weighted mean loss over the calibration set."""
        return sum(self.batch_weight(i) * float(self.batch_loss(model, i)) for i in range(len(self.inputs)))

    def has_zero_gradient_at_reference(self) -> bool:
        """KL / cosine to the FP32 outputs are minimal (zero) at FP32: their gradient vanishes there."""
        return self.lm_objective != "ce"

    def curvature_objective(self, output: torch.Tensor, index: int, gen: torch.Generator) -> torch.Tensor:
        """A scalar whose gradient g has E[g gᵀ] = the Gauss-Newton matrix of this batch's loss.

        The GGN of a cross-entropy or KL is the true Fisher: the covariance of the gradient with
        labels drawn from the model's own prediction (the empirical Fisher from the batch's mean
        gradient underestimates it by about the number of tokens). For the cosine loss we draw a
        direction u in output space with covariance = the loss's Hessian in its output and take
        u · output. Terms are summed and divided by √count, so that E[g gᵀ] is the GGN of the
        mean loss. The model must be at FP32: its own output stands in for the reference.
        """
        reference = output.detach()
        if self.task in LM_TASKS + CLASSIFIER_TASKS:
            flat = output.flatten(0, -2)
            sampled = _sample_rows(F.softmax(reference.flatten(0, -2), -1), gen)
            if self.task in CLASSIFIER_TASKS:
                count = flat.shape[0]
            else:
                keep = self._predicting(index)
                sampled = sampled.masked_fill(~keep, -100)
                count = int(keep.sum())
            root_count: float = max(count, 1) ** 0.5
            return F.cross_entropy(flat, sampled, ignore_index=-100, reduction="sum") / root_count
        # 1 - cos(e, r) at e = r has Hessian (I - r̂ r̂ᵀ) / |r|² in e.
        norm: torch.Tensor = reference.norm(dim=-1, keepdim=True).clamp_min(1e-12)
        unit = reference / norm
        z = torch.randn(reference.shape, generator=gen)
        direction = (z - (z * unit).sum(-1, keepdim=True) * unit) / norm
        root_rows: float = reference.shape[0] ** 0.5
        return (direction * output).sum() / root_rows


class _TopK:
    """An FP32 next-token distribution kept as its top-k log-probabilities and the log-mass of the rest."""

    def __init__(self, log_probs: torch.Tensor, indices: torch.Tensor, log_rest: torch.Tensor) -> None:
        self.log_probs, self.indices, self.log_rest = log_probs, indices, log_rest

    @classmethod
    def of(cls, logits: torch.Tensor) -> _TopK:
        log_probs = F.log_softmax(logits.float(), -1)
        top, indices = log_probs.topk(min(REFERENCE_TOP_K, log_probs.shape[-1]), -1)
        return cls(top, indices, _log_rest(top))

    def kl_from(self, logits: torch.Tensor) -> torch.Tensor:
        """Mean over positions of KL(reference ‖ softmax(logits)) on the top-k bins and the rest."""
        log_q = F.log_softmax(logits, -1).gather(-1, self.indices)
        p = self.log_probs.exp()
        kl = (p * (self.log_probs - log_q)).sum(-1)
        kl = kl + self.log_rest.exp() * (self.log_rest - _log_rest(log_q))
        return kl.mean()


def _log_rest(top_log_probs: torch.Tensor) -> torch.Tensor:
    """log(1 - Σ exp(top)), kept finite where the top bins hold (almost) all the mass."""
    return torch.log1p(-top_log_probs.exp().sum(-1).clamp_max(1 - 1e-6))
