"""What flows through the SmolLM2 section: its settings in, one record per variant, the run's result out
(written as llm-results.json; llm_report.py turns it into the markdown section and the goals)."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TypedDict

from .genai_speed import GenaiFigures, GenaiSpeedSettings

# Variant names the goals and the table single out.
FP32 = "FP32"
# The k_quant_mixed layer choice through our own exporter: a peer's rule, our kernels and codes.
RULE = "cptq rule (k_quant_mixed)"
# TDMPQ given the rule's file size as its budget (--max-size-mb, measured on the rule's export in the same run).
AT_RULE_SIZE = "cptq tdmpq at the rule's size"
BUILDER_INT4 = "GenAI builder int4"

# A value among a variant's settings (a command line, a ratio, a flag...): printed in the table as it is.
Setting = str | int | float | bool | None


def first_line(exc: BaseException) -> str:
    """How a failure is recorded in a variant's `error`: its type and first line."""
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0] if text else ''}"[:300]


@dataclass
class LlmSettings:
    tokens: int = 16384
    # Every scored token has >= 64 tokens of context; 1.14 forward tokens per scored token (256/128: 2). All
    # variants x 16k tokens is most of this section's time: ~0.27 GFLOP per token and variant.
    window: int = 512
    stride: int = 448
    calib_samples: int = 32  # NNCF's calibration: the first 32 samples of our default calibration set
    # ORT's GPTQ runs the whole model once per distinct MatMul input and sample (121 inputs here): fewer samples.
    ort_gptq_samples: int = 16
    seq_len: int = 128
    speed: GenaiSpeedSettings = field(default_factory=GenaiSpeedSettings)
    include: tuple[str, ...] = ("ours", "nncf", "ort", "genai")

    @classmethod
    def quick(cls) -> LlmSettings:
        return cls(tokens=2048, calib_samples=16, ort_gptq_samples=8,
                   speed=GenaiSpeedSettings(new_tokens=16, decode_rounds=2, prefill_rounds=2))


class Quality(TypedDict):
    """One variant against FP32 on the same windows (llm_quality.score_against_reference)."""

    perplexity: float
    ppl_increase: float  # perplexity / FP32's - 1
    kl_divergence: float  # mean KL(FP32 || variant) of the next-token distribution
    top1_agreement: float  # share of tokens where the variant's top token is FP32's
    tokens: int  # tokens scored


@dataclass
class LlmVariant:
    name: str
    family: str  # "FP32", "cptq", "NNCF", "ORT MatMulNBits", "GenAI builder"
    path: Path
    model_bytes: int = 0
    average_bits: float | None = None
    settings: dict[str, Setting] = field(default_factory=dict)
    build_s: float = 0.0
    error: str = ""  # why it was not built or not measured
    kernels: dict[str, int] = field(default_factory=dict)  # bench/kernels.py's census of ORT's graph
    quality: Quality | None = None  # None: not measured
    speed: GenaiFigures = field(default_factory=lambda: GenaiFigures())  # decode_ms, prefill_ms under genai

    @property
    def ok(self) -> bool:
        return not self.error

    def to_dict(self) -> dict[str, object]:
        # An unmeasured variant's quality is written as {} (as its speed is).
        return {**asdict(self), "path": str(self.path), "quality": self.quality or {}}


class RunSettings(TypedDict):
    """The settings a run measured with, as the section's text states them."""

    tokens: int  # evaluation tokens actually scored
    window: int
    stride: int
    calibration_samples: int
    seq_len: int
    ort_gptq_samples: int
    speed: GenaiSpeedSettings
    eval_text: str  # where the evaluation text comes from


@dataclass
class LlmResult:
    variants: list[LlmVariant]
    seconds: dict[str, float]  # piece -> wall seconds
    loads: dict[str, float]  # piece -> 1-min load average when it ended
    cpu_seconds: dict[str, float]  # piece -> CPU seconds (process + children)
    settings: RunSettings
    notes: list[str] = field(default_factory=list)

    def by_name(self) -> dict[str, LlmVariant]:
        return {v.name: v for v in self.variants}

    def to_dict(self) -> dict[str, object]:
        return {"variants": [v.to_dict() for v in self.variants], "seconds": self.seconds,
                "cpu_seconds": self.cpu_seconds, "loads": self.loads,
                "settings": {**self.settings, "speed": asdict(self.settings["speed"])}, "notes": self.notes}
