"""Quality of an exported model against its baselines, by task, on held-out text.

Every variant (the quantized model, the FP32 and FP16 baselines) runs the same inputs on the same
adapter; `compare` then states the quantized model's figures against each baseline.

- causal LM: perplexity with a sliding window (no KV cache: each window is one full forward pass
  from an empty past), the mean KL divergence of the next-token distribution from the baseline's,
  and top-1 next-token agreement with the baseline on the same tokens;
- classification: accuracy when labels are given, else agreement with the baseline's argmax;
- feature extraction: cosine of mask-aware mean-pooled embeddings, and nearest-neighbour agreement;
- masked LM: accuracy at recovering masked tokens, and top-1 agreement on the masked positions.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import onnxruntime as ort

from ..errors import CptqError
from ..model_loading import (
    TASK_CAUSAL_LM,
    TASK_CLASSIFICATION,
    TASK_FEATURES,
    TASK_MASKED_LM,
    TASK_TOKEN_CLASSIFICATION,
)
from ..onnx_io.inputs import feeds_for
from ..progress import progress_bar
from .base import RuntimeAdapter
from .encoder_outputs import (
    class_logits,
    cosines,
    encoder_batches,
    masked_batches,
    masked_top1,
    mean_pooled,
    nearest_neighbours,
)
from .eval_text import EvalSet, TextEncoder, evaluation_texts, load_eval_file
from .lm_scores import TokenScores, kl_divergence, log_softmax, score_tokens, score_variants, token_stream, window_spans

# Names other modules import from here (bench/llm_quality.py, bench/__main__.py, api.py, tests).
_log_softmax = log_softmax
__all__ = ["EvalSet", "Quality", "QualitySettings", "TextEncoder", "TokenScores", "evaluation_texts", "kl_divergence",
           "load_eval_file", "measure_quality", "score_tokens", "score_variants", "token_stream", "window_spans"]


@dataclass
class QualitySettings:
    n_texts: int
    max_length: int = 128
    lm_tokens: int = 2048
    lm_window: int = 128
    lm_stride: int = 64

    @classmethod
    def for_mode(cls, quick: bool) -> QualitySettings:
        if quick:
            return cls(n_texts=64, lm_tokens=512, lm_window=128, lm_stride=64)
        return cls(n_texts=400, lm_tokens=2048, lm_window=256, lm_stride=128)


@dataclass
class Quality:
    """Per-variant figures, and the quantized model's figures against each baseline."""

    task: str
    n_examples: int
    variants: dict[str, dict[str, float]] = field(default_factory=dict)
    vs: dict[str, dict[str, float]] = field(default_factory=dict)  # baseline name -> metrics
    settings: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {"task": self.task, "n_examples": self.n_examples, "settings": self.settings,
                "variants": self.variants, **{f"vs_{name}": metrics for name, metrics in self.vs.items()}}


def _round(x: float) -> float:
    return float(round(float(x), 6))


def _causal_lm(ctx: _Context) -> Quality:
    s = ctx.settings
    window = min(s.lm_window, ctx.max_positions)
    stride = min(s.lm_stride, window)
    ids = token_stream(ctx.encoder, ctx.eval_set.texts, s.lm_tokens)
    if len(ids) < 2:
        raise CptqError("the evaluation text is too short for perplexity (fewer than 2 tokens)")
    with progress_bar(ctx.progress) as bar:  # all variants window by window: KL needs them side by side
        bar.add_task(f"quality on {ctx.adapter.name}", total=None)
        raw, kl = score_variants(ctx.adapter, ctx.sessions, ids, window, stride, ctx.candidate)
    quality = Quality(TASK_CAUSAL_LM, int(len(raw[ctx.candidate].nll)),
                      settings={"tokens": int(len(ids)), "window": window, "stride": stride})
    quality.variants = {n: {"perplexity": _round(scores.perplexity)} for n, scores in raw.items()}
    cand = raw[ctx.candidate]
    for base in ctx.baselines:
        quality.vs[base] = {"ppl_increase": _round(cand.perplexity / raw[base].perplexity - 1.0),
                            "kl_divergence": _round(kl[base].mean()),
                            "top1_agreement": _round(np.mean(cand.top1 == raw[base].top1))}
    return quality


def _features(ctx: _Context) -> Quality:
    raw = ctx.run_all(lambda session: mean_pooled(ctx.adapter, session, ctx.encoder, ctx.eval_set.texts, ctx.max_length))
    quality = Quality(TASK_FEATURES, len(ctx.eval_set.texts), settings={"max_length": ctx.max_length})
    quality.variants = {n: {} for n in raw}
    cand = raw[ctx.candidate]
    for base in ctx.baselines:
        cos = cosines(cand, raw[base])
        same_nn = nearest_neighbours(cand) == nearest_neighbours(raw[base])
        quality.vs[base] = {"mean_cosine": _round(cos.mean()), "min_cosine": _round(cos.min()),
                            "nn_agreement": _round(same_nn.mean())}
    return quality


def _classification(ctx: _Context) -> Quality:
    raw = ctx.run_all(lambda session: class_logits(ctx.adapter, session, ctx.encoder, ctx.eval_set.texts,
                                                   ctx.max_length).argmax(axis=-1))
    labels = _label_ids(ctx.eval_set.labels, ctx.config) if ctx.eval_set.labels is not None else None
    quality = Quality(TASK_CLASSIFICATION, len(ctx.eval_set.texts),
                      settings={"max_length": ctx.max_length, "labels": labels is not None})
    quality.variants = {n: ({"accuracy": _round(np.mean(p == labels))} if labels is not None else {})
                        for n, p in raw.items()}
    for base in ctx.baselines:
        agreement = float(np.mean(raw[ctx.candidate] == raw[base]))
        # Without labels the baseline's predictions are the labels: the drop is the disagreement.
        drop = (quality.variants[base]["accuracy"] - quality.variants[ctx.candidate]["accuracy"]
                if labels is not None else 1.0 - agreement)
        quality.vs[base] = {"accuracy_drop": _round(drop), "agreement": _round(agreement)}
    return quality


def _token_classification(ctx: _Context) -> Quality:
    """Per-token labels: the baseline's predictions are the labels, over the real (unpadded) tokens."""
    def predict(session: ort.InferenceSession) -> np.ndarray:
        return np.concatenate([ctx.adapter.run(session, feeds_for(session, ids, mask))["logits"].argmax(-1)[mask == 1]
                               for ids, mask in encoder_batches(ctx.encoder, ctx.eval_set.texts, ctx.max_length)])

    raw = ctx.run_all(predict)
    quality = Quality(TASK_TOKEN_CLASSIFICATION, int(len(raw[ctx.candidate])), settings={"max_length": ctx.max_length})
    quality.variants = {n: {} for n in raw}
    for base in ctx.baselines:
        agreement = float(np.mean(raw[ctx.candidate] == raw[base]))
        quality.vs[base] = {"accuracy_drop": _round(1.0 - agreement), "agreement": _round(agreement)}
    return quality


def _masked_lm(ctx: _Context) -> Quality:
    batches = masked_batches(ctx.encoder, ctx.eval_set.texts, ctx.max_length)
    original = np.concatenate([b.original[b.positions] for b in batches])
    raw = ctx.run_all(lambda session: masked_top1(ctx.adapter, session, batches))
    quality = Quality(TASK_MASKED_LM, int(len(original)), settings={"max_length": ctx.max_length, "mask_rate": 0.15})
    quality.variants = {n: {"accuracy": _round(np.mean(p == original))} for n, p in raw.items()}
    for base in ctx.baselines:
        quality.vs[base] = {
            "accuracy_drop": _round(quality.variants[base]["accuracy"] - quality.variants[ctx.candidate]["accuracy"]),
            "top1_agreement": _round(np.mean(raw[ctx.candidate] == raw[base]))}
    return quality


@dataclass
class _Context:
    adapter: RuntimeAdapter
    sessions: dict[str, ort.InferenceSession]
    encoder: TextEncoder
    config: object
    settings: QualitySettings
    eval_set: EvalSet
    candidate: str
    progress: bool

    @property
    def baselines(self) -> list[str]:
        return [name for name in self.sessions if name != self.candidate]

    @property
    def max_positions(self) -> int:
        return int(getattr(self.config, "max_position_embeddings", 0) or self.settings.max_length)

    @property
    def max_length(self) -> int:
        return min(self.settings.max_length, self.max_positions)

    def run_all(self, measure: Callable[[ort.InferenceSession], np.ndarray]) -> dict[str, np.ndarray]:
        """measure(session) for every variant, behind one progress bar."""
        out = {}
        with progress_bar(self.progress) as bar:
            job = bar.add_task(f"quality on {self.adapter.name}", total=len(self.sessions))
            for name, session in self.sessions.items():
                out[name] = measure(session)
                bar.advance(job)
        return out


_BY_TASK = {TASK_CAUSAL_LM: _causal_lm, TASK_FEATURES: _features, TASK_CLASSIFICATION: _classification,
            TASK_MASKED_LM: _masked_lm, TASK_TOKEN_CLASSIFICATION: _token_classification}


def measure_quality(task: str, adapter: RuntimeAdapter, sessions: dict[str, ort.InferenceSession], encoder: TextEncoder,
                    config: object,
                    settings: QualitySettings, eval_set: EvalSet | None = None, candidate: str = "quantized",
                    progress: bool = True) -> Quality:
    """Run every session in `sessions` (name -> InferenceSession) on the same inputs; compare
    `candidate` against every other entry."""
    if task not in _BY_TASK:
        raise CptqError(f"no quality measure for task {task!r}")
    eval_set = eval_set or EvalSet(evaluation_texts(settings.n_texts))
    return _BY_TASK[task](_Context(adapter, sessions, encoder, config, settings, eval_set, candidate, progress))


def _label_ids(labels: list[int | str], config: object) -> np.ndarray:
    label2id = {str(k): int(v) for k, v in (getattr(config, "label2id", None) or {}).items()}
    classes = getattr(config, "num_labels", None) or len(label2id) or None
    out = []
    for label in labels:
        if isinstance(label, int) or (isinstance(label, str) and label.lstrip("-").isdigit()):
            if classes is not None and not 0 <= int(label) < classes:  # would count as a miss, silently
                raise CptqError(f"--eval label {label} is outside the model's {classes} classes (0 to {classes - 1})")
            out.append(int(label))
        elif str(label) in label2id:
            out.append(label2id[str(label)])
        else:
            raise CptqError(f"--eval label {label!r} is neither a class index nor one of {sorted(label2id)}")
    return np.asarray(out, dtype=np.int64)
