"""Causal-LM scoring on sliding windows: per scored token its negative log-likelihood, the top-1 prediction,
and the KL divergence of the candidate's next-token distribution from each other variant's (no KV cache: each
window is one full forward pass from an empty past)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnxruntime as ort

from ..onnx_io.inputs import feeds_for
from .base import RuntimeAdapter
from .eval_text import TextEncoder


@dataclass
class TokenScores:
    """Per scored token: its negative log-likelihood and the model's top-1 prediction for it."""

    nll: np.ndarray
    top1: np.ndarray

    @property
    def perplexity(self) -> float:
        return float(np.exp(self.nll.mean()))


def token_stream(encoder: TextEncoder, texts: list[str], max_tokens: int) -> np.ndarray:
    ids: list[int] = []
    bos = getattr(encoder.tokenizer, "bos_token_id", None) if encoder.tokenizer else None
    if bos is not None:
        ids.append(bos)
    for text in texts:
        ids.extend(encoder.ids(text + "\n"))
        if len(ids) >= max_tokens:
            break
    return np.asarray(ids[:max_tokens], dtype=np.int64)


def window_spans(n_tokens: int, window: int, stride: int) -> list[tuple[int, int, int]]:
    """(begin, end, first_scored) per window. Token j is predicted from logits at j-1, so a window
    [begin, end) can score tokens begin+1..end-1; each token is scored once, by the first window
    that reaches it, with as much left context as that window holds."""
    if not 0 < stride <= window:
        raise ValueError(f"need 0 < stride <= window (got stride {stride}, window {window})")
    spans, scored_until = [], 1  # token 0 has no context: never scored
    for begin in range(0, max(n_tokens - 1, 1), stride):
        end = min(begin + window, n_tokens)
        first = max(scored_until, begin + 1)
        if first < end:
            spans.append((begin, end, first))
            scored_until = end
        if end == n_tokens:
            break
    return spans


def log_softmax(logits: np.ndarray) -> np.ndarray:
    logits = logits.astype(np.float64)
    shifted = logits - logits.max(axis=-1, keepdims=True)
    logp: np.ndarray = shifted - np.log(np.exp(shifted).sum(axis=-1, keepdims=True))
    return logp


def score_tokens(adapter: RuntimeAdapter, session: ort.InferenceSession, ids: np.ndarray, window: int, stride: int) -> TokenScores:
    return score_variants(adapter, {"model": session}, ids, window, stride)[0]["model"]


def kl_divergence(logp_reference: np.ndarray, logp: np.ndarray) -> np.ndarray:
    """KL(reference || model) per row of log-probabilities: how far the model's next-token
    distribution moved from the reference's (what llama.cpp reports for its quant types)."""
    kl: np.ndarray = (np.exp(logp_reference) * (logp_reference - logp)).sum(axis=-1)
    return kl


def score_variants(adapter: RuntimeAdapter, sessions: dict[str, ort.InferenceSession], ids: np.ndarray, window: int, stride: int,
                   candidate: str | None = None) -> tuple[dict[str, TokenScores], dict[str, np.ndarray]]:
    """Every session on the same sliding windows, one window at a time: per variant the NLL and
    top-1 of each scored token, and per other variant the candidate's KL divergence from it on each
    token. Full next-token distributions are compared window by window because a whole evaluation's
    log-probabilities (tokens x vocabulary) do not fit in memory."""
    nll: dict[str, list[np.ndarray]] = {name: [] for name in sessions}
    top1: dict[str, list[np.ndarray]] = {name: [] for name in sessions}
    kl: dict[str, list[np.ndarray]] = {name: [] for name in sessions if candidate is not None and name != candidate}
    for begin, end, first in window_spans(len(ids), window, stride):
        chunk = ids[begin:end][None, :]
        targets = ids[first:end]
        logps = {}
        for name, session in sessions.items():
            logits = adapter.run(session, feeds_for(session, chunk))["logits"][0]
            predicting = logits[first - 1 - begin : end - 1 - begin]  # logits at j-1 predict token j
            logp = log_softmax(predicting)
            nll[name].append(-logp[np.arange(len(targets)), targets])
            top1[name].append(predicting.argmax(axis=-1))
            if candidate is not None:
                logps[name] = logp
        if candidate is not None:  # kl is empty otherwise
            for name in kl:
                kl[name].append(kl_divergence(logps[name], logps[candidate]))
    scores = {name: TokenScores(np.concatenate(nll[name]), np.concatenate(top1[name])) for name in sessions}
    return scores, {name: np.concatenate(values) for name, values in kl.items()}
