"""`cptq verify`'s speed gate: a confidence interval of the candidate's speed-up over the gated baseline,
from interleaved pairs, measured until the interval is narrow, clear of the threshold, or a cap is hit.

Why an interval: a point ratio of two medians moves with the load other processes put on the machine (on
a busy 2-core box the same export measured 1.03x and 0.95x FP32), so a fixed threshold on it passes or fails
by chance. Here each round runs the candidate and the baseline back to back at one figure (a shape, or
prefill / decode), their order alternating, so both see the same load; the round's sample is
log(baseline seconds / candidate seconds). A figure's speed-up is the median of its samples, the gated
speed-up their geometric mean over figures (what the report's p50 ratios also give), and its interval a
percentile bootstrap over rounds (each figure resampled on its own: figures are measured one after another).

Verdict: PASS when the whole interval is at or above the threshold, FAIL (exit 1) only when the whole
interval is below it, INCONCLUSIVE (exit 0, said so) when it straddles the threshold after the caps.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
import onnxruntime as ort

from ..model_loading import TASK_CAUSAL_LM
from ..onnx_io.inputs import feeds_for
from .base import RuntimeAdapter, timed
from .speed import SpeedSettings, greedy_decode, random_ids

if TYPE_CHECKING:
    from transformers import PretrainedConfig

PASS, FAIL, INCONCLUSIVE = "pass", "fail", "inconclusive"


@dataclass
class GateSettings:
    confidence: float = 0.95
    narrow: float = 0.04  # stop once high / low - 1 is below this (about +-2 % around the estimate)
    batch_rounds: int = 10  # rounds added between two looks at the interval
    max_rounds: int = 400  # per figure, the latency measurement's rounds included
    max_seconds: float = 90.0  # of added rounds
    bootstrap: int = 2000
    seed: int = 0

    @classmethod
    def for_mode(cls, quick: bool) -> GateSettings:
        return cls(max_rounds=120, max_seconds=20.0) if quick else cls()


@dataclass
class SpeedInterval:
    estimate: float  # geometric mean over figures of the median paired speed-up
    low: float
    high: float
    confidence: float
    rounds: dict[str, int]  # figure -> paired rounds behind it
    per_figure: dict[str, float]  # figure -> median paired speed-up
    stopped: str  # why the measurement stopped: narrow, clear of the threshold, or a cap
    added_seconds: float = 0.0
    threshold: float | None = None
    verdict: str = field(default=INCONCLUSIVE)

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        for key in ("estimate", "low", "high", "added_seconds"):
            out[key] = round(out[key], 4)
        out["per_figure"] = {k: round(v, 4) for k, v in self.per_figure.items()}
        return out


def paired_log_ratios(rounds: dict[str, dict[str, list[float]]], candidate: str, baseline: str) -> dict[str, list[float]]:
    """figure -> log(baseline / candidate) per round, from measure_latency's `rounds`."""
    return {figure: [float(np.log(b / c)) for c, b in zip(by_variant[candidate], by_variant[baseline]) if b > 0 and c > 0]
            for figure, by_variant in rounds.items()}


def bootstrap_interval(samples: dict[str, list[float]], confidence: float, resamples: int,
                       seed: int) -> tuple[float, float, float]:
    """(estimate, low, high) of exp(mean over figures of the median log ratio), percentile bootstrap."""
    rng = np.random.default_rng(seed)
    estimate = float(np.mean([np.median(v) for v in samples.values()]))
    stats = np.zeros(resamples)
    for values in samples.values():
        arr = np.asarray(values)
        picks = rng.integers(0, len(arr), size=(resamples, len(arr)))
        stats += np.median(arr[picks], axis=1)
    stats /= len(samples)
    tail = (1 - confidence) / 2 * 100
    low, high = np.percentile(stats, [tail, 100 - tail])
    return float(np.exp(estimate)), float(np.exp(min(low, estimate))), float(np.exp(max(high, estimate)))


def verdict(low: float, high: float, threshold: float) -> str:
    if low >= threshold:
        return PASS
    if high < threshold:
        return FAIL
    return INCONCLUSIVE


def figure_probes(task: str, adapter: RuntimeAdapter, sessions: dict[str, ort.InferenceSession], config: PretrainedConfig,
                  settings: SpeedSettings) -> dict[str, Callable[[str], float]]:
    """figure -> (variant -> seconds of one run), the same figures and inputs as speed.measure_latency."""
    vocab_size = int(config.vocab_size)
    probes: dict[str, Callable[[str], float]] = {}
    if task == TASK_CAUSAL_LM:
        prompt = random_ids(vocab_size, 1, settings.prompt_tokens)
        bound = {n: {k: adapter.to_device(v) for k, v in feeds_for(s, prompt).items()} for n, s in sessions.items()}
        probes[f"prefill_b1_s{settings.prompt_tokens}"] = \
            lambda n: timed(lambda: adapter.run_bound(sessions[n], bound[n]))
        probes["decode_per_token"] = \
            lambda n: float(np.median(greedy_decode(adapter, sessions[n], prompt, settings.new_tokens)[1]))
        return probes
    max_positions = int(getattr(config, "max_position_embeddings", 512) or 512)
    for batch, length in settings.encoder_shapes:
        length = min(length, max_positions)
        ids = random_ids(vocab_size, batch, length)
        bound = {n: {k: adapter.to_device(v) for k, v in feeds_for(s, ids).items()} for n, s in sessions.items()}
        probes[f"b{batch}_s{length}"] = _bound_probe(adapter, sessions, bound)
    return probes


def _bound_probe(adapter: RuntimeAdapter, sessions: dict[str, ort.InferenceSession],
                 bound: dict[str, dict[str, ort.OrtValue]]) -> Callable[[str], float]:
    """Seconds of one run of variant `n` on its inputs already on the device."""
    return lambda n: timed(lambda: adapter.run_bound(sessions[n], bound[n]))


def speed_interval(samples: dict[str, list[float]], threshold: float, settings: GateSettings,
                   probes: dict[str, Callable[[str], float]] | None = None, candidate: str = "",
                   baseline: str = "") -> SpeedInterval:
    """The interval from `samples` (figure -> paired log ratios, extended in place), adding rounds through
    `probes` while it is wider than settings.narrow, straddles `threshold`, and no cap is reached."""
    start = time.perf_counter()
    added = 0.0
    rounds_done = 0
    while True:
        estimate, low, high = bootstrap_interval(samples, settings.confidence, settings.bootstrap, settings.seed)
        if high / low - 1 <= settings.narrow:
            stopped = f"interval narrower than {settings.narrow:.0%}"
            break
        if verdict(low, high, threshold) != INCONCLUSIVE:
            stopped = "interval clear of the threshold"
            break
        if not probes:
            stopped = "no further rounds (nothing to measure with)"
            break
        if min(len(v) for v in samples.values()) >= settings.max_rounds:
            stopped = f"cap of {settings.max_rounds} rounds per figure"
            break
        if added >= settings.max_seconds:
            stopped = f"cap of {settings.max_seconds:g} s of added rounds"
            break
        for _ in range(settings.batch_rounds):
            for figure, probe in probes.items():
                order = (candidate, baseline) if rounds_done % 2 else (baseline, candidate)
                seconds = {name: probe(name) for name in order}
                if seconds[candidate] > 0 and seconds[baseline] > 0:
                    samples[figure].append(float(np.log(seconds[baseline] / seconds[candidate])))
            rounds_done += 1
        added = time.perf_counter() - start
    per_figure = {k: float(np.exp(np.median(v))) for k, v in samples.items()}
    return SpeedInterval(estimate, low, high, settings.confidence, {k: len(v) for k, v in samples.items()},
                         per_figure, stopped, added, threshold, verdict(low, high, threshold))
