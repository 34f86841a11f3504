"""What a user sets for an export or an analysis, in three frozen parts, each validated once when it is made:
which calibration text (`CalibrationOptions`), how the passes score and share out bits (`AllocationOptions`),
and how weights are quantized (`QuantizationOptions`); `AnalysisOptions` composes them for the passes.

Each field's `metadata["help"]` is its one-line documentation and the command line's help text
(commands/options.py reads it), so the two cannot drift. The domains of the values live here too, so that
the passes, the quantizer and the commands read one list; a bad value raises CptqError with one line that
names the command-line option.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, fields, replace
from typing import Any

from .errors import CptqError

SUPPORTED_BITS = (16, 8, 4)
DEFAULT_BLOCK_SIZE = 32
MIN_BLOCK_SIZE = 16
ZERO_POINT_MODES = ("auto", "always", "never")
# auto: GPTQ searches each block's range weighted by its inputs' energy (quant/gptq.py), round-to-nearest keeps absmax.
CLIP_METHODS = ("auto", "absmax", "mse")
GRANULARITIES = ("layer", "block")
CCA_VARIANTS = ("cka", "cca", "svcca", "pwcca")
CURVATURES = ("fisher", "hutchinson")
LM_OBJECTIVES = ("kl", "ce")
MIN_SAMPLES = 8
MIN_SEQ_LEN = 8


def _help(text: str) -> dict[str, str]:
    return {"help": text}


def help_of(owner: type, name: str) -> str:
    """The one-line documentation of field `name` of the options dataclass `owner` (the CLI's help text)."""
    return str(_field(owner, name).metadata["help"])


def default_of(owner: type, name: str) -> Any:
    return _field(owner, name).default


def _field(owner: type, name: str) -> Any:
    for f in fields(owner):
        if f.name == name:
            return f
    raise KeyError(f"{owner.__name__} has no field {name!r}")


def _one_of(flag: str, value: object, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise CptqError(f"{flag} must be one of {', '.join(allowed)}, not {value!r}")


def fitting_block_size(in_features: int, block_size: int) -> int:
    """The requested block size, halved until it divides the layer's input size: a layer of input 16 or 48 (RoFormer's
    sinusoidal position table at 16 per head) takes blocks of 16 where the others take 32. Every layer of a plan
    divides by MIN_BLOCK_SIZE (layer_graph leaves the others FP32); the passes also halve below it for tiny layers."""
    while block_size > 1 and in_features % block_size:
        block_size //= 2
    return block_size


def check_block_size(block_size: int) -> None:
    """A quantization block: a power of two of at least MIN_BLOCK_SIZE (options, and every layer of a plan file)."""
    if block_size < MIN_BLOCK_SIZE or block_size & (block_size - 1):
        raise CptqError(f"block size {block_size} is not a power of two >= {MIN_BLOCK_SIZE}")


@dataclass(frozen=True)
class CalibrationOptions:
    calib: str | None = field(default=None, metadata=_help(
        "Calibration text: a text file, JSONL (see --text-field), or hf:NAME[:CONFIG]:SPLIT; "
        "not given: the offline corpus."))
    text_field: str = field(default="text", metadata=_help("JSONL field holding the text."))
    calib_samples: int = field(default=64, metadata=_help("Calibration samples."))
    seq_len: int = field(default=128, metadata=_help("Tokens per calibration sample."))
    seed: int = field(default=0, metadata=_help(
        "Seed for sampling and clustering; the same seed gives the same plan."))

    def __post_init__(self) -> None:
        if self.calib_samples < MIN_SAMPLES:
            raise CptqError(f"--calib-samples {self.calib_samples} is too small; use at least {MIN_SAMPLES}")
        if self.seq_len < MIN_SEQ_LEN:
            raise CptqError(f"--seq-len {self.seq_len} is too short; use at least {MIN_SEQ_LEN} tokens")


@dataclass(frozen=True)
class AllocationOptions:
    bit_widths: tuple[int, ...] = field(default=SUPPORTED_BITS, metadata=_help(
        "Bit widths to allocate, comma-separated."))
    granularity: str = field(default="layer", metadata=_help("Allocate bits per layer or per block."))
    target_bits: float | None = field(default=None, metadata=_help(
        "Budget: average bits per weight, embeddings and head included."))
    max_size_mb: float | None = field(default=None, metadata=_help("Budget: estimated model size in MB."))
    sparsity: tuple[float, ...] = field(default=(), metadata=_help(
        "PMPQ pruning: matched (to each layer's 4-bit error), or fixed sparsities, comma-separated (averaged)."))
    cca: str = field(default="cka", metadata=_help("CMPQ similarity: cka, cca, svcca or pwcca."))
    curvature: str = field(default="fisher", metadata=_help("TDMPQ second-order term: fisher or hutchinson."))
    lm_loss: str = field(default="kl", metadata=_help(
        "Language models: damage measured as KL divergence from the FP32 predictions (kl), or as the change of "
        "cross-entropy on the calibration text (ce: signed, and its sign does not carry to other text)."))
    hot_rows: bool = field(default=True, metadata=_help(
        "A 4-bit token embedding keeps the rows of the calibration text's tokens at 8 bits (at most 1/8 of the "
        "table; a table the LM head shares fills that 1/8 with the lowest ids)."))

    def __post_init__(self) -> None:
        if any(not 0 < s < 1 for s in self.sparsity):
            raise CptqError(f"sparsity {list(self.sparsity)} must be fractions strictly between 0 and 1")
        if not self.bit_widths or any(b not in SUPPORTED_BITS for b in self.bit_widths):
            raise CptqError(f"bit widths {list(self.bit_widths)} must be chosen from "
                            f"{', '.join(map(str, SUPPORTED_BITS))}")
        if self.granularity not in GRANULARITIES:
            raise CptqError(f"granularity {self.granularity!r} must be one of: {', '.join(GRANULARITIES)}")
        if self.cca not in CCA_VARIANTS:
            raise CptqError(f"CCA variant {self.cca!r} must be one of: {', '.join(CCA_VARIANTS)}")
        if self.lm_loss not in LM_OBJECTIVES:
            raise CptqError(f"--lm-loss {self.lm_loss!r} must be one of: {', '.join(LM_OBJECTIVES)}")
        if self.curvature not in CURVATURES:
            raise CptqError(f"curvature {self.curvature!r} must be one of: {', '.join(CURVATURES)}")
        if self.target_bits is not None and self.max_size_mb is not None:
            raise CptqError("give either a target of bits per weight or a maximum size, not both")
        if self.max_size_mb is not None and not 0 < self.max_size_mb < math.inf:  # inf: not JSON, and no budget
            raise CptqError(f"maximum size {self.max_size_mb} MB must be a positive number")
        if self.target_bits is not None:
            low, high = min(self.bit_widths), max(self.bit_widths)
            if not low <= self.target_bits <= high:  # the allocator's own rule, checked before any analysis
                raise CptqError(f"--target-bits {self.target_bits:g} is outside [{low}, {high}], the range of the "
                                "bit widths")


@dataclass(frozen=True)
class QuantizationOptions:
    block_size: int = field(default=DEFAULT_BLOCK_SIZE, metadata=_help(
        "Quantization block along the input (a power of two >= 16); a layer whose input it does not divide takes the "
        "largest power of two below it that does."))
    clip: str = field(default="auto", metadata=_help(
        "Scale choice: auto (GPTQ's codes search the clipping range, round-to-nearest takes absmax), absmax, "
        "or mse (every 4- and 8-bit weight searches it)."))
    zero_points: str = field(default="auto", metadata=_help(
        "Asymmetric weights with zero points: auto (at 4 bits), always, never."))

    def __post_init__(self) -> None:
        check_block_size(self.block_size)
        _one_of("--clip", self.clip, CLIP_METHODS)
        _one_of("--zero-points", self.zero_points, ZERO_POINT_MODES)


@dataclass
class AnalysisOptions:
    """What the passes read: the three validated parts, and the export's --format (a size budget counts the
    bytes of that format; "dynamic" differs). Not frozen for that one field: `--format auto` sets it once the
    format is measured, before the plan is made (format_choice.format_chooser)."""

    calibration: CalibrationOptions = CalibrationOptions()
    allocation: AllocationOptions = AllocationOptions()
    quantization: QuantizationOptions = QuantizationOptions()
    weight_format: str = "qdq"

    @classmethod
    def from_fields(cls, **values: Any) -> AnalysisOptions:
        """From the parts' fields by name (calib_samples=16, target_bits=5, block_size=64, ...)."""
        return cls().replaced(**values)

    def replaced(self, **values: Any) -> AnalysisOptions:
        """A copy with the named fields of any part changed; the changed parts are validated again."""
        parts: dict[str, Any] = {}
        for name, part in (("calibration", self.calibration), ("allocation", self.allocation),
                           ("quantization", self.quantization)):
            own = {key: values.pop(key) for key in [f.name for f in fields(part)] if key in values}
            if own:
                parts[name] = replace(part, **own)
        if "weight_format" in values:
            parts["weight_format"] = values.pop("weight_format")
        if values:
            raise TypeError(f"AnalysisOptions has no field {next(iter(values))!r}")
        return replace(self, **parts)
