"""Lowering: give each planned layer its bit width in the ONNX graph, as small onnx-ir passes.

One pass per rewrite, each stating what it requires and ensures (`base.LoweringPass`), composed by
onnx-ir's PassManager over one shared `Lowering` (the planned layers' weight uses, names, what was
written). The passes decide the graph; how each kernel's tensors are laid out and how many bytes they
take is quant/storage.py's, which the allocator prices plans with. ORT's own view of the result (which
kernels its optimized graph runs) is checked on the written file: graph_check.py.

To add a way of lowering (another kernel, a routed path): a pass that picks
its sites by `wanted` and writes through the `Lowering`; a new storage layout goes into quant/storage.py.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnx_ir as ir
from onnx_ir.passes.common import RemoveUnusedNodesPass

from ...errors import CptqError
from ...onnx_io.streamed_write import write_consuming
from ...plan import Plan
from ...quant.storage import FORMAT_QDQ
from ...quant.weight_quantizers import RoundToNearest
from ..layer_map import WeightUse
from .base import LoweringPass
from .context import MS_DOMAIN, KernelChoice, Lowering
from .finish import Finish
from .fp16_factors import StoreFactorsAsFp16
from .fp16_weights import StoreWeightsAsFp16
from .fused_kernels import FuseSiblingKernels
from .gather_block_quantized import GatherToBlockQuantized
from .gemm_to_matmul import GemmToMatMul
from .group_query_attention import AttentionSpec, GroupQueryAttentionFusion
from .matmul_dynamic import MatMulToDynamicQuantize
from .matmul_nbits import MatMulToNBits
from .matmul_qdq import MatMulToBlockedDq
from .skip_rms_norm import SkipRmsNormFusion
from .smooth_inputs import SmoothInputs
from .tied_head import TiedHeadFromTable

__all__ = ["AttentionSpec", "KernelChoice", "Lowered", "LoweredLayer", "Lowering", "LoweringPass", "lower_model", "lowering_passes"]


@dataclass
class LoweredLayer:
    name: str
    bits: int
    block_size: int | None
    expected_kernels: list[str]  # what ORT must run for each use of this layer's weight
    bytes_fp32: int  # bytes of the weight as exported (every stored copy)
    bytes_after: int  # bytes of what replaced it (integers, scales, zero points)
    new_initializers: list[str] = field(default_factory=list)
    derived_tensors: list[str] = field(default_factory=list)  # computed from those initializers (folded by ORT)
    mse: float = 0.0  # mean squared weight error of the quantization (0 for 16 bits)
    outlier_channels: int = 0  # input channels scaled down before the int8 product (--format dynamic)
    algorithm: str = "rtn"  # how the codes were chosen: rtn or gptq (embedding tables: always rtn)
    hot_rows: int = 0  # rows of a 4-bit embedding table stored at 8 bits
    reads_table: str | None = None  # a tied LM head that reads this embedding layer's codes (tied_head.py)


@dataclass(frozen=True)
class SourceLayout:
    """What onnx-ir writes differently from the exporter's file, to put back as the exporter wrote it: its value
    infos (onnx-ir adds one per initializer, which carries its own type) and its opset list (onnx-ir spells out
    the default domain), plus com.microsoft for the kernels written. Copies: a reference into the source proto
    would keep all of it (its weights included) alive."""

    value_info: tuple[onnx.ValueInfoProto, ...]
    opset_import: tuple[onnx.OperatorSetIdProto, ...]

    @classmethod
    def of(cls, source: onnx.ModelProto) -> SourceLayout:
        def copied(message: Any) -> Any:
            twin = type(message)()
            twin.CopyFrom(message)
            return twin

        return cls(tuple(map(copied, source.graph.value_info)), tuple(map(copied, source.opset_import)))

    def apply(self, lowered: onnx.ModelProto) -> None:
        del lowered.graph.value_info[:]
        lowered.graph.value_info.extend(self.value_info)
        del lowered.opset_import[:]
        lowered.opset_import.extend(self.opset_import)
        if any(node.domain == MS_DOMAIN for node in lowered.graph.node):
            if not any(op.domain == MS_DOMAIN for op in lowered.opset_import):
                lowered.opset_import.append(onnx.helper.make_opsetid(MS_DOMAIN, 1))


@dataclass
class Lowered:
    """The lowered model (onnx-ir) and how each layer was lowered. `write` streams it to a file and spends it;
    `model` is its ModelProto, for a caller that wants it in memory."""

    ir_model: ir.Model
    layers: dict[str, LoweredLayer]
    layout: SourceLayout
    spent: bool = False  # `write` dropped the tensors: the model is no longer whole

    @cached_property
    def model(self) -> onnx.ModelProto:
        if self.spent:
            raise RuntimeError("the lowered model was written (and its tensors dropped): read the file instead")
        proto = ir.serde.serialize_model(self.ir_model)
        self.layout.apply(proto)
        return proto

    def write(self, path: Path) -> list[Path]:
        """Write the file (`path`, and `path`_data beside it over 2 GB) one initializer at a time, dropping each
        tensor once written: never the model twice in memory (onnx_io/streamed_write.py)."""
        if self.spent:
            raise RuntimeError("the lowered model was written once already (its tensors are gone)")
        self.spent = True
        return write_consuming(self.ir_model, path, finish=self.layout.apply)


def lowering_passes(lowering: Lowering) -> list[LoweringPass]:
    """In order: Gemms become MatMuls before the MatMul lowerings; a tied LM head reads the tables the Gather
    pass wrote; smoothing feeds the kernels the dynamic lowering wrote; factors go to FP16 once every
    kernel's are written; `Finish` lays the file out."""
    passes = (GemmToMatMul, StoreWeightsAsFp16, GatherToBlockQuantized, TiedHeadFromTable, MatMulToBlockedDq,
              MatMulToNBits,
              MatMulToDynamicQuantize, SmoothInputs, StoreFactorsAsFp16, Finish)
    return [make(lowering) for make in passes]


def attention_passes(spec: AttentionSpec) -> list[ir.passes.PassBase]:
    """A decoder's attention as GroupQueryAttention, then its residual Adds + RMSNorms fused (the graph the
    exporter proves against optimum's before it keeps either: exporter/attention_fusion.py), then what the
    norm fusion left unread (its Constants: axes, exponent, epsilon) dropped."""
    return [GroupQueryAttentionFusion(spec), SkipRmsNormFusion(), RemoveUnusedNodesPass()]


def lower_model(model: onnx.ModelProto, uses: Mapping[str, Sequence[WeightUse]], plan: Plan,
                kernels: KernelChoice = KernelChoice(), quantizer: RoundToNearest | None = None,
                smoothing: Mapping[str, np.ndarray] | None = None,
                passes: Callable[[Lowering], list[LoweringPass]] = lowering_passes,
                base_dir: Path | None = None, attention: AttentionSpec | None = None) -> Lowered:
    """Apply `plan` to the layers whose weights `uses` locates in `model`; `model` is left as it was.

    `kernels` chooses how each layer's 4/8-bit MatMul weights are written (--format, or per layer);
    `quantizer` turns MatMul weights into codes (round-to-nearest by default, or GPTQ); embedding tables
    are always round-to-nearest. `smoothing` (layer -> per-input-channel factors) scales outlier
    channels down before the int8 product of `--format dynamic` layers. `passes` makes the pass list.
    `base_dir`: where `model`'s external weights lie when it was loaded without them (a model over 2 GB):
    each is memory-mapped when read, and what the plan keeps in FP32 is read into the result at the end.
    `attention`: a decoder's attention is first rewritten into GroupQueryAttention (group_query_attention.py;
    exporter/attention_fusion.py decides it), before the weights are lowered; such a file already needs ORT's
    com.microsoft ops, so the exporter gives its layers nbits, not qdq (the MatMulNBits ORT would fuse qdq
    into), and kernels that read one input (q/k/v, gate/up) are fused into one (fused_kernels.py).
    """
    ir_model = ir.serde.deserialize_model(model)
    if base_dir is not None:
        ir.external_data.set_base_dir(ir_model.graph, base_dir)
    if attention is not None:
        _run_passes(ir_model, attention_passes(attention))
        if FORMAT_QDQ in (kernels.default, *kernels.per_layer.values()):  # the exporter chose nbits for it
            raise ValueError("a GroupQueryAttention file writes no DequantizeLinear: give it nbits, not qdq")
        passes = _with_sibling_fusion(passes)
    lowering = Lowering(ir_model, uses, plan, kernels, quantizer, smoothing)
    _run_passes(ir_model, passes(lowering))
    _read_kept_weights(ir_model)
    return Lowered(ir_model, _records(lowering), SourceLayout.of(model))


def _run_passes(ir_model: ir.Model, pass_list: Sequence[ir.passes.PassBase]) -> None:
    try:
        ir.passes.PassManager(pass_list)(ir_model)
    except ir.passes.PassError as exc:
        user_error = _user_error(exc)
        if user_error is None:
            raise
        raise user_error from None  # the one line the user reads; the pass manager's wrapping is noise


def _with_sibling_fusion(passes: Callable[[Lowering], list[LoweringPass]]) -> Callable[[Lowering], list[LoweringPass]]:
    """`passes`, with sibling MatMulNBits fused once every kernel and its FP16 factors are written (before Finish)."""
    def make(lowering: Lowering) -> list[LoweringPass]:
        made = passes(lowering)
        at = next((i for i, p in enumerate(made) if isinstance(p, Finish)), len(made))
        return made[:at] + [FuseSiblingKernels(lowering)] + made[at:]
    return make


def _read_kept_weights(model: ir.Model) -> None:
    """The external weights the lowering left as they were (norms, biases, FP32 layers) into memory, so that
    the written model holds them itself rather than pointing into the FP32 export's data file."""
    for value in model.graph.initializers.values():
        tensor = value.const_value
        if isinstance(tensor, ir.ExternalTensor):
            kept = ir.tensor(np.array(tensor.numpy()), name=tensor.name, doc_string=tensor.doc_string)
            kept.metadata_props.update(tensor.metadata_props)
            tensor.release()
            value.const_value = kept


def _user_error(exc: BaseException | None) -> CptqError | None:
    """The CptqError (bad input, said in one line) that the pass manager wrapped, if any."""
    while exc is not None and not isinstance(exc, CptqError):
        exc = exc.__cause__
    return exc


def _records(lowering: Lowering) -> dict[str, LoweredLayer]:
    records = {}
    for layer, sites in lowering.layers.items():
        lp = sites[0].plan
        record = LoweredLayer(layer, lp.bits, lp.block_size if lp.bits < 16 else None, [],
                              lowering.fp32_bytes[layer], 0)
        errors = []
        for site in sites:  # in the order of the layer's uses
            record.expected_kernels += site.kernels
            record.bytes_after += site.nbytes
            if site.mse is not None:
                errors.append(site.mse)
            if site.block_size is not None:
                record.block_size = site.block_size
            if site.algorithm is not None:  # a MatMul's or a 4-bit table's (smoothing: MatMuls alone)
                record.algorithm = site.algorithm
                record.outlier_channels = site.outlier_channels or 0
            if site.hot_rows is not None:
                record.hot_rows = site.hot_rows
            if site.table_site is not None:
                record.reads_table = site.table_site.layer
        record.mse = float(np.mean(errors)) if errors else 0.0
        record.new_initializers = lowering.owned[layer]
        record.derived_tensors = lowering.derived[layer]
        records[layer] = record
    return records
