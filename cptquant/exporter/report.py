"""The export report (`NAME.report.json`, reports.ExportReport): built once from what the export wrote and
measured, then written stating its own size."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import onnxruntime as ort

from ..onnx_io.onnx_export import MODEL_FILE
from ..plan import Plan
from ..reports import ExportReport, LayerReport
from ..version import __version__

if TYPE_CHECKING:
    from ..model_loading import LoadedModel
    from .graph_check import GraphCheck
    from .lowering import LoweredLayer
    from .parity import Parity


def files_size(paths: list[Path]) -> int:
    return sum(p.stat().st_size for p in paths)


def write_report(path: Path, report: ExportReport, other_files: list[Path], model_files: str | list[str]) -> None:
    """The report states its own size too: rewrite until the size it states is the size it has.

    `model_bytes` (model.onnx and its external data; a seq2seq export's encoder and decoder files, each with
    its own copy of the weights it shares with the others) is what the FP16/FP32 ratios compare, like for
    like with the reference exports; `total_bytes` is everything in the folder.
    """
    stems = [model_files] if isinstance(model_files, str) else model_files
    others = files_size(other_files)
    model_bytes = files_size([p for p in other_files if any(p.name.startswith(stem) for stem in stems)])
    report.model_bytes = model_bytes
    report.ratio_vs_fp16 = round(report.fp16_reference_bytes / model_bytes, 4)
    report.ratio_vs_fp32 = round(report.fp32_reference_bytes / model_bytes, 4)
    size = 0
    for _ in range(8):
        report.files[path.name] = size
        report.total_bytes = others + size
        text = report.to_json()
        if len(text.encode()) == size:
            break
        size = len(text.encode())
    path.write_text(text)


def build_report(loaded: LoadedModel, plan: Plan, rewritten: dict[str, LoweredLayer], absent: list[str],
                 unquantized: dict[str, str], graph_check: GraphCheck, parity: Parity, fp32_dir: Path, fp16_dir: Path,
                 timings: dict[str, float], fmt: str, opset: int, fingerprint: str,
                 model_files: tuple[str, ...] | list[str] = (MODEL_FILE,)) -> ExportReport:
    def model_bytes(folder: Path) -> int:
        return files_size([p for p in folder.iterdir() if any(p.name.startswith(stem) for stem in model_files)])

    fp32_bytes, fp16_bytes = model_bytes(fp32_dir), model_bytes(fp16_dir)
    total_params = sum(r.bytes_fp32 // 4 for r in rewritten.values())
    weighted_bits = sum(r.bits * (r.bytes_fp32 // 4) for r in rewritten.values())
    return ExportReport(
        cptquant_version=__version__,
        onnxruntime_version=ort.__version__,
        onnx_opset=opset,
        model=loaded.display_name,
        source=str(loaded.source),
        trust_remote_code=loaded.trust_remote_code,
        task=loaded.task,
        method=plan.method,
        clip=plan.clip,
        weight_format=fmt,
        algorithm=sorted({r.algorithm for r in rewritten.values() if r.bits < 16}),
        average_bits=round(weighted_bits / total_params, 4) if total_params else None,
        layers={name: LayerReport(bits=r.bits, block_size=r.block_size, kernels=r.expected_kernels,
                                  algorithm=r.algorithm, bytes_fp32=r.bytes_fp32, bytes_after=r.bytes_after,
                                  weight_mse=r.mse, outlier_channels=r.outlier_channels or 0,
                                  hot_rows=r.hot_rows or 0, reads_table=r.reads_table or "")
                for name, r in sorted(rewritten.items())},
        layers_not_in_onnx=absent,
        layers_unquantized=dict(sorted(unquantized.items())),
        graph_check=graph_check.to_dict(),
        parity_vs_torch_fp32=parity.to_dict(),
        fp32_reference_bytes=fp32_bytes,
        fp16_reference_bytes=fp16_bytes,
        timings_s={k: round(v, 3) for k, v in timings.items()},
        baseline_fingerprint=fingerprint,
    )
