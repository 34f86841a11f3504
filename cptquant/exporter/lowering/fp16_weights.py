"""16-bit weights: the initializer as FP16 and a Cast to float32, which ORT folds at session start.

Half the bytes on disk, FP32 compute (docs/ort-kernels.md). A weight with several 16-bit uses (a table
that a tied LM head reads through a Transpose) is written once; its later uses read the same Cast.
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from ...quant.storage import Fp16Weight
from .base import LoweringPass
from .context import Lowering, Site, make_node, tensor_of


class StoreWeightsAsFp16(LoweringPass):
    storage = Fp16Weight()

    def __init__(self, lowering: Lowering):
        super().__init__(lowering)
        self._restored: dict[str, ir.Value] = {}  # FP32 initializer -> the Cast of its FP16 copy

    def wanted(self, site: Site) -> bool:
        return site.bits == 16

    def lower(self, site: Site) -> None:
        lowering, names, base = self.lowering, self.lowering.names, site.base
        weight = lowering.initializer(site.use.initializer)
        restored = self._restored.get(site.use.initializer)
        if restored is None:
            half = lowering.add_initializer(site, f"{base}.weight_fp16",
                                            ir.tensor(lowering.array(site.use.initializer).astype(np.float16)))
            cast = make_node("Cast", [half], [names.unique(f"{base}.weight_cast")], names.unique(f"{base}.Cast"),
                             to=ir.DataType.FLOAT)
            restored = self._restored[site.use.initializer] = lowering.add_constant_node(site, cast)
            site.nbytes += self.storage.nbytes(tensor_of(weight).size)
        reader = site.node
        if site.use.via_transpose:
            reader = next(node for node, _ in weight.uses() if node.name == site.use.via_transpose)
        for i, value in enumerate(reader.inputs):
            if value is weight:
                reader.replace_input_with(i, restored)
        site.kernels.append(self.storage.kernel)

    def check_after(self, site: Site) -> None:
        if any(value is not None and value.name == site.use.initializer for value in site.node.inputs):
            raise ir.passes.PostconditionError(f"{site.layer}: still reads its float32 weight")
