"""The "lower" and "check" stages over every ONNX file of an export: one file, or an encoder-decoder model's
encoder and decoders. One plan covers them all; each file is lowered with the weight uses its own layer map
found and checked on its own, then the per-file records are merged for the report (bytes of every stored
copy, kernels of every use).
"""

from __future__ import annotations

import dataclasses
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx

from ..onnx_io.onnx_export import load_onnx_lazily
from ..plan import Plan
from ..quant.storage import FORMAT_NBITS, FORMAT_QDQ
from ..quant.weight_quantizers import RoundToNearest
from .fp32_files import Fp32Files
from .graph_check import GraphCheck, check_kernels
from .layer_map import LayerMap
from .lowering import KernelChoice, Lowered, LoweredLayer, lower_model
from .lowering.group_query_attention import AttentionSpec

Records = dict[str, LoweredLayer]  # layer -> how it was lowered in one file (or, merged, in all of them)


@dataclass(frozen=True)
class FileLowering:
    """What every file of the export is lowered with: the plan, the format, GPTQ or round-to-nearest, and
    the input smoothing factors and weight range of --format dynamic."""

    plan: Plan
    fmt: str
    quantizer: RoundToNearest
    smoothing: Mapping[str, np.ndarray]
    attention: AttentionSpec | None = None  # a decoder's attention rewritten into GroupQueryAttention first
    reduce_range: bool = False  # DynamicQuantizeMatMul's int8 weights within ±63 (KernelChoice)

    def kernels(self, per_layer: Mapping[str, str] | None = None) -> KernelChoice:
        return KernelChoice(self.fmt, dict(per_layer or {}), self.reduce_range)

    def lower(self, source: onnx.ModelProto, layer_map: LayerMap, base_dir: Path | None,
              kernels: KernelChoice | None = None) -> Lowered:
        """One file, with `kernels` instead of the format's own where given (the check's repair)."""
        kernels = kernels if kernels is not None else self.kernels()
        return lower_model(source, layer_map.uses(), self.plan, kernels, self.quantizer, self.smoothing,
                           base_dir=base_dir, attention=self.attention)


def lower_files(fp32: Fp32Files, layer_maps: Mapping[str, LayerMap], lowering: FileLowering,
                out_dir: Path) -> dict[str, Records]:
    """Lower and write each file in turn (its FP32 graph let go of as it is lowered): file -> its records."""
    per_file: dict[str, Records] = {}
    for name, out_name in fp32.names:
        lowered = lowering.lower(fp32.take(name), layer_maps[name], fp32.base_dirs[name])
        per_file[name] = lowered.layers
        lowered.write(out_dir / out_name)
        del lowered
    return per_file


def check_files(fp32: Fp32Files, layer_maps: Mapping[str, LayerMap], lowering: FileLowering, out_dir: Path,
                per_file: dict[str, Records]) -> tuple[GraphCheck, Records]:
    """The kernels ORT runs in each written file (a qdq layer it would not fuse is written again as
    MatMulNBits), as one check over the files, and the layers' records merged over the files. Raises
    when a quantized layer would still not run as a low-bit kernel."""
    checks = []
    lowered_files = dict(per_file)
    for name, out_name in fp32.names:
        graph_check = check_kernels(out_dir / out_name, lowered_files[name])
        if graph_check.unfused and lowering.fmt == FORMAT_QDQ:
            # Another ORT fusion pre-empted DQ -> MatMul for these layers (e.g. MatMul + Add + Relu becoming
            # FusedGemm); write MatMulNBits for them, which is what ORT would run.
            repaired = graph_check.unfused
            kernels = lowering.kernels({layer: FORMAT_NBITS for layer in repaired})
            source, base_dir = load_onnx_lazily(fp32.folder / name)
            lowered = lowering.lower(source, layer_maps[name], base_dir, kernels)
            del source
            lowered_files[name] = lowered.layers
            lowered.write(out_dir / out_name)
            del lowered
            graph_check = check_kernels(out_dir / out_name, lowered_files[name])
            graph_check.repaired = repaired
        checks.append(graph_check)
    merged = merge_checks(checks)
    merged.raise_if_unfused()
    return merged, merge_lowered(list(lowered_files.values()))


def merge_lowered(per_file: list[Records]) -> Records:
    """One record per layer over the files that hold it: its bytes (every stored copy) and kernels added up."""
    merged: Records = {}
    for records in per_file:
        for name, record in records.items():
            if name not in merged:
                merged[name] = dataclasses.replace(record, expected_kernels=list(record.expected_kernels),
                                                   new_initializers=list(record.new_initializers),
                                                   derived_tensors=list(record.derived_tensors))
                continue
            into = merged[name]
            into.expected_kernels += record.expected_kernels
            into.bytes_fp32 += record.bytes_fp32
            into.bytes_after += record.bytes_after
            into.mse = max(into.mse, record.mse)  # the same weight and plan: equal but for GPTQ's input scaling
    return merged


def merge_checks(checks: list[GraphCheck]) -> GraphCheck:
    """The kernel check of every file as one: kernels counted over the files, stragglers of any file."""
    if len(checks) == 1:
        return checks[0]
    kernels: Counter[str] = Counter()
    expected: Counter[str] = Counter()
    per_layer: dict[str, list[str]] = {}
    for check in checks:
        kernels.update(check.kernels)
        expected.update(check.expected_kernels)
        for name, ops in check.per_layer.items():
            per_layer.setdefault(name, []).extend(ops)
    return GraphCheck(dict(sorted(kernels.items())), per_layer,
                      sorted({n for c in checks for n in c.unfused}), sorted({n for c in checks for n in c.fp16_casts_left}),
                      sorted({n for c in checks for n in c.repaired}), dict(sorted(expected.items())))
