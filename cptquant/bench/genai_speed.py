"""Decode and prefill speed of LLM folders under ONNX Runtime GenAI (`onnxruntime_genai`), interleaved.

Every folder holds a `genai_config.json` (ours: written by the exporter; the model builder's: its
own). All models are loaded at once with the same session threads, and each round runs every model
once, in an order that rotates between rounds, so load from other processes falls on all alike.

- decode: greedy generation of `new_tokens` after a short prompt; `append_tokens` runs the prompt, the
  first `generate_next_token` only picks from its logits, each later one runs one cached step: the
  per-token figure is the median of those steps;
- prefill: `append_tokens` of a `prefill_tokens`-token prompt into a fresh generator (median over rounds).
Token ids come from the caller (our tokenizer), not GenAI's, so every model sees the same ids.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, TypedDict

import numpy as np

if TYPE_CHECKING:
    import onnxruntime_genai as og


@dataclass
class GenaiSpeedSettings:
    threads: int = 2
    prompt_tokens: int = 16
    new_tokens: int = 48
    decode_rounds: int = 5
    prefill_tokens: int = 256
    prefill_rounds: int = 5


class GenaiFigures(TypedDict, total=False):
    """One folder's figures; prefill only for the names asked, `error` alone when GenAI could not run it."""

    decode_ms: float  # median per cached step
    decode_runs: int  # cached steps timed
    tokens: list[int]  # the greedy continuation of the first round
    prefill_ms: float  # median over rounds
    prefill_runs: int
    error: str


def _load(folder: Path, threads: int) -> og.Model:
    import onnxruntime_genai as og

    config = og.Config(str(folder))
    # The same two intra-op threads as every ORT session of the bench (GenAI 0.18 takes no session config
    # entries here, so ORT's thread spinning stays as GenAI sets it).
    config.overlay(json.dumps({"model": {"decoder": {"session_options": {
        "intra_op_num_threads": threads, "inter_op_num_threads": 1}}}}))
    return og.Model(config)


def _generator(model: og.Model, max_length: int) -> og.Generator:
    import onnxruntime_genai as og

    params = og.GeneratorParams(model)
    params.set_search_options(max_length=max_length, min_length=max_length, do_sample=False)
    return og.Generator(model, params)


def _decode_steps(model: og.Model, prompt: np.ndarray, new_tokens: int) -> tuple[list[float], list[int]]:
    generator = _generator(model, len(prompt) + new_tokens)
    generator.append_tokens(prompt)
    generator.generate_next_token()  # picks from the prompt's logits: no forward pass
    tokens, steps = [int(generator.get_next_tokens()[0])], []
    while not generator.is_done():
        start = time.perf_counter()
        generator.generate_next_token()
        steps.append(time.perf_counter() - start)
        tokens.append(int(generator.get_next_tokens()[0]))
    return steps, tokens


def _prefill(model: og.Model, prompt: np.ndarray) -> float:
    generator = _generator(model, len(prompt) + 1)
    start = time.perf_counter()
    generator.append_tokens(prompt)
    return time.perf_counter() - start


def measure(folders: dict[str, Path], prompt_ids: np.ndarray, settings: GenaiSpeedSettings,
            prefill_names: list[str] | None = None,
            log: Callable[[str], object] = print) -> dict[str, GenaiFigures]:
    """name -> {"decode_ms": p50 per token, "decode_runs": steps, "prefill_ms": p50 (for prefill_names),
    "tokens": the greedy continuation of the first round}. `prompt_ids` holds at least prefill_tokens ids."""
    import onnxruntime_genai as og

    if hasattr(og, "disable_telemetry_events"):
        og.disable_telemetry_events()
    prompt_ids = np.asarray(prompt_ids, dtype=np.int32)
    models, errors = {}, {}
    for name, folder in folders.items():
        try:
            models[name] = _load(folder, settings.threads)
            _decode_steps(models[name], np.asarray(prompt_ids[:4], dtype=np.int32), 2)
        except Exception as exc:  # a folder GenAI cannot run is reported by the caller
            models.pop(name, None)
            errors[name] = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:200]
    names = list(models)
    prefill_names = [n for n in (prefill_names if prefill_names is not None else names) if n in models]
    short = prompt_ids[: settings.prompt_tokens]
    long = prompt_ids[: settings.prefill_tokens]
    steps: dict[str, list[float]] = {n: [] for n in names}
    tokens: dict[str, list[int]] = {}
    prefill: dict[str, list[float]] = {n: [] for n in prefill_names}
    for name in names:  # warm-up: first runs allocate and pre-pack
        _decode_steps(models[name], short, 4)
    for r in range(settings.decode_rounds):
        order = names[r % len(names):] + names[: r % len(names)]
        for name in order:
            s, t = _decode_steps(models[name], short, settings.new_tokens)
            steps[name].extend(s)
            tokens.setdefault(name, t)
        log(f"  genai decode round {r + 1}/{settings.decode_rounds}")
    for name in prefill_names:
        _prefill(models[name], long)
    for r in range(settings.prefill_rounds):
        order = prefill_names[r % max(len(prefill_names), 1):] + prefill_names[: r % max(len(prefill_names), 1)]
        for name in order:
            prefill[name].append(_prefill(models[name], long))
    out: dict[str, GenaiFigures] = {name: {"error": error} for name, error in errors.items()}
    for name in names:
        out[name] = {"decode_ms": float(np.median(steps[name]) * 1e3), "decode_runs": len(steps[name]),
                     "tokens": tokens[name]}
        if name in prefill:
            out[name]["prefill_ms"] = float(np.median(prefill[name]) * 1e3)
            out[name]["prefill_runs"] = len(prefill[name])
    return out
