"""MatMul(A, Transpose(table)) -> com.microsoft.MatMulNBits over the token embedding's own codes.

A tied LM head is the embedding table read the other way. GatherBlockQuantized keeps a table as
codes [rows, hidden bytes] with FP16 scales [rows, blocks] and packed zero points per row, which is
MatMulNBits' layout for a weight of N = rows outputs and K = hidden inputs: a Reshape of the codes, a
Cast and a Reshape of the scales, all on initializers and folded by ORT at session start, let the head
read the table the Gather pass wrote, so the file holds it once (quant/storage.TiedHead). A table
with hot rows is two tables: one MatMulNBits each and their logits concatenated; when the hot rows are
not the vocabulary's first rows, a GatherElements over a fixed index row (broadcast to the logits'
shape) restores vocabulary order.
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from ...quant.storage import KERNEL_MATMUL_NBITS, TiedHead
from .base import LoweringPass
from .context import MS_DOMAIN, AttrValue, Site, WrittenTable, input_of, make_node, name_of, tensor_of
from .matmul_nbits import NBITS_ACCURACY_LEVEL


class TiedHeadFromTable(LoweringPass):
    storage = TiedHead()

    def wanted(self, site: Site) -> bool:
        return site.table_site is not None

    def check_before(self, site: Site) -> None:
        if site.node.op_type != "MatMul" or site.table_site is None or not site.table_site.tables:
            raise ir.passes.PreconditionError(f"{site.layer}: expected a MatMul and its embedding's lowered table")

    def lower(self, site: Site) -> None:
        lowering, matmul, table_site = self.lowering, site.node, site.table_site
        assert table_site is not None
        tables = table_site.tables
        # the table: [rows, hidden]
        rows, hidden = tensor_of(lowering.initializer(table_site.use.initializer)).shape.numpy()
        single, output, name = len(tables) == 1, name_of(matmul.outputs[0]), name_of(matmul)
        nodes = [self._matmul(site, table, input_of(matmul, 0), hidden,
                              output if single else lowering.names.unique(f"{site.base}.logits_{i}"))
                 for i, table in enumerate(tables)]
        if not single:  # hot rows: the logits of each table, then back in vocabulary order
            parts = [t.rows for t in tables if t.rows is not None]
            if len(parts) != len(tables):
                raise ir.passes.PreconditionError(f"{site.layer}: a table of several does not say its rows")
            order = np.concatenate(parts)
            in_order = bool(np.array_equal(order, np.arange(rows)))  # hot rows first, and they are ids 0 .. h - 1
            joined = make_node("Concat", [n.outputs[0] for n in nodes],
                               [output if in_order else lowering.names.unique(f"{site.base}.logits")],
                               lowering.names.unique(name + "Concat"), axis=-1)
            nodes.append(joined)
            if not in_order:
                position = np.empty(rows, dtype=np.int32)
                position[order] = np.arange(rows, dtype=np.int32)
                index = lowering.add_initializer(site, f"{site.base}.vocabulary_order", ir.tensor(position),
                                                 owned=False)
                # GatherElements over the index row broadcast to the logits' shape, not a Gather on the last
                # axis: ORT's Gather copies one float per index there, 4-7x slower (docs/ort-kernels.md).
                logits = joined.outputs[0]
                shape = make_node("Shape", [logits], [lowering.names.unique(f"{site.base}.logits_shape")],
                                  lowering.names.unique(name + "LogitsShape"))
                every = make_node("Expand", [index, shape.outputs[0]],
                                  [lowering.names.unique(f"{site.base}.vocabulary_order_expanded")],
                                  lowering.names.unique(name + "VocabularyOrderExpand"))
                nodes += [shape, every, make_node("GatherElements", [logits, every.outputs[0]], [output],
                                                  lowering.names.unique(name + "VocabularyOrder"), axis=-1)]
                site.nbytes += int(position.nbytes)
        lowering.replace(matmul, nodes)
        site.node = nodes[-1]
        site.kernels += [KERNEL_MATMUL_NBITS] * len(tables)
        site.mse, site.block_size, site.algorithm = table_site.mse, tables[0].block_size, "rtn"

    def _matmul(self, site: Site, table: WrittenTable, activations: ir.Value, hidden: int, output: str) -> ir.Node:
        lowering, names = self.lowering, self.lowering.names
        codes_shape = tensor_of(table.codes).shape.numpy()
        rows, blocks = codes_shape[0], hidden // table.block_size
        suffix = "" if table.rows is None else f".{table.bits}bit_rows"

        def folded(op: str, inputs: list[ir.Value | None], what: str, **attrs: AttrValue) -> ir.Value:
            node = make_node(op, inputs, [names.unique(f"{site.base}{suffix}.{what}")],
                             names.unique(f"{site.base}{suffix}.{op}_{what}"), "", **attrs)
            return lowering.add_constant_node(site, node, derived=True)

        def shape(dims: tuple[int, ...], what: str) -> ir.Value:
            # A Constant node, not an initializer: a file re-saved with every tensor as external data
            # would leave the Reshape's shape unreadable to ORT's shape inference.
            node = make_node("Constant", [], [names.unique(f"{site.base}{suffix}.{what}_shape")],
                             names.unique(f"{site.base}{suffix}.Constant_{what}_shape"),
                             value=ir.tensor(np.array(dims, np.int64)))
            return lowering.add_constant_node(site, node)

        codes = folded("Reshape", [table.codes, shape((rows, blocks, table.block_size * table.bits // 8), "codes")],
                       "codes")
        scales = folded("Cast", [table.scales], "scales_fp32", to=ir.DataType.FLOAT)
        scales = folded("Reshape", [scales, shape((rows * blocks,), "scales")], "scales")
        inputs = [activations, codes, scales]
        if table.zero_points is not None:
            zp_bytes = int(np.prod(tensor_of(table.zero_points).shape.numpy()))
            inputs.append(folded("Reshape", [table.zero_points, shape((zp_bytes,), "zero_points")], "zero_points"))
        return make_node(KERNEL_MATMUL_NBITS, inputs, [output], names.unique(f"{site.base}{suffix}.MatMulNBits"),
                         domain=MS_DOMAIN, K=hidden, N=rows, bits=table.bits, block_size=table.block_size,
                         accuracy_level=NBITS_ACCURACY_LEVEL)

    def check_after(self, site: Site) -> None:
        node = site.node
        joined = input_of(node, 0).producer() if node.op_type == "GatherElements" else node if node.op_type == "Concat" else None
        kernels = [node] if joined is None else [v.producer() if v is not None else None for v in joined.inputs]
        if any(k is None or k.op_type != KERNEL_MATMUL_NBITS or k.domain != MS_DOMAIN for k in kernels):
            raise ir.passes.PostconditionError(f"{site.layer}: not lowered to MatMulNBits over its table")
