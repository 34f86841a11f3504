"""The SmolLM2 section's variants and how each is built, or reused from ROOT/builds.json.

One FP32 ONNX export (optimum, opset 21, KV cache) is shared by every peer built from ONNX (NNCF,
ORT's MatMulNBitsQuantizer); ONNX Runtime GenAI's model builder exports from the same Hugging Face
folder itself; our variants come from `cptq-export` (run in-process with its command line, table
`OURS` below). A build that fails is a finding: the variant stays in the table with the reason.
"""

from __future__ import annotations

import json
import shutil
import time
from collections.abc import Callable
from contextlib import redirect_stderr, redirect_stdout
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, TypedDict, final

import numpy as np

from ..exporter.genai_config import write_genai_config
from ..onnx_io.baselines import baseline_dir
from ..onnx_io.onnx_export import MODEL_FILE, export_onnx
from ..runtimes.base import model_bytes
from ..runtimes.cpu import CpuAdapter
from .clock import Clock
from .llm_peers import (
    Built,
    NncfConfig,
    build_genai,
    build_nncf,
    build_ort_nbits,
    calibration_feeds,
    genai_builder_python,
    genai_versions,
)
from .llm_types import AT_RULE_SIZE, BUILDER_INT4, FP32, RULE, LlmSettings, LlmVariant, Setting, first_line

if TYPE_CHECKING:
    from transformers import PretrainedConfig

    from ..model_loading import LoadedModel

# Our variants: (name in the table, cptq-export options). Add a row to benchmark another export.
# Default options but the plan's: what a user gets (runs up to 593ff11 passed `--clip mse`, before `--clip auto`
# became the default; docs/benchmarks.md).
OURS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("cptq --bits 4", ("--bits", "4")),
    ("cptq tdmpq 4.5 bits", ("--method", "tdmpq", "--target-bits", "4.5")),
    ("cptq tdmpq 5 bits", ("--method", "tdmpq", "--target-bits", "5")),
    (RULE, ("--method", "rule")),
)
AT_RULE_SIZE_OPTIONS = ("--method", "tdmpq")

# NNCF: the ratio sweep (INT4 share; the rest INT8) at its sizes nearest ours, the other metric, AWQ + scale
# estimation, asymmetric INT4, and all_layers (embedding and LM head at INT4 too).
NNCF: tuple[NncfConfig, ...] = (
    NncfConfig("NNCF INT4_SYM r1.0", ratio=1.0),
    NncfConfig("NNCF INT4_SYM r0.8 Hessian", ratio=0.8),
    NncfConfig("NNCF INT4_SYM r0.8 default metric", ratio=0.8, sensitivity=None),
    NncfConfig("NNCF INT4_ASYM r1.0", mode="INT4_ASYM", ratio=1.0),
    NncfConfig("NNCF INT4_SYM r0.8 Hessian AWQ+SE", ratio=0.8, awq=True, scale_estimation=True),
    NncfConfig("NNCF INT4_SYM r1.0 all_layers", ratio=1.0, all_layers=True),
)
# ORT's GPTQ is left out: it runs the whole model once per distinct MatMul input and calibration sample
# (121 inputs here), about 4 hours on this machine with 16 samples; its build reached 1.7 % in 4 minutes.
ORT_ALGORITHMS = ("default", "k_quant")
GENAI_BUILDS: tuple[tuple[str, tuple[str, ...]], ...] = (
    (BUILDER_INT4, ()),
    ("GenAI builder k_quant_mixed", ("algo_config=k_quant_mixed",)),
    ("GenAI builder k_quant_last (int8 LM head)", ("algo_config=k_quant_last",)),
)


@final
class BuiltRecord(TypedDict):
    path: str
    average_bits: float | None
    settings: dict[str, Setting]
    build_s: float


@final
class FailedRecord(TypedDict):
    error: str
    build_s: float


BuildRecord = BuiltRecord | FailedRecord


class BuildRecords:
    """Each variant's build record (path, seconds, settings) in ROOT/builds.json. With `reuse`, a variant
    whose record and model file exist is not built again (for iterating on the measurement: the table then
    says the build time is an earlier run's); without it ROOT starts empty."""

    def __init__(self, root: Path, reuse: bool):
        self.path = root / "builds.json"
        self.records: dict[str, BuildRecord] = (json.loads(self.path.read_text()) if reuse and self.path.is_file()
                                                else {})

    def get(self, name: str) -> BuildRecord | None:
        record = self.records.get(name)
        return record if record and ("error" in record or Path(record["path"]).is_file()) else None

    def put(self, name: str, record: BuildRecord) -> None:
        self.records[name] = record
        self.path.write_text(json.dumps(self.records, indent=1, ensure_ascii=False) + "\n")


@dataclass(frozen=True)
class Made:
    """What building one variant gives: its .onnx file, its settings for the table, its average bits."""

    path: Path
    settings: dict[str, Setting]
    average_bits: float | None = None


def _peer(make: Callable[[], Built]) -> Made:
    built = make()
    return Made(built.path, built.settings)


class VariantBuilder:
    """Builds (or reuses) variants one after the other into `variants`, each build timed by the clock."""

    def __init__(self, records: BuildRecords, clock: Clock, fp32_dir: Path, log: Callable[[str], object]):
        self.records, self.clock, self.fp32_dir, self.log = records, clock, fp32_dir, log
        self.variants: list[LlmVariant] = []

    def build(self, name: str, family: str, make: Callable[[], Made],
              settings: dict[str, Setting] | None = None) -> None:
        """A failure is a finding, kept in the table. `settings`, where known before the build (our exports'
        command line): a record built with other settings is not reused."""
        record = self.records.get(name)
        if record is not None and settings is not None and record.get("settings", settings) != settings:
            self.log(f"[llm] {name}: built again (its options changed since the earlier run)")
            record = None
        if record is not None:
            self.log(f"[llm] {name}: reused from an earlier run")
            if "error" in record:
                self.variants.append(LlmVariant(name, family, Path(), error=record["error"],
                                                build_s=record["build_s"]))
            else:
                self.variants.append(LlmVariant(
                    name, family, Path(record["path"]), average_bits=record["average_bits"],
                    settings={**record["settings"], "built": "in an earlier run (--reuse)"}, build_s=record["build_s"]))
            return
        start = time.perf_counter()
        try:
            made = self.clock.run(f"build {name}", make)
            if made.path.parent != self.fp32_dir:
                write_genai_config(made.path.parent, made.path.name)
            variant = LlmVariant(name, family, made.path, average_bits=made.average_bits, settings=made.settings,
                                 build_s=time.perf_counter() - start)
            self.records.put(name, {"path": str(made.path), "average_bits": made.average_bits,
                                    "settings": made.settings, "build_s": variant.build_s})
        except Exception as exc:  # a variant the exporter does not offer yet, a peer that fails: reported
            variant = LlmVariant(name, family, Path(), error=first_line(exc), build_s=time.perf_counter() - start)
            self.records.put(name, {"error": variant.error, "build_s": variant.build_s})
            self.log(f"[llm] {name}: not built: {variant.error}")
        self.variants.append(variant)

    def build_peer(self, name: str, family: str, make: Callable[[], Built]) -> None:
        self.build(name, family, partial(_peer, make))


def export_ours(model_dir: Path, options: tuple[str, ...], out: Path, log_file: Path) -> Path:
    """`cptq-export MODEL OPTIONS -o OUT` in this process, exactly as a user runs it (no verification:
    the bench measures)."""
    from ..cli import export_app

    args = [str(model_dir), *options, "-o", str(out / MODEL_FILE), "--force", "--no-verify", "--no-progress"]
    with open(log_file, "w") as sink, redirect_stdout(sink), redirect_stderr(sink):
        code = export_app(args=args, standalone_mode=False)  # a user error returns 2 here instead of exiting
    if code not in (None, 0):
        errors = [line for line in log_file.read_text().splitlines() if line.startswith("error:")]
        raise RuntimeError(errors[-1] if errors else f"cptq-export exited with {code}")
    shutil.rmtree(baseline_dir(out, MODEL_FILE), ignore_errors=True)  # cptq verify's baselines: 0.8 GB each
    return out / MODEL_FILE


def _ours_settings(options: tuple[str, ...]) -> dict[str, Setting]:
    return {"cptq-export": " ".join(options)}


def _ours(hf_dir: Path, root: Path, options: tuple[str, ...], out: Path) -> Made:
    path = export_ours(hf_dir, options, out, root / f"{out.name}.log")
    bits: float = json.loads((out / "model.report.json").read_text())["average_bits"]
    return Made(path, _ours_settings(options), bits)


def _fp32(loaded: LoadedModel, fp32_dir: Path) -> Made:
    export_onnx(loaded, fp32_dir)
    write_genai_config(fp32_dir, MODEL_FILE)
    return Made(fp32_dir / MODEL_FILE, {})


def _folder(root: Path, name: str) -> Path:
    return root / "cptq" / name.replace(" ", "_").replace("-", "").replace("(", "").replace(")", "").replace("'", "")


@dataclass
class BuiltVariants:
    variants: list[LlmVariant]
    config: PretrainedConfig  # SmolLM2's: the quality text's tokenizer reads it
    head_size: int  # of the KV cache
    notes: list[str]


def _fp32_and_ours(builder: VariantBuilder, hf_dir: Path, root: Path,
                   settings: LlmSettings) -> tuple[PretrainedConfig, int, list[dict[str, np.ndarray]]]:
    """The stages that need SmolLM2 in torch: the FP32 export, our exports, the peers' calibration feeds.
    The torch model is freed when this returns, before the peers build."""
    from ..model_loading import load_model

    loaded = builder.clock.run("load SmolLM2 (torch)", load_model, str(hf_dir))
    builder.build(FP32, FP32, partial(_fp32, loaded, builder.fp32_dir))
    config = loaded.config
    head_size = int(getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads)
    if "ours" in settings.include:
        for name, options in OURS:
            builder.build(name, "cptq", partial(_ours, hf_dir, root, options, _folder(root, name)), _ours_settings(options))
        rule = next((v for v in builder.variants if v.name == RULE and v.ok), None)
        if rule is not None:
            budget = f"{model_bytes(rule.path) / 1e6:.2f}"  # decimal MB, as --max-size-mb counts
            at_rule_size = (*AT_RULE_SIZE_OPTIONS, "--max-size-mb", budget)
            builder.build(AT_RULE_SIZE, "cptq", partial(_ours, hf_dir, root, at_rule_size, _folder(root, AT_RULE_SIZE)),
                          _ours_settings(at_rule_size))
    probe = CpuAdapter(threads=2).session(builder.fp32_dir / MODEL_FILE)
    return config, head_size, calibration_feeds(loaded, probe, settings.calib_samples, settings.seq_len)


def _peers(builder: VariantBuilder, hf_dir: Path, root: Path, settings: LlmSettings,
           calibration: list[dict[str, np.ndarray]]) -> list[str]:
    """NNCF, ORT's quantizer and the GenAI model builder; returns notes for the section."""
    notes: list[str] = []
    fp32_dir = builder.fp32_dir
    if "nncf" in settings.include:
        for cfg in NNCF:
            builder.build_peer(cfg.name, "NNCF", partial(build_nncf, fp32_dir, root / "nncf" / cfg.name.replace(" ", "_"),
                                                         cfg, calibration))
    if "ort" in settings.include:
        for algorithm in ORT_ALGORITHMS:
            builder.build_peer(f"ORT MatMulNBits {algorithm}", "ORT MatMulNBits",
                               partial(build_ort_nbits, fp32_dir, root / "ort" / algorithm, algorithm,
                                       calibration[: settings.ort_gptq_samples]))
    if "genai" in settings.include:
        python = genai_builder_python()
        if python is None:
            notes.append("GenAI model builder not run: its venv .venv-genai is missing (`make genai-builder`).")
        else:
            notes.append(f"GenAI model builder from .venv-genai ({genai_versions(python)}).")
            for name, extra in GENAI_BUILDS:
                builder.build_peer(name, "GenAI builder", partial(build_genai, hf_dir, root / "genai" /
                                                                  name.split()[2].strip("()"), name, extra,
                                                                  root / "genai-cache"))
    return notes


def build_variants(root: Path, hf_dir: Path, settings: LlmSettings, clock: Clock, log: Callable[[str], object],
                   reuse: bool) -> BuiltVariants:
    """Every variant of the section, in the table's order: FP32, ours, NNCF, ORT, the GenAI builder."""
    builder = VariantBuilder(BuildRecords(root, reuse), clock, root / "fp32", log)
    config, head_size, calibration = _fp32_and_ours(builder, hf_dir, root, settings)
    notes = _peers(builder, hf_dir, root, settings, calibration)
    return BuiltVariants(builder.variants, config, head_size, notes)
