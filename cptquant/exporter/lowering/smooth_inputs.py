"""X -> Mul(X, 1 / s) before each kernel whose weight was quantized as diag(s) W (`--format dynamic`).

SmoothQuant's identity X W = (X / s)(s W): the few input channels that peak far above the rest (s > 1)
no longer set the one activation scale per call of DynamicQuantizeMatMul. The Mul cannot be folded
upstream: a LayerNorm output also feeds the residual, and GELU is not linear. 1/s is a side input, not
the layer's weight: the graph check does not follow it.
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from ...quant.storage import InputSmoothing
from .base import LoweringPass
from .context import Site, input_of, make_node


class SmoothInputs(LoweringPass):
    storage = InputSmoothing()

    def wanted(self, site: Site) -> bool:
        return site.input_scale is not None

    def lower(self, site: Site) -> None:
        lowering, names, base, node, scale = self.lowering, self.lowering.names, site.base, site.node, site.input_scale
        assert scale is not None  # wanted() picks these sites
        inverse = np.asarray(1 / scale).astype(np.float32)
        factors = lowering.add_initializer(site, f"{base}.input_smoothing", ir.tensor(inverse), owned=False)
        scaled = names.unique(f"{base}.input_smoothed")
        mul = make_node("Mul", [node.inputs[0], factors], [scaled], names.unique(f"{base}.SmoothInput"))
        lowering.graph.insert_before(node, mul)
        node.replace_input_with(0, mul.outputs[0])
        site.nbytes += self.storage.nbytes(inverse.size)
        site.outlier_channels = int(np.count_nonzero(scale > 1))

    def check_after(self, site: Site) -> None:
        producer = input_of(site.node, 0).producer()
        if producer is None or producer.op_type != "Mul":
            raise ir.passes.PostconditionError(f"{site.layer}: its kernel does not read the smoothed input")
