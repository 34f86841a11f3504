"""MatMul(A, W) -> MatMul(A, DequantizeLinear(codes, scales[, zero points], axis=0, block_size=B)).

Standard ONNX (opset 21) that ORT fuses into com.microsoft.MatMulNBits (docs/ort-kernels.md). The
graph check on the written file confirms the fusion; this pass ensures the pattern it matches.
"""

from __future__ import annotations

import dataclasses

import onnx_ir as ir

from ...quant.storage import FORMAT_QDQ, KERNEL_MATMUL_NBITS, BlockedQdq
from .context import Site, make_node, tensor_of
from .matmul import MatMulLowering, int_tensor

_QUANTIZED = {ir.DataType.INT4, ir.DataType.UINT4, ir.DataType.INT8, ir.DataType.UINT8}


class MatMulToBlockedDq(MatMulLowering):
    format = FORMAT_QDQ
    kernel = KERNEL_MATMUL_NBITS
    storage = BlockedQdq()

    def lower(self, site: Site) -> None:
        lowering, names, lp, base = self.lowering, self.lowering.names, site.plan, site.base
        weight_kn = lowering.weight_kn(site)
        qw = self.quantize(site, weight_kn)
        arrays = self.storage.encode(qw)
        codes = lowering.add_initializer(site, f"{base}.weight_q{lp.bits}", int_tensor(arrays["codes"], lp.bits,
                                                                                        qw.symmetric))
        scales, stored, factor_type = self.factors(site, arrays["scales"], f"{base}.weight_scale")
        inputs = [codes, scales]
        if not qw.symmetric:
            inputs.append(lowering.add_initializer(site, f"{base}.weight_zp",
                                                   int_tensor(arrays["zero_points"], lp.bits, False)))
        dq_out = names.unique(f"{base}.weight_dq")
        dq = make_node("DequantizeLinear", inputs, [dq_out], names.unique(f"{base}.DequantizeLinear"),
                       axis=0, block_size=lp.block_size)
        site.node.replace_input_with(1, lowering.add_constant_node(site, dq))
        k, n = weight_kn.shape
        stored_qw = dataclasses.replace(qw, scale=stored)
        self.record(site, self.storage.nbytes(k, n, lp.bits, qw.block_size, qw.symmetric, factor_type),
                    stored_qw.squared_error(weight_kn, mean=True), qw.block_size)

    def check_after(self, site: Site) -> None:
        dq = site.node.inputs[1].producer() if site.node.inputs[1] is not None else None
        if site.node.op_type != "MatMul" or dq is None or dq.op_type != "DequantizeLinear":
            raise ir.passes.PostconditionError(f"{site.layer}: the MatMul does not read a DequantizeLinear")
        codes = dq.inputs[0]
        if codes is None or not codes.is_initializer() or tensor_of(codes).dtype not in _QUANTIZED:
            raise ir.passes.PostconditionError(f"{site.layer}: the DequantizeLinear does not read integer codes")
        if dq.attributes["axis"].value != 0 or dq.attributes["block_size"].value != site.plan.block_size:
            raise ir.passes.PostconditionError(f"{site.layer}: the DequantizeLinear is not blocked along K")
