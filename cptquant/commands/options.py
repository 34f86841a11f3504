"""Options shared by `cptq analyze` and `cptq-export --method`: calibration and bit allocation."""

from __future__ import annotations

from typing import TYPE_CHECKING

from typer import Option

from ..errors import CptqError
from ..plan import DEFAULT_BLOCK_SIZE

if TYPE_CHECKING:  # the passes (torch) load when a command runs, not on --help
    from ..passes import AnalysisOptions

CALIB = Option(None, "--calib", help="Calibration text: a text file, JSONL (see --text-field), or hf:NAME[:CONFIG]:SPLIT.")
TEXT_FIELD = Option("text", "--text-field", help="JSONL field holding the text.")
CALIB_SAMPLES = Option(64, "--calib-samples", help="Calibration samples.")
SEQ_LEN = Option(128, "--seq-len", help="Tokens per calibration sample.")
SEED = Option(0, "--seed", help="Seed for sampling and clustering; the same seed gives the same plan.")
SPARSITY = Option("matched", "--sparsity", help="PMPQ pruning: matched (to each layer's 4-bit error), or fixed "
                  "sparsities, comma-separated (averaged).")
BIT_WIDTHS = Option("16,8,4", "--bit-widths", help="Bit widths to allocate, comma-separated.")
GRANULARITY = Option("layer", "--granularity", help="Allocate bits per layer or per block.")
TARGET_BITS = Option(None, "--target-bits", help="Budget: average bits per weight, embeddings and head included.")
MAX_SIZE_MB = Option(None, "--max-size-mb", help="Budget: estimated model size in MB.")
BLOCK_SIZE = Option(DEFAULT_BLOCK_SIZE, "--block-size", help="Quantization block along the input (a power of two >= 16).")
CLIP = Option("absmax", "--clip", help="Scale choice: absmax, or mse (clip search).")
TASK = Option(None, "--task", help="Override the task detected from the config.")
PROGRESS = Option(True, "--progress/--no-progress", help="Progress bars on stderr.")
CCA = Option("cka", "--cca", help="CMPQ similarity: cka, cca, svcca or pwcca.")
ZERO_POINTS = Option("auto", "--zero-points", help="Asymmetric weights with zero points: auto (at 4 bits), always, never.")
HOT_ROWS = Option(True, "--hot-rows/--no-hot-rows",
                  help="A 4-bit token embedding keeps the rows of the calibration text's tokens at 8 bits "
                       "(at most 1/8 of the table; a table the LM head shares fills that 1/8 with the lowest ids).")
CURVATURE = Option("fisher", "--curvature", help="TDMPQ second-order term: fisher or hutchinson.")
LM_LOSS = Option("kl", "--lm-loss",
                 help="Language models: damage measured as KL divergence from the FP32 predictions (kl), or as the "
                      "change of cross-entropy on the calibration text (ce: signed, and its sign does not carry to "
                      "other text).")


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
    from ..passes import AnalysisOptions
    from ..passes.calibration import check_calibration_file

    options = AnalysisOptions(
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
