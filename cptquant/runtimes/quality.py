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

import json
import zlib
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..corpus import evaluation_sentences
from ..errors import CptqError
from ..model_loading import TASK_CAUSAL_LM, TASK_CLASSIFICATION, TASK_FEATURES, TASK_MASKED_LM, TASK_TOKEN_CLASSIFICATION
from ..progress import progress_bar
from .base import RuntimeAdapter
from ..onnx_io.inputs import feeds_for

BATCH = 8


def evaluation_texts(n: int) -> list[str]:
    """The held-out evaluation text. The one place to swap in another source (e.g. corpus.lm_splits())."""
    try:
        return evaluation_sentences(n)
    except ValueError as exc:
        raise CptqError(str(exc)) from None


@dataclass
class EvalSet:
    texts: list[str]
    labels: list | None = None  # ints or label names, classification only


def load_eval_file(path: Path) -> EvalSet:
    """`.jsonl` lines {"text": ..., "label": ...} (label optional), or plain text, one example per line."""
    path = Path(path)
    if not path.is_file():
        raise CptqError(f"--eval file not found: {path}")
    from ..passes.calibration import read_text_file

    lines = [line for line in read_text_file(path, "--eval file").splitlines() if line.strip()]
    if not lines:
        raise CptqError(f"--eval file {path} has no text")
    if path.suffix != ".jsonl":
        return EvalSet(lines)
    texts, labels = [], []
    for number, line in enumerate(lines, 1):
        try:
            row = json.loads(line)
            texts.append(str(row["text"]))
        except (json.JSONDecodeError, KeyError, TypeError):
            raise CptqError(f"--eval {path}:{number}: expected a JSON object with a \"text\" key") from None
        labels.append(row.get("label"))
    if all(label is None for label in labels):
        return EvalSet(texts)
    if any(label is None for label in labels):
        raise CptqError(f"--eval {path}: some lines have a label and some do not")
    return EvalSet(texts, labels)


class TextEncoder:
    """Text to token ids: the model folder's tokenizer, or, for a folder without one (tiny test
    models), a deterministic word hash into the vocabulary so the same text always gives the same ids."""

    def __init__(self, folder: Path, config, trust_remote_code: bool = False):
        self.vocab_size = int(config.vocab_size)
        self.tokenizer = None
        if any((folder / name).is_file() for name in ("tokenizer.json", "tokenizer_config.json", "vocab.txt")):
            from transformers import AutoTokenizer

            from ..safety import refuse_custom_code

            refuse_custom_code(folder, trust_remote_code)  # never a "[y/N]" prompt, never unasked-for code
            try:
                self.tokenizer = AutoTokenizer.from_pretrained(str(folder), trust_remote_code=trust_remote_code)
            except (OSError, ValueError, TypeError, AttributeError) as exc:
                first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
                raise CptqError(f"{folder}: cannot load the tokenizer ({first})") from None
        pad = getattr(self.tokenizer, "pad_token_id", None) if self.tokenizer else None
        self.pad_id = pad if pad is not None else (getattr(config, "pad_token_id", None) or 0)

    def _hash_ids(self, text: str) -> list[int]:
        # ids 0..3 are special in most vocabularies; keep hashed words out of them
        return [4 + zlib.crc32(word.encode()) % (self.vocab_size - 4) for word in text.split()]

    def ids(self, text: str) -> list[int]:
        if self.tokenizer is not None:
            return list(self.tokenizer(text, add_special_tokens=False)["input_ids"])
        return self._hash_ids(text)

    def batch(self, texts: list[str], max_length: int) -> tuple[np.ndarray, np.ndarray]:
        """Right-padded input_ids and attention_mask for an encoder (with its special tokens)."""
        if self.tokenizer is not None:
            enc = self.tokenizer(texts, padding=True, truncation=True, max_length=max_length, return_tensors="np")
            return enc["input_ids"].astype(np.int64), enc["attention_mask"].astype(np.int64)
        rows = [self._hash_ids(t)[:max_length] or [4] for t in texts]
        width = max(len(r) for r in rows)
        ids = np.full((len(rows), width), self.pad_id, dtype=np.int64)
        mask = np.zeros((len(rows), width), dtype=np.int64)
        for i, row in enumerate(rows):
            ids[i, : len(row)] = row
            mask[i, : len(row)] = 1
        return ids, mask

    def special_ids(self) -> set[int]:
        return set(self.tokenizer.all_special_ids) if self.tokenizer is not None else set()


# ---------------------------------------------------------------- causal LM


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


def _log_softmax(logits: np.ndarray) -> np.ndarray:
    logits = logits.astype(np.float64)
    shifted = logits - logits.max(axis=-1, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(axis=-1, keepdims=True))


def score_tokens(adapter: RuntimeAdapter, session, ids: np.ndarray, window: int, stride: int) -> TokenScores:
    return score_variants(adapter, {"model": session}, ids, window, stride)[0]["model"]


def kl_divergence(logp_reference: np.ndarray, logp: np.ndarray) -> np.ndarray:
    """KL(reference || model) per row of log-probabilities: how far the model's next-token
    distribution moved from the reference's (what llama.cpp reports for its quant types)."""
    return (np.exp(logp_reference) * (logp_reference - logp)).sum(axis=-1)


def score_variants(adapter: RuntimeAdapter, sessions: dict, ids: np.ndarray, window: int, stride: int,
                   candidate: str | None = None) -> tuple[dict[str, TokenScores], dict[str, np.ndarray]]:
    """Every session on the same sliding windows, one window at a time: per variant the NLL and
    top-1 of each scored token, and per other variant the candidate's KL divergence from it on each
    token. Full next-token distributions are compared window by window because a whole evaluation's
    log-probabilities (tokens x vocabulary) do not fit in memory."""
    nll: dict[str, list] = {name: [] for name in sessions}
    top1: dict[str, list] = {name: [] for name in sessions}
    kl: dict[str, list] = {name: [] for name in sessions if candidate is not None and name != candidate}
    for begin, end, first in window_spans(len(ids), window, stride):
        chunk = ids[begin:end][None, :]
        targets = ids[first:end]
        logps = {}
        for name, session in sessions.items():
            logits = adapter.run(session, feeds_for(session, chunk))["logits"][0]
            predicting = logits[first - 1 - begin : end - 1 - begin]  # logits at j-1 predict token j
            logp = _log_softmax(predicting)
            nll[name].append(-logp[np.arange(len(targets)), targets])
            top1[name].append(predicting.argmax(axis=-1))
            if candidate is not None:
                logps[name] = logp
        for name in kl:
            kl[name].append(kl_divergence(logps[name], logps[candidate]))
    scores = {name: TokenScores(np.concatenate(nll[name]), np.concatenate(top1[name])) for name in sessions}
    return scores, {name: np.concatenate(values) for name, values in kl.items()}


# ---------------------------------------------------------------- encoders


def _encoder_batches(encoder: TextEncoder, texts: list[str], max_length: int):
    for start in range(0, len(texts), BATCH):
        yield encoder.batch(texts[start : start + BATCH], max_length)


def mean_pooled(adapter: RuntimeAdapter, session, encoder: TextEncoder, texts: list[str], max_length: int) -> np.ndarray:
    pooled = []
    for ids, mask in _encoder_batches(encoder, texts, max_length):
        hidden = next(iter(adapter.run(session, feeds_for(session, ids, mask)).values())).astype(np.float64)
        weights = mask[..., None].astype(np.float64)
        pooled.append((hidden * weights).sum(axis=1) / np.maximum(weights.sum(axis=1), 1.0))
    return np.concatenate(pooled)


def class_logits(adapter: RuntimeAdapter, session, encoder: TextEncoder, texts: list[str], max_length: int) -> np.ndarray:
    return np.concatenate([adapter.run(session, feeds_for(session, ids, mask))["logits"]
                           for ids, mask in _encoder_batches(encoder, texts, max_length)])


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
    for ids, mask in _encoder_batches(encoder, texts, max_length):
        eligible = (mask == 1) & ~np.isin(ids, special)
        chosen = eligible & (rng.random(ids.shape) < rate)
        for row in np.flatnonzero(eligible.any(axis=1) & ~chosen.any(axis=1)):  # at least one per sentence
            chosen[row, rng.choice(np.flatnonzero(eligible[row]))] = True
        masked = np.where(chosen, tok.mask_token_id, ids)
        out.append(MaskedBatch(masked, mask, chosen, ids))
    return out


def masked_top1(adapter: RuntimeAdapter, session, batches: list[MaskedBatch]) -> np.ndarray:
    preds = []
    for b in batches:
        logits = adapter.run(session, feeds_for(session, b.ids, b.mask))["logits"]
        preds.append(logits.argmax(axis=-1)[b.positions])
    return np.concatenate(preds)


# ---------------------------------------------------------------- comparisons


def _cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return (a * b).sum(axis=1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1) + 1e-30)


def nearest_neighbours(embeddings: np.ndarray) -> np.ndarray:
    unit = embeddings / (np.linalg.norm(embeddings, axis=1, keepdims=True) + 1e-30)
    similarity = unit @ unit.T
    np.fill_diagonal(similarity, -np.inf)
    return similarity.argmax(axis=1)


@dataclass
class QualitySettings:
    n_texts: int
    max_length: int = 128
    lm_tokens: int = 2048
    lm_window: int = 128
    lm_stride: int = 64

    @classmethod
    def for_mode(cls, quick: bool) -> "QualitySettings":
        if quick:
            return cls(n_texts=64, lm_tokens=512, lm_window=128, lm_stride=64)
        return cls(n_texts=400, lm_tokens=2048, lm_window=256, lm_stride=128)


@dataclass
class Quality:
    """Per-variant figures, and the quantized model's figures against each baseline."""

    task: str
    n_examples: int
    variants: dict[str, dict] = field(default_factory=dict)
    vs: dict[str, dict] = field(default_factory=dict)  # baseline name -> metrics
    settings: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return {"task": self.task, "n_examples": self.n_examples, "settings": self.settings,
                "variants": self.variants, **{f"vs_{name}": metrics for name, metrics in self.vs.items()}}


def _round(x: float) -> float:
    return float(round(float(x), 6))


def _causal_lm(ctx: "_Context") -> Quality:
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


def _features(ctx: "_Context") -> Quality:
    raw = ctx.run_all(lambda session: mean_pooled(ctx.adapter, session, ctx.encoder, ctx.eval_set.texts, ctx.max_length))
    quality = Quality(TASK_FEATURES, len(ctx.eval_set.texts), settings={"max_length": ctx.max_length})
    quality.variants = {n: {} for n in raw}
    cand = raw[ctx.candidate]
    for base in ctx.baselines:
        cos = _cosines(cand, raw[base])
        same_nn = nearest_neighbours(cand) == nearest_neighbours(raw[base])
        quality.vs[base] = {"mean_cosine": _round(cos.mean()), "min_cosine": _round(cos.min()),
                            "nn_agreement": _round(same_nn.mean())}
    return quality


def _classification(ctx: "_Context") -> Quality:
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


def _token_classification(ctx: "_Context") -> Quality:
    """Per-token labels: the baseline's predictions are the labels, over the real (unpadded) tokens."""
    def predict(session) -> np.ndarray:
        return np.concatenate([ctx.adapter.run(session, feeds_for(session, ids, mask))["logits"].argmax(-1)[mask == 1]
                               for ids, mask in _encoder_batches(ctx.encoder, ctx.eval_set.texts, ctx.max_length)])

    raw = ctx.run_all(predict)
    quality = Quality(TASK_TOKEN_CLASSIFICATION, int(len(raw[ctx.candidate])), settings={"max_length": ctx.max_length})
    quality.variants = {n: {} for n in raw}
    for base in ctx.baselines:
        agreement = float(np.mean(raw[ctx.candidate] == raw[base]))
        quality.vs[base] = {"accuracy_drop": _round(1.0 - agreement), "agreement": _round(agreement)}
    return quality


def _masked_lm(ctx: "_Context") -> Quality:
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
    sessions: dict
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

    def run_all(self, measure) -> dict:
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


def measure_quality(task: str, adapter: RuntimeAdapter, sessions: dict, encoder: TextEncoder, config,
                    settings: QualitySettings, eval_set: EvalSet | None = None, candidate: str = "quantized",
                    progress: bool = True) -> Quality:
    """Run every session in `sessions` (name -> InferenceSession) on the same inputs; compare
    `candidate` against every other entry."""
    if task not in _BY_TASK:
        raise CptqError(f"no quality measure for task {task!r}")
    eval_set = eval_set or EvalSet(evaluation_texts(settings.n_texts))
    return _BY_TASK[task](_Context(adapter, sessions, encoder, config, settings, eval_set, candidate, progress))


def _label_ids(labels: list, config) -> np.ndarray:
    label2id = {str(k): int(v) for k, v in (getattr(config, "label2id", None) or {}).items()}
    out = []
    for label in labels:
        if isinstance(label, int) or (isinstance(label, str) and label.isdigit()):
            out.append(int(label))
        elif str(label) in label2id:
            out.append(label2id[str(label)])
        else:
            raise CptqError(f"--eval label {label!r} is neither a class index nor one of {sorted(label2id)}")
    return np.asarray(out, dtype=np.int64)
