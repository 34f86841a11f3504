"""Float32 factors a kernel reads (block scales, the dynamic format's block ratios) -> FP16 + Cast.

ORT's constant folding (level 1) removes the Cast before its QDQ fusions (level 2) run, so the kernel
is the same, with float32 factors, and they take half the bytes: 0.5 bit per weight instead of 1 at
blocks of 32 (docs/ort-kernels.md). Factors FP16 cannot hold (overflow, or a non-zero one that
underflows) stay float32. The MatMul passes count bytes and errors with the same rule
(`quant.storage.stored_factors`).
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from ...quant.storage import fp16_holds
from .base import LoweringPass
from .context import Site, make_node, name_of, tensor_of


class StoreFactorsAsFp16(LoweringPass):
    def wanted(self, site: Site) -> bool:
        return any(owner is site for owner, _, _ in self.lowering.factors)

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        self._check_model(model)
        lowering, modified = self.lowering, False
        for site, factors, name in lowering.factors:
            values = tensor_of(factors).numpy()
            if not fp16_holds(values):
                continue
            key = lowering.key_of(factors)
            half = lowering.add_initializer(site, f"{name}_fp16", ir.tensor(values.astype(np.float16)), key=key)
            # The Cast's output takes the float32 tensor's name: the kernels read the same name as before.
            cast = make_node("Cast", [half], [name_of(factors)], lowering.names.unique(f"{name}.Cast"),
                             to=ir.DataType.FLOAT)
            restored = lowering.add_constant_node(site, cast, derived=True, key=key, first=True)
            factors.replace_all_uses_with(restored)
            lowering.drop_initializer(factors)
            modified = True
        return ir.passes.PassResult(model, modified)

    def check_after(self, site: Site) -> None:
        for owner, factors, _ in self.lowering.factors:
            if owner is site and factors.is_initializer() and fp16_holds(tensor_of(factors).numpy()):
                raise ir.passes.PostconditionError(f"{site.layer}: factors {factors.name} left in float32")
