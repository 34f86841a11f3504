"""Encoder outputs over the evaluation text, batch by batch: mean-pooled embeddings, class logits, masked-LM
predictions on randomly masked tokens, and the comparisons of embeddings (cosines, nearest neighbours)."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import onnxruntime as ort

from ..errors import CptqError
from ..onnx_io.inputs import feeds_for
from .base import RuntimeAdapter
from .eval_text import TextEncoder

BATCH = 8


def encoder_batches(encoder: TextEncoder, texts: list[str],
                    max_length: int) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    for start in range(0, len(texts), BATCH):
        yield encoder.batch(texts[start : start + BATCH], max_length)


def mean_pooled(adapter: RuntimeAdapter, session: ort.InferenceSession, encoder: TextEncoder, texts: list[str], max_length: int) -> np.ndarray:
    pooled = []
    for ids, mask in encoder_batches(encoder, texts, max_length):
        hidden = next(iter(adapter.run(session, feeds_for(session, ids, mask)).values())).astype(np.float64)
        weights = mask[..., None].astype(np.float64)
        pooled.append((hidden * weights).sum(axis=1) / np.maximum(weights.sum(axis=1), 1.0))
    return np.concatenate(pooled)


def class_logits(adapter: RuntimeAdapter, session: ort.InferenceSession, encoder: TextEncoder, texts: list[str], max_length: int) -> np.ndarray:
    return np.concatenate([adapter.run(session, feeds_for(session, ids, mask))["logits"]
                           for ids, mask in encoder_batches(encoder, texts, max_length)])


@dataclass
class MaskedBatch:
    ids: np.ndarray
    mask: np.ndarray
    positions: np.ndarray  # boolean, where a token was replaced by the mask token
    original: np.ndarray


def masked_batches(encoder: TextEncoder, texts: list[str], max_length: int, rate: float = 0.15,
                   seed: int = 0) -> list[MaskedBatch]:
    tok = encoder.tokenizer
    if tok is None or tok.mask_token_id is None:
        raise CptqError("masked-LM verification needs the model's tokenizer (with a mask token) in the output folder")
    rng = np.random.default_rng(seed)
    special = np.asarray(sorted(encoder.special_ids()), dtype=np.int64)
    out = []
    for ids, mask in encoder_batches(encoder, texts, max_length):
        eligible = (mask == 1) & ~np.isin(ids, special)
        chosen = eligible & (rng.random(ids.shape) < rate)
        for row in np.flatnonzero(eligible.any(axis=1) & ~chosen.any(axis=1)):  # at least one per sentence
            chosen[row, rng.choice(np.flatnonzero(eligible[row]))] = True
        masked = np.where(chosen, tok.mask_token_id, ids)
        out.append(MaskedBatch(masked, mask, chosen, ids))
    return out


def masked_top1(adapter: RuntimeAdapter, session: ort.InferenceSession, batches: list[MaskedBatch]) -> np.ndarray:
    preds = []
    for b in batches:
        logits = adapter.run(session, feeds_for(session, b.ids, b.mask))["logits"]
        preds.append(logits.argmax(axis=-1)[b.positions])
    return np.concatenate(preds)


def cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    cos: np.ndarray = (a * b).sum(axis=1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1) + 1e-30)
    return cos


def nearest_neighbours(embeddings: np.ndarray) -> np.ndarray:
    unit = embeddings / (np.linalg.norm(embeddings, axis=1, keepdims=True) + 1e-30)
    similarity = unit @ unit.T
    np.fill_diagonal(similarity, -np.inf)
    nearest: np.ndarray = similarity.argmax(axis=1)
    return nearest
