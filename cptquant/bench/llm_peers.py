"""The peers that do our job on an LLM, each built the way its users build it, from one FP32 export.

- NNCF `compress_weights` on the ONNX model (INT4 with INT8 backup layers, data-aware on our
  calibration text). Its ONNX backend takes `awq` and `scale_estimation`; `gptq` and
  `lora_correction` it refuses (nncf 3.4). Without `all_layers` it keeps the token embedding and
  the LM head at INT8 (asymmetric, per channel).
- ONNX Runtime's `MatMulNBitsQuantizer`: default (RTN), k_quant (llama.cpp's scale search), GPTQ;
  block 32. It quantizes MatMul weights only: the embedding stays FP32.
- ONNX Runtime GenAI's model builder (`python -m onnxruntime_genai.models.builder -p int4 -e cpu`),
  which exports from the Hugging Face folder itself (its own graph: GroupQueryAttention, a shared
  4-bit embedding/LM head for tied models). It needs transformers 5, so it runs from its own venv.
Every folder gets the FP32 export's config, tokenizer and genai_config.json (the same graph
inputs/outputs), so the same quality code and GenAI's runtime read every variant.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import onnx

from ..onnx_io.baselines import side_files
from ..onnx_io.onnx_export import MODEL_FILE, save_onnx
from .llm_types import Setting

if TYPE_CHECKING:
    import onnxruntime as ort

    from ..model_loading import LoadedModel

GENAI_VENV = Path(os.environ.get("CPTQ_GENAI_VENV", ".venv-genai"))


@dataclass
class Built:
    name: str
    family: str  # "NNCF", "ORT MatMulNBits", "GenAI builder"
    path: Path  # the .onnx file
    settings: dict[str, Setting] = field(default_factory=dict)
    seconds: float = 0.0


def _with_side_files(fp32_dir: Path, out_dir: Path) -> None:
    for side in side_files(fp32_dir):
        shutil.copy2(side, out_dir / side.name)


# ---------------------------------------------------------------- NNCF


@dataclass(frozen=True)
class NncfConfig:
    name: str
    mode: str = "INT4_SYM"  # or INT4_ASYM
    ratio: float = 1.0  # share of the weights at 4 bits; the rest at the backup precision (INT8_ASYM)
    sensitivity: str | None = "HESSIAN_INPUT_ACTIVATION"  # None: NNCF's default with data (MAX_ACTIVATION_VARIANCE)
    awq: bool = False
    scale_estimation: bool = False
    all_layers: bool = False


def fold_weight_transposes(model: onnx.ModelProto) -> int:
    """Replace each `Transpose` of an initializer by the transposed initializer; returns how many.

    optimum stores a tied LM head as `Transpose(embed_tokens.weight)` (one copy of the table on disk). NNCF 3.4
    fails on that graph in every configuration ("There is no tensor with the name
    model.embed_tokens.weight_transposed"): it takes the Transpose's output for an initializer. Folding it,
    as a user would to get NNCF to run, stores the LM head as its own transposed copy."""
    from onnx import numpy_helper

    initializers = {t.name: t for t in model.graph.initializer}
    folded = []
    for node in model.graph.node:
        if node.op_type == "Transpose" and node.input[0] in initializers:
            perm = next((list(a.ints) for a in node.attribute if a.name == "perm"), None)
            array = numpy_helper.to_array(initializers[node.input[0]])
            model.graph.initializer.append(numpy_helper.from_array(array.transpose(perm), node.output[0]))
            folded.append(node)
    for node in folded:
        model.graph.node.remove(node)
    return len(folded)


def build_nncf(fp32_dir: Path, out_dir: Path, config: NncfConfig,
               calibration: list[dict[str, np.ndarray]]) -> Built:
    import nncf

    start = time.perf_counter()
    model = onnx.load(str(fp32_dir / MODEL_FILE))
    folded = fold_weight_transposes(model)
    kwargs: dict[str, Any] = dict(mode=getattr(nncf.CompressWeightsMode, config.mode), ratio=config.ratio,
                                  group_size=32, all_layers=config.all_layers)
    if calibration:
        kwargs.update(dataset=nncf.Dataset(calibration), subset_size=len(calibration))
    if config.sensitivity:
        kwargs["sensitivity_metric"] = getattr(nncf.SensitivityMetric, config.sensitivity)
    if config.awq:
        kwargs["awq"] = True
    if config.scale_estimation:
        kwargs["scale_estimation"] = True
    compressed = nncf.compress_weights(model, **kwargs)
    out_dir.mkdir(parents=True, exist_ok=True)
    save_onnx(compressed, out_dir / MODEL_FILE)
    _with_side_files(fp32_dir, out_dir)
    settings: dict[str, Setting] = {"mode": config.mode, "ratio": config.ratio, "group_size": 32, "all_layers": config.all_layers,
                "sensitivity_metric": config.sensitivity or "default (MAX_ACTIVATION_VARIANCE)",
                "awq": config.awq, "scale_estimation": config.scale_estimation,
                "calibration_samples": len(calibration), "weight Transposes folded first": folded}
    return Built(config.name, "NNCF", out_dir / MODEL_FILE, settings, time.perf_counter() - start)


# ---------------------------------------------------------------- ORT MatMulNBitsQuantizer


class _Reader:
    """ORT's CalibrationDataReader protocol over a list of feeds (GPTQ deep-copies and iterates it)."""

    def __init__(self, feeds: list[dict[str, np.ndarray]]):
        self.feeds = feeds
        self._it = iter(feeds)

    def get_next(self) -> dict[str, np.ndarray] | None:
        return next(self._it, None)

    def rewind(self) -> None:
        self._it = iter(self.feeds)

    def __iter__(self) -> Iterator[dict[str, np.ndarray]]:
        return iter(self.feeds)

    def __deepcopy__(self, memo: dict[int, object]) -> _Reader:
        return _Reader(self.feeds)


def build_ort_nbits(fp32_dir: Path, out_dir: Path, algorithm: str,
                    calibration: list[dict[str, np.ndarray]]) -> Built:
    """algorithm: "default" (RTN, symmetric), "k_quant" or "gptq"; block 32, MatMul weights only."""
    from onnxruntime.quantization import matmul_nbits_quantizer as mnq

    start = time.perf_counter()
    model = onnx.load(str(fp32_dir / MODEL_FILE))
    configs: dict[str, Callable[[], object] | None] = {
        "default": None,
        "k_quant": lambda: mnq.KQuantWeightOnlyQuantConfig(),
        "gptq": lambda: mnq.GPTQWeightOnlyQuantConfig(calibration_data_reader=_Reader(calibration), block_size=128),
    }
    make_config = configs[algorithm]
    algo_config = make_config() if make_config is not None else None
    quantizer = mnq.MatMulNBitsQuantizer(model, bits=4, block_size=32, is_symmetric=True, algo_config=algo_config)
    quantizer.process()
    proto = quantizer.model.model if hasattr(quantizer.model, "model") else quantizer.model
    out_dir.mkdir(parents=True, exist_ok=True)
    save_onnx(proto, out_dir / MODEL_FILE)
    _with_side_files(fp32_dir, out_dir)
    settings: dict[str, Setting] = {"algorithm": algorithm, "bits": 4, "block_size": 32, "symmetric": algorithm == "default"}
    if algorithm == "gptq":
        settings["calibration_samples"] = len(calibration)
    return Built(f"ORT MatMulNBits {algorithm}", "ORT MatMulNBits", out_dir / MODEL_FILE, settings,
                 time.perf_counter() - start)


# ---------------------------------------------------------------- ONNX Runtime GenAI model builder


def genai_builder_python() -> Path | None:
    python = GENAI_VENV / "bin" / "python"
    return python if python.is_file() else None


def build_genai(hf_dir: Path, out_dir: Path, name: str, extra_options: tuple[str, ...], cache: Path) -> Built:
    """`python -m onnxruntime_genai.models.builder -i HF_DIR -o OUT -p int4 -e cpu [--extra_options ...]` in
    the builder's own venv (make genai-builder)."""
    python = genai_builder_python()
    if python is None:
        raise RuntimeError(f"the GenAI model builder's venv {GENAI_VENV} is missing (make genai-builder)")
    start = time.perf_counter()
    command = [str(python), "-m", "onnxruntime_genai.models.builder", "-i", str(hf_dir), "-o", str(out_dir),
               "-p", "int4", "-e", "cpu", "-c", str(cache)]
    if extra_options:
        command += ["--extra_options", *extra_options]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    done = subprocess.run(command, capture_output=True, text=True, env=env)
    if done.returncode != 0:
        tail = (done.stderr or done.stdout).strip().splitlines()[-3:]
        raise RuntimeError(f"GenAI builder failed ({' '.join(extra_options) or 'int4'}): {' | '.join(tail)}")
    settings: dict[str, Setting] = {"command": " ".join(["python -m onnxruntime_genai.models.builder -i SMOLLM2 -o OUT -p int4 -e cpu"]
                                    + (["--extra_options", *extra_options] if extra_options else []))}
    return Built(name, "GenAI builder", out_dir / MODEL_FILE, settings, time.perf_counter() - start)


def calibration_feeds(loaded: LoadedModel, session: ort.InferenceSession, samples: int,
                      seq_len: int) -> list[dict[str, np.ndarray]]:
    """Our calibration text (the offline corpus, as `cptq-export` reads it by default), one sample per
    feed, unpadded, with an empty KV cache: the inputs NNCF and ORT's GPTQ run the ONNX model on."""
    from ..onnx_io.inputs import feeds_for
    from ..passes.calibration import build_calibration

    calib = build_calibration(loaded, None, "text", samples, seq_len, 0)
    feeds = []
    for batch in calib.batches:
        for row in range(batch["input_ids"].shape[0]):
            length = int(batch["attention_mask"][row].sum())
            feeds.append(feeds_for(session, batch["input_ids"][row : row + 1, :length].numpy()))
    return feeds


def genai_versions(python: Path) -> str:
    """onnxruntime-genai and transformers versions of the builder's venv, for the report."""
    done = subprocess.run([str(python), "-c", "import onnxruntime_genai as og, transformers as t; "
                                              "print(f'onnxruntime-genai {og.__version__}, transformers {t.__version__}')"],
                          capture_output=True, text=True)
    return done.stdout.strip() or "unknown versions"
