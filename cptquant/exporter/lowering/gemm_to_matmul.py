"""Gemm(A, B, C) -> MatMul(A, B) + Add(C) for quantized nn.Linear / Conv1D weights on 2-D inputs.

ORT's low-bit fusions and kernels take a MatMul (docs/ort-kernels.md). The site keeps how B reads as [K, N]
(transposed when transB, alpha folded in: a `GemmView`, applied when the MatMul pass reads B to replace
it); until then the MatMul reads B as stored.
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from ...errors import CptqError
from .base import LoweringPass
from .context import GemmView, Site, make_node, name_of, tensor_of


class GemmToMatMul(LoweringPass):
    def wanted(self, site: Site) -> bool:
        return site.use.op_type == "Gemm" and site.bits < 16

    def check_before(self, site: Site) -> None:
        if site.node.op_type != "Gemm":
            raise ir.passes.PreconditionError(f"{site.layer}: expected a Gemm, found {site.node.op_type}")

    def check_after(self, site: Site) -> None:
        if site.node.op_type != "MatMul" or site.gemm is None:
            raise ir.passes.PostconditionError(f"{site.layer}: the Gemm was not lowered to a MatMul")

    def lower(self, site: Site) -> None:
        lowering, names, gemm = self.lowering, self.lowering.names, site.node
        attrs = {name: attr.value for name, attr in gemm.attributes.items()}
        if attrs.get("transA", 0):
            raise CptqError(f"node {gemm.name}: Gemm with transA=1 is not supported")
        alpha, beta = float(attrs.get("alpha", 1.0)), float(attrs.get("beta", 1.0))
        site.gemm = GemmView(bool(attrs.get("transB", 0)), alpha)
        bias = gemm.inputs[2] if len(gemm.inputs) > 2 else None
        output, gemm_name = name_of(gemm.outputs[0]), name_of(gemm)
        mm_out = names.unique(output + "_matmul")  # taken even when unused: the names stay as before
        matmul = make_node("MatMul", [gemm.inputs[0], lowering.initializer(site.use.initializer)],
                           [mm_out if bias is not None else output], names.unique(gemm_name.replace("Gemm", "MatMul")))
        nodes = [matmul]
        if bias is not None:
            if beta != 1.0:
                if not bias.is_initializer():
                    raise CptqError(f"node {gemm.name}: Gemm with beta != 1 and a computed bias is not supported")
                scaled = ir.tensor(tensor_of(bias).numpy() * np.float32(beta))
                bias = lowering.add_initializer(site, name_of(bias) + "_beta", scaled, owned=False)
            nodes.append(make_node("Add", [matmul.outputs[0], bias], [output],
                                   names.unique(gemm_name.replace("Gemm", "Add"))))
        lowering.replace(gemm, nodes)
        site.node = matmul
