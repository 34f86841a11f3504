"""`cptq verify` for encoder-decoder exports (T5, BART): the three files optimum's ORTModelForSeq2SeqLM loads
(encoder_model.onnx, decoder_model.onnx, decoder_with_past_model.onnx), measured as one model per variant.

A variant is named by the path its model.onnx would have (as for every other task: the report, the baseline
cache and the export's staged baselines all use that name); its three files lie beside it.

- quality, teacher-forced: the encoder reads a held-out sentence and the decoder reads the same sentence shifted
  right (what the calibration does too, seq2seq_inputs.py), so every position has a next token to predict:
  perplexity of those tokens, mean KL divergence of the candidate's next-token distribution from the
  baseline's, top-1 agreement; plus greedy generation with the KV cache on a few inputs (the decoder file for
  the first token, then the with-past decoder): the share of generated tokens equal to the baseline's, and of
  sequences equal throughout;
- speed, interleaved like every other task: the encoder pass at batch 1 (sequence 16, and 128 outside
  quick mode), and the per-token decode step of the with-past decoder (greedy, the median step of a round).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import onnxruntime as ort

from ..errors import CptqError
from ..model_loading import TASK_SEQ2SEQ
from ..onnx_io.inputs import NP_TYPES
from ..onnx_io.onnx_export import SEQ2SEQ_FILES
from ..progress import progress_bar
from ..seq2seq_inputs import start_token
from .base import RuntimeAdapter, latency_stats, model_bytes, timed
from .eval_text import EvalSet, TextEncoder, evaluation_texts
from .export_folder import model_files
from .lm_scores import log_softmax
from .quality import Quality, QualitySettings
from .speed import SpeedSettings, random_ids, rotations

if TYPE_CHECKING:
    from transformers import PretrainedConfig

ENCODER, DECODER, DECODER_WITH_PAST = SEQ2SEQ_FILES
GENERATE_TEXTS = 8  # inputs greedy-decoded per variant (quick: 4)
GENERATE_TOKENS = 8  # tokens each generates
BATCH = 16


@dataclass
class Seq2SeqSessions:
    encoder: ort.InferenceSession
    decoder: ort.InferenceSession
    with_past: ort.InferenceSession


def open_seq2seq_sessions(adapter: RuntimeAdapter, variants: dict[str, Path], config: PretrainedConfig,
                          ) -> tuple[dict[str, Seq2SeqSessions], dict[str, dict[str, Any]]]:
    """Each variant's three sessions; per variant {bytes_on_disk (all three files), open_s (all three),
    peak_rss_bytes, rss_growth_bytes}. Peak memory is measured for single-file models only (memory.py runs
    one file in a fresh process): None here."""
    sessions: dict[str, Seq2SeqSessions] = {}
    facts: dict[str, dict[str, Any]] = {}
    for name, model_path in variants.items():
        opened: list[ort.InferenceSession] = []
        files = model_files(Path(model_path), TASK_SEQ2SEQ)
        open_s = 0.0
        for path in files:
            try:
                open_s += timed(lambda: opened.append(adapter.session(path)))  # noqa: B023 (called at once)
            except Exception as exc:  # ORT rejects a model it cannot load with many exception types
                first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
                raise CptqError(f"onnxruntime cannot load {path} on {adapter.name}: {first}") from None
        sessions[name] = Seq2SeqSessions(*opened)
        facts[name] = {"bytes_on_disk": sum(model_bytes(p) for p in files), "open_s": round(open_s, 3),
                       "peak_rss_bytes": None, "rss_growth_bytes": None}
    return sessions, facts


# ---------------------------------------------------------------- running the three files


def _feeds(session: ort.InferenceSession, values: dict[str, Any]) -> dict[str, Any]:
    """The session's inputs from `values`, in the integer type each declares; an unknown input is an error."""
    feeds = {}
    for arg in session.get_inputs():
        if arg.name not in values:
            raise CptqError(f"unexpected encoder-decoder input {arg.name!r} ({arg.type})")
        value = values[arg.name]
        if isinstance(value, np.ndarray) and value.dtype.kind in "iu":
            value = value.astype(NP_TYPES.get(arg.type, np.int64))
        feeds[arg.name] = value
    return feeds


def encode(adapter: RuntimeAdapter, sessions: Seq2SeqSessions, ids: np.ndarray, mask: np.ndarray) -> Any:
    """The encoder's hidden states (an OrtValue, left on the device)."""
    out = adapter.run_bound(sessions.encoder, _feeds(sessions.encoder, {"input_ids": ids, "attention_mask": mask}))
    return out["last_hidden_state"]


def decoder_logits(adapter: RuntimeAdapter, sessions: Seq2SeqSessions, hidden: Any, mask: np.ndarray,
                   decoder_ids: np.ndarray) -> np.ndarray:
    """Teacher-forced logits [batch, length, vocab] of the decoder file (no past) over `decoder_ids`."""
    values = {"input_ids": decoder_ids, "encoder_attention_mask": mask, "encoder_hidden_states": hidden,
              "decoder_attention_mask": np.ones_like(decoder_ids)}
    logits: np.ndarray = adapter.run_bound(sessions.decoder, _feeds(sessions.decoder, values))["logits"].numpy()
    return logits


def _past(outputs: dict[str, Any], past: dict[str, Any]) -> dict[str, Any]:
    """present.* of a decoder step as the past_key_values.* of the next; the encoder's keys and values, which
    the with-past decoder does not return, stay those of the first step."""
    return {**past, **{"past_key_values" + k[len("present"):]: v for k, v in outputs.items() if k.startswith("present")}}


def greedy_generate(adapter: RuntimeAdapter, sessions: Seq2SeqSessions, ids: np.ndarray, start_id: int,
                    new_tokens: int) -> tuple[list[float], list[int]]:
    """Greedy decoding of one input (batch 1) with the KV cache: the decoder file for the first token, the
    with-past decoder for the others. Returns the seconds of each with-past step and the generated ids."""
    mask = np.ones_like(ids)
    hidden = encode(adapter, sessions, ids, mask)
    first = {"input_ids": np.asarray([[start_id]]), "encoder_attention_mask": mask, "encoder_hidden_states": hidden,
             "decoder_attention_mask": np.ones((1, 1), dtype=np.int64)}
    outputs = adapter.run_bound(sessions.decoder, _feeds(sessions.decoder, first))
    generated = [int(outputs["logits"].numpy()[0, -1].argmax())]
    past = _past(outputs, {})
    steps = []
    for step in range(1, new_tokens):
        values = {"input_ids": np.asarray([[generated[-1]]]), "encoder_attention_mask": mask,
                  "encoder_hidden_states": hidden, "decoder_attention_mask": np.ones((1, step + 1), dtype=np.int64),
                  "cache_position": np.asarray([step]), **past}
        feeds = _feeds(sessions.with_past, values)

        def run() -> None:
            outputs.clear()
            outputs.update(adapter.run_bound(sessions.with_past, feeds))
            outputs["next"] = int(outputs["logits"].numpy()[0, -1].argmax())

        steps.append(timed(run))
        generated.append(int(outputs.pop("next")))
        past = _past(outputs, past)
    return steps, generated


def shift_right(ids: np.ndarray, start_id: int) -> np.ndarray:
    """The decoder's teacher-forced input: the start token, then the target without its last token."""
    return np.concatenate([np.full((ids.shape[0], 1), start_id, dtype=ids.dtype), ids[:, :-1]], axis=1)


# ---------------------------------------------------------------- quality


def seq2seq_quality(task: str, adapter: RuntimeAdapter, sessions: dict[str, Seq2SeqSessions], encoder: TextEncoder,
                    config: object, settings: QualitySettings, eval_set: EvalSet | None = None,
                    candidate: str = "quantized", progress: bool = True) -> Quality:
    """Teacher-forced figures and greedy-generation agreement of `candidate` against every other variant."""
    texts = (eval_set or EvalSet(evaluation_texts(settings.n_texts))).texts
    start = start_token(config)
    max_length = capped_length(config, settings.max_length)
    baselines = [name for name in sessions if name != candidate]
    nll: dict[str, list[np.ndarray]] = {name: [] for name in sessions}
    top1: dict[str, list[np.ndarray]] = {name: [] for name in sessions}
    kl: dict[str, list[np.ndarray]] = {name: [] for name in baselines}
    batches = [texts[i:i + BATCH] for i in range(0, len(texts), BATCH)]
    n_generate = min(len(texts), GENERATE_TEXTS if settings.n_texts > 64 else GENERATE_TEXTS // 2)
    generated: dict[str, list[list[int]]] = {name: [] for name in sessions}
    with progress_bar(progress) as bar:
        job = bar.add_task(f"quality on {adapter.name}", total=len(batches) + n_generate)
        for batch in batches:
            ids, mask = encoder.batch(batch, max_length)
            decoder_ids, real = shift_right(ids, start), mask == 1
            logp = {}
            for name, s in sessions.items():
                logp[name] = log_softmax(decoder_logits(adapter, s, encode(adapter, s, ids, mask), mask, decoder_ids))
                nll[name].append(-np.take_along_axis(logp[name], ids[..., None], axis=-1)[..., 0][real])
                top1[name].append(logp[name].argmax(-1)[real])
            for base in baselines:  # KL(baseline || candidate) per scored token
                kl[base].append((np.exp(logp[base]) * (logp[base] - logp[candidate])).sum(-1)[real])
            bar.advance(job)
        for text in texts[:n_generate]:
            ids, _ = encoder.batch([text], max_length)
            for name, s in sessions.items():
                generated[name].append(greedy_generate(adapter, s, ids, start, GENERATE_TOKENS)[1])
            bar.advance(job)
    scores = {name: np.concatenate(nll[name]) for name in sessions}
    perplexity = {name: float(np.exp(v.mean())) for name, v in scores.items()}
    quality = Quality(TASK_SEQ2SEQ, int(len(scores[candidate])),
                      settings={"texts": len(texts), "max_length": max_length, "teacher_forced": True,
                                "generated_inputs": n_generate, "new_tokens": GENERATE_TOKENS})
    quality.variants = {name: {"perplexity": round(p, 6)} for name, p in perplexity.items()}
    cand_top1 = np.concatenate(top1[candidate])
    for base in baselines:
        pairs = list(zip(generated[candidate], generated[base]))
        quality.vs[base] = {
            "ppl_increase": round(perplexity[candidate] / perplexity[base] - 1.0, 6),
            "kl_divergence": round(float(np.concatenate(kl[base]).mean()), 6),
            "top1_agreement": round(float(np.mean(cand_top1 == np.concatenate(top1[base]))), 6),
            "generation_token_agreement": round(float(np.mean([a == b for x, y in pairs for a, b in zip(x, y)])), 6),
            "generation_exact_match": round(float(np.mean([x == y for x, y in pairs])), 6),
        }
    return quality


# ---------------------------------------------------------------- speed


def capped_length(config: object, length: int) -> int:
    """`length`, or the model's position table when that is shorter (BART; T5's positions are relative)."""
    return min(length, int(getattr(config, "max_position_embeddings", 0) or length))


def _encoder_shapes(settings: SpeedSettings, config: object) -> list[tuple[int, int]]:
    return sorted({(1, capped_length(config, length)) for _, length in settings.encoder_shapes})


def seq2seq_probes(task: str, adapter: RuntimeAdapter, sessions: dict[str, Seq2SeqSessions], config: PretrainedConfig,
                   settings: SpeedSettings) -> dict[str, Callable[[str], float]]:
    """figure -> (variant -> seconds of one run): each encoder shape, and the median with-past decode step of
    one greedy generation from a `prompt_tokens` input. The speed gate adds rounds through these."""
    vocab_size = int(config.vocab_size)
    start = start_token(config)
    probes: dict[str, Callable[[str], float]] = {}
    for batch, length in _encoder_shapes(settings, config):
        ids = random_ids(vocab_size, batch, length)
        bound = {n: _feeds(s.encoder, {"input_ids": adapter.to_device(ids),
                                       "attention_mask": adapter.to_device(np.ones_like(ids))})
                 for n, s in sessions.items()}
        probes[f"encoder_b{batch}_s{length}"] = _encoder_probe(adapter, sessions, bound)
    prompt = random_ids(vocab_size, 1, settings.prompt_tokens)
    probes["decode_per_token"] = lambda n: float(np.median(greedy_generate(adapter, sessions[n], prompt, start,
                                                                           settings.new_tokens)[0]))
    return probes


def _encoder_probe(adapter: RuntimeAdapter, sessions: dict[str, Seq2SeqSessions],
                   bound: dict[str, dict[str, Any]]) -> Callable[[str], float]:
    return lambda n: timed(lambda: adapter.run_bound(sessions[n].encoder, bound[n]))


def seq2seq_latency(task: str, adapter: RuntimeAdapter, sessions: dict[str, Seq2SeqSessions], config: PretrainedConfig,
                    settings: SpeedSettings, progress: bool = True,
                    rounds: dict[str, dict[str, list[float]]] | None = None) -> dict[str, dict[str, Any]]:
    """variant -> figure -> LatencyStats dict (and tokens_per_s of the decode step), every figure interleaved:
    each round runs every variant once, in an order that rotates. `rounds` as in speed.encoder_latency."""
    probes = seq2seq_probes(task, adapter, sessions, config, settings)
    samples: dict[str, dict[str, list[float]]] = {figure: {n: [] for n in sessions} for figure in probes}
    with progress_bar(progress) as bar:
        job = bar.add_task(f"latency on {adapter.name}", total=len(probes))
        for figure, probe in probes.items():
            decode = figure == "decode_per_token"
            for _ in range(1 if decode else settings.warmup):
                for name in sessions:
                    probe(name)
            for order in rotations(list(sessions), settings.decode_rounds * 3 if decode else settings.runs):
                for name in order:
                    samples[figure][name].append(probe(name))
            bar.advance(job)
    if rounds is not None:
        rounds.update(samples)
    out: dict[str, dict[str, Any]] = {}
    for name in sessions:
        out[name] = {figure: latency_stats(by_variant[name]).to_dict() for figure, by_variant in samples.items()}
        out[name]["tokens_per_s"] = round(1e3 / out[name]["decode_per_token"]["p50_ms"], 2)
    return out
