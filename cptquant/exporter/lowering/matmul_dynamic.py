"""MatMul(A, W) [+ Add(bias)] -> com.microsoft.DynamicQuantizeMatMul(A, W int8, column scales[, , bias]).

`--format dynamic`: the kernel quantizes A to uint8 per tensor at run time (docs/ort-kernels.md).
8 bits: symmetric int8 per output column, what ORT's quantize_dynamic writes (within ±63 with
`KernelChoice.reduce_range`, as its `reduce_range` does: quant/storage.py says why). 4 bits: the planned
blocked codes stay on disk; Cast/Sub/Mul/Round/Cast/Reshape compute the int8 weight from them, and
ORT constant-folds those at session start (it does not fold DequantizeLinear, hence plain ops). A
following `Add(bias[N])` moves into the kernel, as ORT's own fusion does. A layer with outlier
factors s (`Lowering.smoothing`) is quantized as diag(s) W; `SmoothInputs` then feeds it X / s.
"""

from __future__ import annotations

import functools

import numpy as np
import onnx_ir as ir

from ...quant.quantize import QuantizedWeight, quantize_columns_within
from ...quant.storage import FORMAT_DYNAMIC, INT8_MAX, KERNEL_DYNAMIC, REDUCED_RANGE_MAX, DynamicInt8
from .context import MS_DOMAIN, AttrValue, Site, make_node, name_of, tensor_of
from .matmul import MatMulLowering, int_tensor


class MatMulToDynamicQuantize(MatMulLowering):
    format = FORMAT_DYNAMIC
    kernel = KERNEL_DYNAMIC

    @functools.cached_property
    def storage(self) -> DynamicInt8:
        return DynamicInt8(REDUCED_RANGE_MAX if self.lowering.kernels.reduce_range else INT8_MAX)

    def lower(self, site: Site) -> None:
        lowering, names, lp, base, matmul = self.lowering, self.lowering.names, site.plan, site.base, site.node
        weight_kn = lowering.weight_kn(site)
        k, n = weight_kn.shape
        smoothing = lowering.smoothing.get(site.layer)
        source = weight_kn if smoothing is None else weight_kn * smoothing[:, None]
        if lp.bits == 8:
            qw = self._int8_columns(site, source, smoothing)
            arrays = self.storage.encode(qw)
            codes = lowering.add_initializer(site, f"{base}.weight_q8", int_tensor(arrays["codes"], 8, True))
            effective, factor_type = qw.dequantize(), "float16"
        else:
            qw = self.quantize(site, source, input_scale=smoothing)
            arrays = self.storage.encode(qw)
            codes, ratios, factor_type = self._expansion(site, arrays, qw.bits, qw.symmetric)
            effective = self.storage.effective_weight(arrays, ratios)
        column_scales = lowering.add_initializer(site, f"{base}.weight_scale", ir.tensor(arrays["column_scales"]))
        name = names.unique(name_of(matmul) + "DynamicQuantize")
        inputs: list[ir.Value | None] = [matmul.inputs[0], codes, column_scales]
        replaced = [matmul]
        bias_add = self._bias_add(matmul, n)
        if bias_add is not None:  # no zero point input: the weights are symmetric
            inputs += [None, bias_add[1]]
            replaced.append(bias_add[0])
        node = make_node(KERNEL_DYNAMIC, inputs, [name_of(replaced[-1].outputs[0])], name, domain=MS_DOMAIN)
        lowering.replace(replaced, [node])
        site.node = node
        if smoothing is not None:
            site.input_scale = smoothing
            effective = effective / smoothing[:, None]
        nbytes = self.storage.nbytes(k, n, lp.bits, qw.block_size, qw.symmetric, factor_type)
        self.record(site, nbytes, float(np.mean((effective - weight_kn) ** 2)), qw.block_size)

    def _int8_columns(self, site: Site, source: np.ndarray, smoothing: np.ndarray | None) -> QuantizedWeight:
        """An 8-bit layer's codes: per column, full range as planned, or within ±63 by round-to-nearest from
        absmax (as ORT's reduce_range; --clip is not searched on that grid). A sequential Hessian source still
        learns what the layer computes with."""
        if self.storage.weight_max == INT8_MAX:
            return self.quantize(site, source, block_size=source.shape[0], symmetric=True)
        site.algorithm = "rtn"
        qw = quantize_columns_within(source, self.storage.weight_max)
        self.lowering.quantizer.wrote(site.layer, qw, smoothing)
        return qw

    def _expansion(self, site: Site, arrays: dict[str, np.ndarray], bits: int, symmetric: bool) -> tuple[ir.Value, np.ndarray, str]:
        """The 4-bit codes, ratios and zero points, and the constant ops that make int8 of them:
        int8 = Round((q - zp) * ratio). Returns the int8 value, the ratios as stored and their type."""
        lowering, base = self.lowering, site.base
        blocks, block_size, n = arrays["codes"].shape
        codes = lowering.add_initializer(site, f"{base}.weight_q{bits}", int_tensor(arrays["codes"], bits, symmetric))
        ratio, stored, factor_type = self.factors(site, arrays["ratios"], f"{base}.weight_ratio")
        prelude = _Prelude(self, site, f"{base}.weight_int8")
        values = prelude.add("Cast", [codes], to=ir.DataType.FLOAT)
        if "zero_points" in arrays:
            zp = lowering.add_initializer(site, f"{base}.weight_zp", int_tensor(arrays["zero_points"], bits, False))
            values = prelude.add("Sub", [values, prelude.add("Cast", [zp], to=ir.DataType.FLOAT)])
        values = prelude.add("Mul", [values, ratio])
        values = prelude.add("Cast", [prelude.add("Round", [values])], to=ir.DataType.INT8)
        values = prelude.add("Reshape", [values, lowering.shape(site, (blocks * block_size, n))])
        return values, stored, factor_type

    def _bias_add(self, matmul: ir.Node, n: int) -> tuple[ir.Node, ir.Value] | None:
        """The `Add(bias[N])` that alone reads the MatMul's output, and its float32 bias initializer (seen
        through an `Identity`, the exporter's way of sharing equal biases)."""
        out = matmul.outputs[0]
        consumers = list(dict.fromkeys(node for node, _ in out.uses()))
        if len(consumers) != 1 or consumers[0].op_type != "Add" or out.is_graph_output():
            return None
        add = consumers[0]
        bias = [_through_identity(v) for v in add.inputs if v is not out]
        if len(bias) != 1 or bias[0] is None or not bias[0].is_initializer():
            return None
        tensor = tensor_of(bias[0])
        if list(tensor.shape) != [n] or tensor.dtype != ir.DataType.FLOAT:
            return None
        return add, bias[0]

    def check_after(self, site: Site) -> None:
        if site.node.op_type != KERNEL_DYNAMIC or site.node.domain != MS_DOMAIN:
            raise ir.passes.PostconditionError(f"{site.layer}: not lowered to DynamicQuantizeMatMul")


def _through_identity(value: ir.Value | None) -> ir.Value | None:
    producer = value.producer() if value is not None else None
    source = producer.inputs[0] if producer is not None and producer.op_type == "Identity" else None
    if source is not None and source.is_initializer():
        return source
    return value


class _Prelude:
    """Constant nodes of one layer's int8 expansion; their outputs are derived from its weight."""

    def __init__(self, lowering_pass: MatMulToDynamicQuantize, site: Site, base: str):
        self.lowering, self.site, self.base = lowering_pass.lowering, site, base

    def add(self, op: str, inputs: list[ir.Value], **attrs: AttrValue) -> ir.Value:
        names = self.lowering.names
        out = names.unique(self.base)
        node = make_node(op, inputs, [out], names.unique(f"{self.base}.{op}"), "", **attrs)
        return self.lowering.add_constant_node(self.site, node, derived=True)
