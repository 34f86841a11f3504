"""Options shared by `cptq analyze` and `cptq-export --method`: calibration and bit allocation."""

from __future__ import annotations

from typing import Any

from typer import Option

from ..errors import CptqError
from ..options import AllocationOptions, AnalysisOptions, CalibrationOptions, QuantizationOptions, default_of, help_of

_SAME = object()  # the field's own default


def field_option(owner: type, name: str, flags: str, default: Any = _SAME) -> Any:
    """A typer option for field `name` of an options dataclass: its help is the field's documentation
    (cptquant/options.py), its default the field's unless the command line spells it differently."""
    return Option(default_of(owner, name) if default is _SAME else default, flags, help=help_of(owner, name))


CALIB = field_option(CalibrationOptions, "calib", "--calib")
TEXT_FIELD = field_option(CalibrationOptions, "text_field", "--text-field")
CALIB_SAMPLES = field_option(CalibrationOptions, "calib_samples", "--calib-samples")
SEQ_LEN = field_option(CalibrationOptions, "seq_len", "--seq-len")
SEED = field_option(CalibrationOptions, "seed", "--seed")
SPARSITY = field_option(AllocationOptions, "sparsity", "--sparsity", "matched")  # matched: the empty tuple
BIT_WIDTHS = field_option(AllocationOptions, "bit_widths", "--bit-widths",
                          ",".join(map(str, default_of(AllocationOptions, "bit_widths"))))
GRANULARITY = field_option(AllocationOptions, "granularity", "--granularity")
TARGET_BITS = field_option(AllocationOptions, "target_bits", "--target-bits")
MAX_SIZE_MB = field_option(AllocationOptions, "max_size_mb", "--max-size-mb")
CCA = field_option(AllocationOptions, "cca", "--cca")
CURVATURE = field_option(AllocationOptions, "curvature", "--curvature")
LM_LOSS = field_option(AllocationOptions, "lm_loss", "--lm-loss")
HOT_ROWS = field_option(AllocationOptions, "hot_rows", "--hot-rows/--no-hot-rows")
BLOCK_SIZE = field_option(QuantizationOptions, "block_size", "--block-size")
CLIP = field_option(QuantizationOptions, "clip", "--clip")
ZERO_POINTS = field_option(QuantizationOptions, "zero_points", "--zero-points")
TASK = Option(None, "--task", help="Override the task detected from the config.")
PROGRESS = Option(True, "--progress/--no-progress", help="Progress bars on stderr.")


def floats(text: str, what: str) -> tuple[float, ...]:
    try:
        return tuple(float(part) for part in text.split(",") if part.strip())
    except ValueError:
        raise CptqError(f"{what} {text!r} is not a comma-separated list of numbers") from None


def ints(text: str, what: str) -> tuple[int, ...]:
    values = floats(text, what)
    if any(v != int(v) for v in values):
        raise CptqError(f"{what} {text!r} must be whole numbers")
    return tuple(int(v) for v in values)


def analysis_options(calib: str | None, text_field: str, calib_samples: int, seq_len: int, seed: int,
                     sparsity: str, bit_widths: str, granularity: str, target_bits: float | None,
                     max_size_mb: float | None, block_size: int, clip: str, cca: str, curvature: str,
                     zero_points: str = "auto", hot_rows: bool = True, lm_loss: str = "kl") -> AnalysisOptions:
    from ..passes.calibration import check_calibration_file

    options = AnalysisOptions.from_fields(  # each part checks its values as it is made
        calib=calib, text_field=text_field, calib_samples=calib_samples, seq_len=seq_len, seed=seed,
        sparsity=sparsities(sparsity), bit_widths=ints(bit_widths, "--bit-widths"),
        granularity=granularity, target_bits=target_bits, max_size_mb=max_size_mb, block_size=block_size,
        clip=clip, cca=cca, curvature=curvature, zero_points=zero_points, hot_rows=hot_rows, lm_loss=lm_loss,
    )
    check_calibration_file(calib, text_field)  # a missing or binary file fails before any model loads
    return options


def sparsities(text: str) -> tuple[float, ...]:
    """--sparsity: `matched` (each layer pruned to its 4-bit error: the empty tuple) or fixed fractions."""
    return () if text.strip() == "matched" else tuple(floats(text, "--sparsity"))
