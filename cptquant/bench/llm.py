"""SmolLM2-135M in `make bench`: our exports against the peers that do our job, side by side.

One straight chain, each stage in its own module: build or reuse every variant (llm_builds.py: one FP32
ONNX export shared by the peers built from ONNX, our `cptq-export` runs, NNCF, ORT's MatMulNBitsQuantizer,
ONNX Runtime GenAI's model builder), then measure every variant with the same code in the same run:

- MB on disk (the .onnx file and the external data it names);
- what ORT's optimized graph really runs for each weight (bench/kernels.py);
- quality on ~16k tokens of other-domain text, all variants window by window (llm_quality.py);
- decode ms/token and 256-token prefill under onnxruntime-genai, all variants interleaved
  (bench/genai_speed.py).

The result (llm_types.LlmResult) becomes the section's goals, table and plot in llm_report.py.
`python -m cptquant.bench --only llm --out DIR` runs this section alone.
"""

from __future__ import annotations

import shutil
from collections.abc import Callable
from pathlib import Path

import numpy as np

from ..runtimes.base import model_bytes
from ..runtimes.quality import TextEncoder, token_stream
from .clock import Clock
from .genai_speed import GenaiFigures, GenaiSpeedSettings
from .genai_speed import measure as genai_measure
from .kernels import kernel_census
from .llm_builds import build_variants
from .llm_quality import score_variants
from .llm_types import LlmResult, LlmSettings, LlmVariant, first_line


def _sizes_and_kernels(variants: list[LlmVariant], clock: Clock) -> None:
    for v in variants:
        if v.ok:
            v.model_bytes = model_bytes(v.path)
            try:
                v.kernels = clock.run("kernel census (ORT optimized graphs)", kernel_census, v.path)
            except Exception as exc:  # ORT cannot even load it: that is the finding
                v.error = f"ORT cannot load it: {first_line(exc)}"


def _speed(variants: list[LlmVariant], long_ids: np.ndarray, settings: GenaiSpeedSettings, clock: Clock,
           log: Callable[[str], object], notes: list[str]) -> None:
    with_genai = {v.name: v.path.parent for v in variants if v.ok and (v.path.parent / "genai_config.json").is_file()}
    speed: dict[str, GenaiFigures]
    try:
        speed = clock.run("decode + prefill under onnxruntime-genai (interleaved)", genai_measure, with_genai,
                          long_ids, settings, None, log)
    except ImportError:
        speed = {}
        notes.append("onnxruntime-genai is not installed: no decode or prefill figures.")
    for v in variants:
        v.speed = speed.get(v.name, {})
        if "error" in v.speed:
            notes.append(f"{v.name}: not run under onnxruntime-genai: {v.speed.pop('error')}")


def run_llm(root: Path, settings: LlmSettings | None = None, log: Callable[[str], object] = print,
            reuse: bool = False) -> LlmResult:
    from ..corpus import other_domain_paragraphs
    from ..testing import ensure_smollm2

    settings = settings or LlmSettings()
    clock = Clock(log, "[llm]")
    if not reuse:
        shutil.rmtree(root, ignore_errors=True)
    root.mkdir(parents=True, exist_ok=True)
    hf_dir = clock.run("SmolLM2 FP32 folder (cached recipe)", ensure_smollm2)
    built = build_variants(root, hf_dir, settings, clock, log, reuse)
    variants, notes = built.variants, built.notes
    _sizes_and_kernels(variants, clock)

    measured = [v for v in variants if v.ok]
    encoder = TextEncoder(root / "fp32", built.config)
    ids = token_stream(encoder, other_domain_paragraphs(), settings.tokens)
    scores = clock.run("quality (all variants, window by window)", score_variants, measured, ids, settings.window,
                       settings.stride, built.head_size, log)
    for v in measured:
        v.quality = scores.get(v.name)

    _speed(variants, token_stream(encoder, other_domain_paragraphs(), settings.speed.prefill_tokens), settings.speed,
           clock, log, notes)
    return LlmResult(variants, clock.seconds, clock.loads, clock.cpu,
                     {"tokens": int(len(ids)), "window": settings.window, "stride": settings.stride,
                      "calibration_samples": settings.calib_samples, "seq_len": settings.seq_len,
                      "ort_gptq_samples": settings.ort_gptq_samples, "speed": settings.speed,
                      "eval_text": "corpus.other_domain_paragraphs()"}, notes)
