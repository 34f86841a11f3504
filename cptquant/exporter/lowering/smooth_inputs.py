"""X -> Mul(X, 1 / s) before each kernel whose weight was quantized as diag(s) W (`--format dynamic`).

SmoothQuant's identity X W = (X / s)(s W): the few input channels that peak far above the rest (s > 1)
no longer set the one activation scale per call of DynamicQuantizeMatMul. The Mul cannot be folded
upstream: a LayerNorm output also feeds the residual, and GELU is not linear. Layers that read the same
input with the same factors (an encoder's query, key and value) share one Mul and one 1/s. 1/s is a side
input, not the layer's weight: the graph check does not follow it.
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

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        # (the input value, 1/s's bytes) -> the Mul output that already computes it
        self._smoothed: dict[tuple[int, bytes], ir.Value] = {}
        return super().call(model)

    def lower(self, site: Site) -> None:
        lowering, names, base, node, scale = self.lowering, self.lowering.names, site.base, site.node, site.input_scale
        assert scale is not None  # wanted() picks these sites
        inverse = np.asarray(1 / scale).astype(np.float32)
        site.outlier_channels = int(np.count_nonzero(scale > 1))
        source = node.inputs[0]
        assert source is not None  # a MatMul kernel reads its input
        key = (id(source), inverse.tobytes())
        if key in self._smoothed:  # a sibling already scales this input by these factors
            node.replace_input_with(0, self._smoothed[key])
            return
        factors = lowering.add_initializer(site, f"{base}.input_smoothing", ir.tensor(inverse), owned=False)
        scaled = names.unique(f"{base}.input_smoothed")
        mul = make_node("Mul", [source, factors], [scaled], names.unique(f"{base}.SmoothInput"))
        # right after what computes the input, so that every sibling reading it later finds it computed
        producer = source.producer()
        if producer is not None and producer.graph is lowering.graph:
            lowering.graph.insert_after(producer, mul)
        else:  # a graph input
            lowering.graph.insert_before(next(iter(lowering.graph)), mul)
        node.replace_input_with(0, mul.outputs[0])
        self._smoothed[key] = mul.outputs[0]
        site.nbytes += self.storage.nbytes(inverse.size)

    def check_after(self, site: Site) -> None:
        producer = input_of(site.node, 0).producer()
        if producer is None or producer.op_type != "Mul":
            raise ir.passes.PostconditionError(f"{site.layer}: its kernel does not read the smoothed input")
