"""Latency, throughput and memory of each variant on one adapter, measured in the same run.

Variants are interleaved (one run of each, in an order that rotates every round) so that load from
other processes and frequency changes fall on all of them alike; figures are medians (p50) and p90.
Every figure of the candidate is also stated against each baseline measured alongside it.

- encoders: batch 1 and 8 at sequence 16 and 128 (quick: batch 1 only);
- decoders: prefill of a 16-token prompt, then greedy decoding with the KV cache: present.* fed back
  as past_key_values.*, the attention mask grown by one and position_ids set to the new position.
  Decode latency is per token and includes reading the logits back for the argmax, as generation does.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import onnxruntime as ort

from ..model_loading import TASK_CAUSAL_LM
from ..onnx_io.inputs import NP_TYPES, feeds_for
from ..progress import progress_bar
from .base import RuntimeAdapter, latency_stats, timed

if TYPE_CHECKING:
    from transformers import PretrainedConfig


@dataclass
class SpeedSettings:
    encoder_shapes: tuple[tuple[int, int], ...] = ((1, 16), (1, 128), (8, 16), (8, 128))
    warmup: int = 5
    runs: int = 40
    prompt_tokens: int = 16
    new_tokens: int = 32
    decode_rounds: int = 5

    @classmethod
    def for_mode(cls, quick: bool) -> SpeedSettings:
        if quick:
            return cls(encoder_shapes=((1, 16), (1, 128)), warmup=3, runs=15, new_tokens=8, decode_rounds=3)
        return cls()


def random_ids(vocab_size: int, batch: int, length: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(4, vocab_size, size=(batch, length), dtype=np.int64)


def _past_name(present: str) -> str:
    return "past_key_values" + present[len("present"):]


def rotations(names: list[str], rounds: int) -> Iterator[list[str]]:
    for r in range(rounds):
        shift = r % len(names)
        yield names[shift:] + names[:shift]


def encoder_latency(adapter: RuntimeAdapter, sessions: dict[str, ort.InferenceSession], vocab_size: int, max_positions: int,
                    settings: SpeedSettings, progress: bool = True,
                    rounds: dict[str, dict[str, list[float]]] | None = None) -> dict[str, dict[str, Any]]:
    """variant -> shape key ("b1_s16") -> LatencyStats dict. `rounds`, when given, receives every
    sample as shape key -> variant -> seconds per round (the speed gate pairs them by round)."""
    shapes = [(b, min(s, max_positions)) for b, s in settings.encoder_shapes]
    out: dict[str, dict[str, Any]] = {name: {} for name in sessions}
    with progress_bar(progress) as bar:
        job = bar.add_task(f"latency on {adapter.name}", total=len(shapes) * (settings.runs + settings.warmup))
        for batch, length in shapes:
            ids = random_ids(vocab_size, batch, length)
            # Inputs go to the device once: the timed span is the forward pass.
            bound = {name: {k: adapter.to_device(v) for k, v in feeds_for(s, ids).items()} for name, s in sessions.items()}
            for _ in range(settings.warmup):
                for name, session in sessions.items():
                    adapter.run_bound(session, bound[name])
                bar.advance(job)
            samples: dict[str, list[float]] = {name: [] for name in sessions}
            for order in rotations(list(sessions), settings.runs):
                for name in order:
                    samples[name].append(timed(lambda: adapter.run_bound(sessions[name], bound[name])))
                bar.advance(job)
            for name, seconds in samples.items():
                out[name][f"b{batch}_s{length}"] = latency_stats(seconds).to_dict()
            if rounds is not None:
                rounds[f"b{batch}_s{length}"] = samples
    return out


def _decode_step_feeds(session: ort.InferenceSession, token: int, total_len: int,
                       presents: dict[str, ort.OrtValue]) -> dict[str, np.ndarray | ort.OrtValue]:
    feeds: dict[str, np.ndarray | ort.OrtValue] = {}
    for arg in session.get_inputs():
        dtype = NP_TYPES.get(arg.type, np.int64)
        if arg.name == "input_ids":
            feeds[arg.name] = np.asarray([[token]], dtype=dtype)
        elif arg.name == "attention_mask":
            feeds[arg.name] = np.ones((1, total_len), dtype=dtype)
        elif arg.name == "position_ids":
            feeds[arg.name] = np.asarray([[total_len - 1]], dtype=dtype)
        elif arg.name.startswith("past_key_values"):
            feeds[arg.name] = presents[arg.name]  # an OrtValue, already on the device
        else:
            raise ValueError(f"unexpected decoder input {arg.name!r}")
    return feeds


def greedy_decode(adapter: RuntimeAdapter, session: ort.InferenceSession, prompt: np.ndarray,
                  new_tokens: int) -> tuple[float, list[float], list[int]]:
    """Prefill seconds, per-step seconds for new_tokens - 1 cached steps, and the generated ids."""
    outputs: dict[str, Any] = {}  # the last run's OrtValues, and "next": its greedy token

    def prefill() -> None:
        outputs.update(adapter.run_bound(session, feeds_for(session, prompt)))
        outputs["next"] = int(outputs["logits"].numpy()[0, -1].argmax())

    prefill_s = timed(prefill)
    generated = [outputs["next"]]
    step_s = []
    total_len = prompt.shape[1]
    for _ in range(new_tokens - 1):
        total_len += 1
        presents = {_past_name(k): v for k, v in outputs.items() if k.startswith("present")}
        feeds = _decode_step_feeds(session, generated[-1], total_len, presents)

        def step() -> None:
            outputs.update(adapter.run_bound(session, feeds))
            outputs["next"] = int(outputs["logits"].numpy()[0, -1].argmax())

        step_s.append(timed(step))
        generated.append(outputs["next"])
    return prefill_s, step_s, generated


def decoder_latency(adapter: RuntimeAdapter, sessions: dict[str, ort.InferenceSession], vocab_size: int, settings: SpeedSettings,
                    progress: bool = True, rounds: dict[str, dict[str, list[float]]] | None = None) -> dict[str, dict[str, Any]]:
    """variant -> figure -> LatencyStats dict (and tokens_per_s). `rounds` as in encoder_latency; a decode
    round's sample is the median of its steps."""
    prompt = random_ids(vocab_size, 1, settings.prompt_tokens)
    prefill: dict[str, list[float]] = {name: [] for name in sessions}
    steps: dict[str, list[float]] = {name: [] for name in sessions}
    with progress_bar(progress) as bar:
        job = bar.add_task(f"decoding on {adapter.name}", total=settings.decode_rounds + 1)
        for session in sessions.values():  # warm-up: one short generation each
            greedy_decode(adapter, session, prompt, min(4, settings.new_tokens))
        # Prefill alone, `runs` times: a few decode rounds give too few samples for a median.
        bound = {name: {k: adapter.to_device(v) for k, v in feeds_for(s, prompt).items()} for name, s in sessions.items()}
        for order in rotations(list(sessions), settings.runs):
            for name in order:
                prefill[name].append(timed(lambda: adapter.run_bound(sessions[name], bound[name])))
        bar.advance(job)
        decode_rounds: dict[str, list[float]] = {name: [] for name in sessions}
        for order in rotations(list(sessions), settings.decode_rounds):
            for name in order:
                _, s, _ = greedy_decode(adapter, sessions[name], prompt, settings.new_tokens)
                steps[name].extend(s)
                decode_rounds[name].append(float(np.median(s)))
            bar.advance(job)
    if rounds is not None:
        rounds[f"prefill_b1_s{settings.prompt_tokens}"] = prefill
        rounds["decode_per_token"] = decode_rounds
    out: dict[str, dict[str, Any]] = {}
    for name in sessions:
        decode = latency_stats(steps[name])
        out[name] = {f"prefill_b1_s{settings.prompt_tokens}": latency_stats(prefill[name]).to_dict(),
                     "decode_per_token": decode.to_dict(),
                     "tokens_per_s": round(1e3 / decode.p50_ms, 2)}
    return out


def measure_latency(task: str, adapter: RuntimeAdapter, sessions: dict[str, ort.InferenceSession], config: PretrainedConfig,
                    settings: SpeedSettings, progress: bool = True,
                    rounds: dict[str, dict[str, list[float]]] | None = None) -> dict[str, dict[str, Any]]:
    vocab_size = int(config.vocab_size)
    if task == TASK_CAUSAL_LM:
        return decoder_latency(adapter, sessions, vocab_size, settings, progress, rounds)
    max_positions = int(getattr(config, "max_position_embeddings", 512) or 512)
    return encoder_latency(adapter, sessions, vocab_size, max_positions, settings, progress, rounds)


def speedups(latency: dict[str, dict[str, Any]], candidate: str, baseline: str) -> dict[str, Any]:
    """baseline p50 / candidate p50 for each latency figure (above 1: the candidate is faster), and
    their geometric mean, which is what the speed gate reads; the same ratio of the p90s, and of the
    tokens per second (candidate / baseline) for decoders."""
    def ratio(stat: str) -> dict[str, float]:
        return {key: round(stats[stat] / latency[candidate][key][stat], 4)
                for key, stats in latency[baseline].items() if isinstance(stats, dict)}

    ratios = ratio("p50_ms")
    geomean = float(np.exp(np.mean(np.log(list(ratios.values()))))) if ratios else float("nan")
    out: dict[str, Any] = {"latency_speedup": ratios, "p90_speedup": ratio("p90_ms"), "geomean_speedup": round(geomean, 4)}
    if "tokens_per_s" in latency[baseline]:
        out["tokens_per_s_ratio"] = round(latency[candidate]["tokens_per_s"] / latency[baseline]["tokens_per_s"], 4)
    return out
