"""What the three MatMul lowerings share: which sites, the codes, the factors, and the record."""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from ...quant.quantize import QuantizedWeight
from ...quant.storage import stored_factors
from .base import LoweringPass
from .context import Site


def int_tensor(values: np.ndarray, bits: int, signed: bool) -> ir.TensorProtocol:
    """Integer codes as an ONNX int4/uint4/int8/uint8 tensor; 4-bit ones are written packed two per byte
    in raw_data (the int32_data field would spend a varint on each and outweigh the weights)."""
    if bits == 4:
        return ir.tensor(values, dtype=ir.DataType.INT4 if signed else ir.DataType.UINT4)
    return ir.tensor(values.astype(np.int8 if signed else np.uint8))


class MatMulLowering(LoweringPass):
    """Sites whose planned 4/8-bit weight a MatMul reads, written in `format` (the layer's KernelChoice)."""

    format = ""
    kernel = ""

    def wanted(self, site: Site) -> bool:
        return (site.use.op_type in ("MatMul", "Gemm") and site.bits < 16 and site.table_site is None
                and self.lowering.kernels.format_of(site.layer) == self.format)

    def check_before(self, site: Site) -> None:
        if site.node.op_type != "MatMul":  # Gemms are lowered to MatMul first
            raise ir.passes.PreconditionError(f"{site.layer}: expected a MatMul, found {site.node.op_type}")

    def quantize(self, site: Site, weight_kn: np.ndarray, block_size: int | None = None,
                 symmetric: bool | None = None, input_scale: np.ndarray | None = None) -> QuantizedWeight:
        """The codes of the plan's bits and clip; block size and symmetry as planned unless given."""
        lp = site.plan
        site.algorithm = self.lowering.quantizer.algorithm_for(site.layer, lp.bits)
        return self.lowering.quantizer(site.layer, weight_kn, lp.bits, block_size or lp.block_size,
                                       lp.symmetric if symmetric is None else symmetric, self.lowering.plan.clip,
                                       input_scale=input_scale)

    def factors(self, site: Site, values: np.ndarray, name: str) -> tuple[ir.Value, np.ndarray, str]:
        """Float32 factors a kernel reads (block scales, block ratios), written as float32 and filed for
        `StoreFactorsAsFp16`. Returns the initializer, the values as the file will hold them and their
        storage type, which the bytes and the error are counted with."""
        value = self.lowering.add_initializer(site, name, ir.tensor(values))
        stored, dtype = stored_factors(values)
        self.lowering.factors.append((site, value, name))
        return value, stored, dtype

    def record(self, site: Site, nbytes: int, mse: float, block_size: int) -> None:
        """What was written for `site`: its kernel, bytes, mean squared weight error and block size."""
        site.kernels.append(self.kernel)
        site.nbytes += nbytes
        site.mse = mse
        site.block_size = block_size
