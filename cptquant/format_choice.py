"""The MatMul weight format of an export when `--format` is not given (`auto`): chosen from measured speed.

`qdq` and `nbits` both run as MatMulNBits (ORT fuses blocked QDQ into it, docs/ort-kernels.md), `dynamic`
as DynamicQuantizeMatMul. Which is faster depends on the rows a call multiplies and on the CPU: on this
project's 2-core Xeon MatMulNBits matches the int8 GEMM at one row and is several times slower from 16 rows
on. So for an encoder the formats are measured on this machine's execution provider at the shapes such a
model serves (batch 1 and 8, sequence 16 and 128): the FP32 export lowered once per candidate format with one
uniform 8-bit plan (round to nearest: the kernels, not the plan, are compared), timed interleaved with FP32.
The fastest wins among the formats whose probe keeps a mean cosine to FP32 of at least MIN_PROBE_COSINE on
calibration sentences (never evaluation text). On a CPU whose int8 GEMM saturates full-range int8 weights (AVX2
without VNNI: runtimes/cpu.u8s8_gemm_saturates) the dynamic probe, like the export, has its weights within ±63
(`reduce_range`), so its cosine and speed are the file's. The choice, its timings and its reason go into the report.

Decoders are not measured: their decode step multiplies one row, where MatMulNBits is as fast as the int8
GEMM and rounds activations far less, so they keep `qdq` (MatMulNBits); so do encoder-decoder models, whose
generation is decoder steps (their encoder runs once per text).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from .model_loading import TASK_CAUSAL_LM, TASK_SEQ2SEQ
from .plan import uniform_plan
from .quant.storage import FORMAT_DYNAMIC, FORMAT_NBITS, FORMAT_QDQ
from .quant.weight_quantizers import RoundToNearest

if TYPE_CHECKING:
    import onnx
    import onnxruntime as ort
    from transformers import PretrainedConfig

    from .exporter.layer_map import WeightUse
    from .layer_graph import LayerGraph
    from .model_loading import LoadedModel
    from .options import AnalysisOptions
    from .runtimes.base import RuntimeAdapter

CANDIDATES = (FORMAT_QDQ, FORMAT_DYNAMIC)  # nbits is the kernel qdq becomes: measuring it again tells nothing
SHAPES = ((1, 16), (1, 128), (8, 128))  # (batch, sequence): the shapes the encoder goals name
PROBE_BITS = 8
MIN_PROBE_COSINE = 0.99  # cptq verify's default --min-cosine
QUALITY_TEXTS = 32


@dataclass
class FormatChoice:
    format: str
    reason: str
    measured: bool = False
    probe_bits: int = PROBE_BITS
    threads: int = 2
    load_average: float | None = None  # 1-minute load when measured: timings are shared-machine timings
    p50_ms: dict[str, dict[str, float]] = field(default_factory=dict)  # variant -> shape -> median ms
    speedup_vs_fp32: dict[str, float] = field(default_factory=dict)  # format -> geometric mean over shapes
    probe_cosine: dict[str, float] = field(default_factory=dict)  # format -> mean cosine to FP32
    seconds: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def decoder_choice() -> FormatChoice:
    return FormatChoice(FORMAT_QDQ, "decoder: its decode step multiplies one row, where MatMulNBits (qdq) is as fast "
                                    "as the int8 GEMM and rounds activations far less; not measured")


def choose_format(loaded: LoadedModel, model_proto: onnx.ModelProto, graph: LayerGraph,
                  uses: Mapping[str, Sequence[WeightUse]], fp32_dir: Path, work: Path,
                  calibration: AnalysisOptions | None = None, threads: int = 2, rounds: int = 9,
                  max_seconds: float = 30.0, reduce_range: bool = False) -> FormatChoice:
    """Lower `model_proto` (the FP32 export in `fp32_dir`; over 2 GB loaded without its weights, which are then
    read from `fp32_dir`) in each candidate format, time and score them. `calibration` (AnalysisOptions or None:
    the offline corpus) gives the sentences the probes are scored on; `reduce_range` is the export's."""
    if loaded.task in (TASK_CAUSAL_LM, TASK_SEQ2SEQ):
        return decoder_choice()
    from onnx.external_data_helper import uses_external_data

    from .exporter.lowering import KernelChoice, lower_model
    from .onnx_io.onnx_export import MODEL_FILE, save_onnx
    from .runtimes.cpu import CpuAdapter, u8s8_gemm_saturates

    start = time.perf_counter()
    texts = calibration_texts(calibration)
    plan = uniform_plan(graph, PROBE_BITS)
    paths = {"fp32": fp32_dir / MODEL_FILE}
    base_dir = fp32_dir if any(uses_external_data(t) for t in model_proto.graph.initializer) else None
    for fmt in CANDIDATES:
        paths[fmt] = work / fmt / MODEL_FILE
        kernels = KernelChoice(fmt, reduce_range=reduce_range)
        save_onnx(lower_model(model_proto, uses, plan, kernels, RoundToNearest(), base_dir=base_dir).model, paths[fmt])
    adapter = CpuAdapter(threads=threads)
    sessions = {name: adapter.session(path) for name, path in paths.items()}
    cosine = {fmt: _probe_cosine(adapter, sessions["fp32"], sessions[fmt], fp32_dir, loaded.config, texts)
              for fmt in CANDIDATES}
    p50 = _interleaved_p50(adapter, sessions, int(loaded.config.vocab_size),
                           usable_positions(loaded.config), rounds,
                           max_seconds)
    speedup = {fmt: float(np.exp(np.mean([np.log(p50["fp32"][k] / p50[fmt][k]) for k in p50["fp32"]])))
               for fmt in CANDIDATES}
    # On a CPU whose int8 GEMM saturates, full-range int8 weights give wrong products, whatever the probe's cosine.
    saturates = u8s8_gemm_saturates() and not reduce_range
    usable = [fmt for fmt in CANDIDATES if not (saturates and fmt == FORMAT_DYNAMIC)]
    good = [fmt for fmt in usable if cosine[fmt] >= MIN_PROBE_COSINE] or [FORMAT_QDQ]
    best = max(good, key=lambda fmt: speedup[fmt])
    others = ", ".join(f"{fmt} {speedup[fmt]:.2f}x" for fmt in CANDIDATES if fmt != best)
    dropped = [fmt for fmt in usable if fmt not in good]
    reason = (f"chosen on {adapter.name} at batch x sequence {', '.join(f'{b}x{s}' for b, s in SHAPES)}: "
              f"{best} {speedup[best]:.2f}x FP32 (geometric mean of medians, interleaved; {others})"
              + (f"; {', '.join(dropped)} left out: {PROBE_BITS}-bit probe cosine below {MIN_PROBE_COSINE}"
                 if dropped else "")
              + (f"; {FORMAT_DYNAMIC} left out: this CPU's int8 GEMM saturates full-range int8 weights (AVX2 "
                 f"without VNNI) and reduce_range is off" if saturates else "")
              + (f"; {FORMAT_DYNAMIC} measured with its int8 weights within ±63 (--reduce-range)" if reduce_range
                 else "")
              + f"; {FORMAT_NBITS} is the kernel qdq becomes")
    del sessions
    return FormatChoice(best, reason, True, PROBE_BITS, threads, round(_load(), 2),
                        {v: {k: round(ms, 3) for k, ms in by.items()} for v, by in p50.items()},
                        {k: round(v, 4) for k, v in speedup.items()}, {k: round(v, 5) for k, v in cosine.items()},
                        round(time.perf_counter() - start, 2))


# Models whose position ids start after the padding id (RoBERTa's create_position_ids_from_input_ids): a
# sequence of max_position_embeddings tokens would read past the position table.
POSITION_OFFSET_TYPES = ("roberta", "xlm-roberta", "camembert", "mpnet", "longformer", "data2vec-text", "ibert",
                         "xmod", "roberta-prelayernorm")


def usable_positions(config: PretrainedConfig) -> int:
    """The longest sequence the position table serves."""
    positions = int(getattr(config, "max_position_embeddings", 512) or 512)
    if getattr(config, "model_type", "") in POSITION_OFFSET_TYPES:
        positions -= int(getattr(config, "pad_token_id", 1) or 0) + 1
    return positions


def calibration_texts(calibration: AnalysisOptions | None) -> list[str]:
    """The first calibration texts the export reads anyway (the offline corpus is built once per process)."""
    from .passes.calibration import load_texts

    if calibration is None:
        return load_texts(None)[0][:QUALITY_TEXTS]
    spec = calibration.calibration
    return load_texts(spec.calib, spec.text_field, spec.seq_len)[0][:QUALITY_TEXTS]


def _load() -> float:
    import os

    return os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")


def _interleaved_p50(adapter: RuntimeAdapter, sessions: dict[str, ort.InferenceSession], vocab_size: int, max_positions: int, rounds: int,
                     max_seconds: float) -> dict[str, dict[str, float]]:
    """variant -> shape key -> median ms; variants rotate within each round so load falls on all alike."""
    from .onnx_io.inputs import feeds_for
    from .runtimes.base import timed

    names = list(sessions)
    out: dict[str, dict[str, float]] = {n: {} for n in names}
    budget = max_seconds / len(SHAPES)
    for batch, length in SHAPES:
        length = min(length, max_positions)
        ids = np.random.default_rng(0).integers(4, vocab_size, size=(batch, length), dtype=np.int64)
        bound = {n: {k: adapter.to_device(v) for k, v in feeds_for(s, ids).items()} for n, s in sessions.items()}
        for n in names:  # warm-up
            adapter.run_bound(sessions[n], bound[n])
        samples: dict[str, list[float]] = {n: [] for n in names}
        begin = time.perf_counter()
        for r in range(rounds):
            order = names[r % len(names):] + names[: r % len(names)]
            for n in order:
                samples[n].append(timed(lambda n=n: adapter.run_bound(sessions[n], bound[n])))
            if r >= 2 and time.perf_counter() - begin > budget:
                break
        for n in names:
            out[n][f"b{batch}_s{length}"] = float(np.median(samples[n]) * 1e3)
    return out


def _probe_cosine(adapter: RuntimeAdapter, reference: ort.InferenceSession, session: ort.InferenceSession,
                  folder: Path, config: PretrainedConfig, texts: list[str]) -> float:
    """Mean cosine between the first outputs of `reference` and `session` (token outputs mean-pooled)."""
    from .onnx_io.inputs import feeds_for
    from .runtimes.quality import TextEncoder

    encoder = TextEncoder(folder, config)
    cosines = []
    for start in range(0, len(texts), 8):
        ids, mask = encoder.batch(texts[start:start + 8], min(128, usable_positions(config)))
        a, b = (np.asarray(next(iter(adapter.run(s, feeds_for(s, ids, mask)).values())), dtype=np.float64)
                for s in (reference, session))
        if a.ndim == 3:
            w = mask[..., None].astype(np.float64)
            a, b = ((x * w).sum(axis=1) / np.maximum(w.sum(axis=1), 1.0) for x in (a, b))
        a, b = a.reshape(len(a), -1), b.reshape(len(b), -1)
        cosines += list((a * b).sum(1) / np.maximum(np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1), 1e-12))
    return float(np.mean(cosines))


def format_chooser(analysis: AnalysisOptions | None = None, threads: int = 2,
                   reduce_range: bool = False) -> Callable[..., FormatChoice]:
    """What the command hands the exporter for `--format auto`: the exporter calls it on its FP32 export
    before the plan (it imports no runtime itself); the choice also sets the format a size budget counts.
    `reduce_range`: the export's, which the dynamic probe is lowered with."""

    def choose(loaded: LoadedModel, model_proto: onnx.ModelProto, graph: LayerGraph,
               uses: Mapping[str, Sequence[WeightUse]], fp32_dir: Path, work: Path) -> FormatChoice:
        choice = choose_format(loaded, model_proto, graph, uses, fp32_dir, work, analysis, threads,
                               reduce_range=reduce_range)
        if analysis is not None:
            analysis.weight_format = choice.format
        return choice

    return choose
