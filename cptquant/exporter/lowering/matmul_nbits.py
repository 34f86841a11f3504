"""MatMul(A, W) -> com.microsoft.MatMulNBits(A, codes, scales[, zero points]).

The kernel ORT's own DQ -> MatMul fusion produces (accuracy level 4: int8 activations inside the
kernel), written directly: `--format nbits`, and the layers whose DQ -> MatMul another ORT fusion
pre-empts (docs/ort-kernels.md, "FusedGemm").
"""

from __future__ import annotations

import dataclasses

import onnx_ir as ir

from ...quant.storage import FORMAT_NBITS, KERNEL_MATMUL_NBITS, BlockedNBits
from .context import MS_DOMAIN, Site, make_node, name_of
from .matmul import MatMulLowering

NBITS_ACCURACY_LEVEL = 4


class MatMulToNBits(MatMulLowering):
    format = FORMAT_NBITS
    kernel = KERNEL_MATMUL_NBITS
    storage = BlockedNBits()

    def lower(self, site: Site) -> None:
        lowering, names, base, matmul = self.lowering, self.lowering.names, site.base, site.node
        weight_kn = lowering.weight_kn(site)
        qw = self.quantize(site, weight_kn)
        k, n = qw.q.shape
        arrays = self.storage.encode(qw)
        codes = lowering.add_initializer(site, f"{base}.weight_q{qw.bits}", ir.tensor(arrays["codes"]))
        scales, stored, factor_type = self.factors(site, arrays["scales"], f"{base}.weight_scale")
        inputs = [matmul.inputs[0], codes, scales]
        if not qw.symmetric:  # without zero points the kernel assumes 2^(bits-1): the symmetric case
            inputs.append(lowering.add_initializer(site, f"{base}.weight_zp", ir.tensor(arrays["zero_points"])))
        node = make_node(KERNEL_MATMUL_NBITS, inputs, [name_of(matmul.outputs[0])], names.unique(name_of(matmul) + "NBits"),
                         domain=MS_DOMAIN, K=k, N=n, bits=qw.bits, block_size=qw.block_size,
                         accuracy_level=NBITS_ACCURACY_LEVEL)
        lowering.replace(matmul, [node])
        site.node = node
        stored_qw = dataclasses.replace(qw, scale=stored.reshape(n, -1).T.copy())
        self.record(site, self.storage.nbytes(k, n, qw.bits, qw.block_size, qw.symmetric, factor_type),
                    stored_qw.squared_error(weight_kn, mean=True), qw.block_size)

    def check_after(self, site: Site) -> None:
        if site.node.op_type != KERNEL_MATMUL_NBITS or site.node.domain != MS_DOMAIN:
            raise ir.passes.PostconditionError(f"{site.layer}: not lowered to MatMulNBits")
