"""The two reports cptquant writes, as typed, versioned records: the export's `model.report.json` and
`cptq verify`'s `report.json`.

Each has a JSON Schema in docs/schemas/ that a test validates real outputs against. `schema_version` grows
when a field changes meaning or goes away (adding an optional field does not change it); readers of a report
can refuse one whose version they do not know. The nested figures that other modules own (graph check,
parity, quality, speed) stay plain JSON objects here; the schemas name their fields.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from typing import Any, TypedDict

from .model_loading import TASK_CAUSAL_LM

EXPORT_REPORT_VERSION = 1
VERIFY_REPORT_VERSION = 1


class AnalysisSummary(TypedDict):
    """A sensitivity method's cost and calibration (plan_source.py records it while the plan is made)."""

    method: str
    cost_fpe: dict[str, float]  # method -> cost in forward-pass equivalents
    seconds: dict[str, float]  # method (and "forward", "setup") -> wall seconds
    calibration: Mapping[str, Any]  # what text, how many samples (passes.AnalysisResult.calibration)
    notes: list[str]


class ReportExtras(TypedDict, total=False):
    """What the plan factory leaves for the export report while it runs; the exporter reads it after the plan."""

    analysis: AnalysisSummary


@dataclass
class LayerReport:
    """One planned layer as lowered: bits, kernels, bytes before (FP32) and after, rounding error."""

    bits: int
    block_size: int | None  # None for a 16-bit layer: no blocks
    kernels: list[str]
    algorithm: str
    bytes_fp32: int
    bytes_after: int
    weight_mse: float
    outlier_channels: int = 0  # --format dynamic's smoothed input channels (written when > 0)
    hot_rows: int = 0  # a 4-bit table's rows kept at 8 bits (written when > 0)
    reads_table: str = ""  # a tied LM head reading this embedding layer's codes (written when set)

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        for optional in ("outlier_channels", "hot_rows", "reads_table"):
            if not data[optional]:
                del data[optional]
        return data


@dataclass
class ExportReport:
    """`model.report.json`: what an export wrote, how, and what it measured on the way."""

    cptquant_version: str
    onnxruntime_version: str
    onnx_opset: int
    model: str
    source: str
    trust_remote_code: bool
    task: str
    method: str
    clip: str
    weight_format: str
    algorithm: list[str]  # the algorithms of the 4/8-bit layers (rtn, gptq)
    average_bits: float | None  # parameter-weighted over the planned layers
    layers: dict[str, LayerReport]
    layers_not_in_onnx: list[str]  # layers of the model that no output of the ONNX graph needs
    graph_check: dict[str, Any]  # exporter/graph_check.py: the kernels ORT runs
    parity_vs_torch_fp32: dict[str, Any]  # exporter/parity.py
    fp32_reference_bytes: int
    fp16_reference_bytes: int
    timings_s: dict[str, float]
    baseline_fingerprint: str
    files: dict[str, int] = field(default_factory=dict)  # every file of the export (this report included): bytes
    sha256: dict[str, str] = field(default_factory=dict)  # every file but this report: what cptq verify checks
    # every layer left FP32 (no block size splits it, or not in the ONNX graph) -> why; written always, {} when
    # none (the schema does not require it: version-1 reports from before it was added lack it)
    layers_unquantized: dict[str, str] = field(default_factory=dict)
    model_bytes: int = 0  # model.onnx and its external data (or every file of model_files)
    total_bytes: int = 0  # the whole folder
    ratio_vs_fp16: float = 0.0
    ratio_vs_fp32: float = 0.0
    outlier_ratio: float | None = None  # --format dynamic only
    reduce_range: bool | None = None  # --format dynamic only: int8 weights within ±63 (quant/storage.py)
    genai_config: str | None = None  # causal LMs only: the genai_config.json written (None: none could be)
    # causal LMs only: the attention written (exporter/attention_fusion.py): GroupQueryAttention and how far its
    # logits/presents were from optimum's graph, or optimum's own and why
    attention: dict[str, Any] | None = None
    calibration_text: dict[str, Any] | None = None  # when calibration text was read: what --eval must not overlap
    analysis: AnalysisSummary | None = None  # a sensitivity method's cost and calibration
    verification: dict[str, Any] | None = None  # the short CPU verification (or why it has no figures)
    format_choice: dict[str, Any] | None = None  # --format auto: the format measured fastest, why, the timings
    # an encoder-decoder export's ONNX files, which model_bytes counts in full: each stores its own copy of the
    # weights it shares with another (the token embedding, a decoder layer in both decoders); None: one file
    model_files: list[str] | None = None
    schema_version: int = EXPORT_REPORT_VERSION

    def to_dict(self) -> dict[str, Any]:
        data = {name: value for name, value in self.__dict__.items() if name != "layers"}
        data["layers"] = {name: layer.to_dict() for name, layer in sorted(self.layers.items())}
        for optional in ("outlier_ratio", "reduce_range", "calibration_text", "analysis", "verification", "format_choice",
                         "model_files", "attention"):
            if data[optional] is None:
                del data[optional]
        if self.task != TASK_CAUSAL_LM:  # a causal LM states its genai_config.json, null when none was written
            del data["genai_config"]
        return data

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True) + "\n"


@dataclass
class VerifyReport:
    """`cptq verify`'s report.json: the figures per execution provider, the checks, the verdict."""

    cptquant_version: str
    onnxruntime_version: str
    output: str  # the export folder, resolved
    model: str | None
    task: str
    baseline: str  # what the thresholds compare with: fp32 or fp16
    quick: bool
    thresholds: dict[str, float | None]
    variants: dict[str, str]  # quantized / fp32 / fp16 -> the model file measured
    eps: dict[str, dict[str, Any]]  # execution provider -> device, onnxruntime, quality, speed
    skipped_eps: dict[str, str]  # execution provider -> why it was not measured
    checks: list[dict[str, Any]]
    passed: bool
    warnings: list[str]
    schema_version: int = VERIFY_REPORT_VERSION

    def to_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True) + "\n"
