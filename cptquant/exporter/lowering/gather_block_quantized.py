"""Gather(table, ids) -> com.microsoft.GatherBlockQuantized(codes, ids, scales[, zero points]) + Cast.

A DequantizeLinear -> Gather would dequantize the whole table on every call (docs/ort-kernels.md).
The scales are FP16, so the kernel returns FP16 rows and one Cast of the gathered rows restores
float32. A 4-bit table's hot rows (the plan's `hot_rows`) go to a second, 8-bit table: a slot table
sends each id to its row (>= 0: cold table, -1 - row: hot table), both tables are looked up on
clamped indices and a Where keeps the right row.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import onnx_ir as ir

from ...errors import CptqError
from ...plan import HOT_ROW_BITS
from ...quant.storage import KERNEL_GATHER_BQ, BlockQuantizedTable, HotRowTable
from .base import LoweringPass
from .context import MS_DOMAIN, AttrValue, Site, WrittenTable, input_of, make_node, name_of


class GatherToBlockQuantized(LoweringPass):
    table = BlockQuantizedTable()
    hot_table = HotRowTable()

    def wanted(self, site: Site) -> bool:
        return site.use.op_type == "Gather" and site.bits < 16

    def check_before(self, site: Site) -> None:
        if site.node.op_type != "Gather":
            raise ir.passes.PreconditionError(f"{site.layer}: expected a Gather, found {site.node.op_type}")

    def check_after(self, site: Site) -> None:
        rows = input_of(site.node, 0).producer()  # the Cast's input: one lookup, or a Where of two
        lookups = [rows] if rows is not None and rows.op_type != "Where" else [
            value.producer() if value is not None else None for value in (rows.inputs[1:] if rows is not None else [])]
        if not lookups or any(node is None or node.op_type != KERNEL_GATHER_BQ for node in lookups):
            raise ir.passes.PostconditionError(f"{site.layer}: not lowered to GatherBlockQuantized")

    def lower(self, site: Site) -> None:
        lowering, lp, gather, gather_name = self.lowering, site.plan, site.node, name_of(site.node)
        axis = gather.attributes.get("axis")
        if axis is not None and axis.value != 0:
            raise CptqError(f"node {gather_name}: embedding Gather on axis {axis.value} is not supported")
        table = lowering.weight_seen_by_consumer(site)  # [rows, hidden]
        ids = input_of(gather, 1)
        hot = np.asarray(lp.hot_rows if lp.bits == 4 and lp.hot_rows else [], dtype=np.int64)
        if not hot.size or hot.size == table.shape[0]:  # every row hot (a hand-written plan): an 8-bit table
            bits, symmetric = (lp.bits, lp.symmetric) if not hot.size else (HOT_ROW_BITS, True)
            node, nbytes, sq_error = self._lookup(site, table, ids, bits, symmetric, site.base, gather_name, None)
            nodes, hot = [node], hot[:0]
        else:
            nodes, nbytes, sq_error = self._hot_row_lookup(site, table, ids, hot)
        cast = make_node("Cast", [nodes[-1].outputs[0]], [name_of(gather.outputs[0])],
                         lowering.names.unique(gather_name + "Cast"), to=ir.DataType.FLOAT)
        lowering.replace(gather, nodes + [cast])
        site.node = cast
        site.kernels += [KERNEL_GATHER_BQ] * (2 if hot.size else 1)
        site.nbytes += nbytes
        site.mse = sq_error / table.size
        site.hot_rows = hot.size

    def _lookup(self, site: Site, table: np.ndarray, ids: ir.Value, bits: int, symmetric: bool, base: str,
                name: str, rows: np.ndarray | None) -> tuple[ir.Node, int, float]:
        """A GatherBlockQuantized node over `table` [rows, hidden] (not yet in the graph), with FP16 output;
        the bytes written and the summed squared error of the weights as stored. The tensors are filed in
        `site.tables` (`rows`: which rows of the full table these are), for a tied LM head to read."""
        lowering, lp = self.lowering, site.plan
        # blocks along hidden; a 4-bit table that is also the LM head gets GPTQ codes for the head (weight_quantizers)
        qw = lowering.quantizer(site.layer, table.T, bits, lp.block_size, symmetric, lowering.plan.clip)
        if bits == lp.bits:
            site.algorithm = lowering.quantizer.algorithm_for(site.layer, bits)
        arrays = self.table.encode(qw)
        inputs = [lowering.add_initializer(site, f"{base}.weight_q{bits}", ir.tensor(arrays["codes"])), ids,
                  lowering.add_initializer(site, f"{base}.weight_scale_fp16", ir.tensor(arrays["scales"]))]
        if not qw.symmetric:
            inputs.append(lowering.add_initializer(site, f"{base}.weight_zp", ir.tensor(arrays["zero_points"])))
        site.tables.append(WrittenTable(rows, bits, lp.block_size, inputs[0], inputs[2],
                                        inputs[3] if len(inputs) > 3 else None))
        half_rows = lowering.names.unique(f"{base}.gathered_fp16")
        node = make_node(KERNEL_GATHER_BQ, inputs, [half_rows], lowering.names.unique(name + "BlockQuantized"),
                         domain=MS_DOMAIN, gather_axis=0, quantize_axis=1, block_size=lp.block_size, bits=bits)
        stored = dataclasses.replace(qw, scale=qw.scale.astype(np.float16).astype(np.float32))  # what the file holds
        sq_error = stored.squared_error(table.T.astype(np.float32, copy=False))
        hidden, rows = qw.q.shape
        return node, self.table.nbytes(hidden, rows, bits, lp.block_size, qw.symmetric), sq_error

    def _hot_row_lookup(self, site: Site, table: np.ndarray, ids: ir.Value,
                        hot: np.ndarray) -> tuple[list[ir.Node], int, float]:
        lowering, lp, base, name = self.lowering, site.plan, site.base, name_of(site.node)
        unique = lowering.names.unique
        slot, cold = self.hot_table.slots(table.shape[0], hot)

        def constant(suffix: str, values: np.ndarray) -> ir.Value:  # index tables are not weights: unowned
            return lowering.add_initializer(site, f"{base}.{suffix}", ir.tensor(values), owned=False)

        slots, zero = constant("hot_slot", slot), constant("zero", np.array(0, np.int32))
        minus_one, last_axis = constant("minus_one", np.array(-1, np.int32)), constant("last_axis", np.array([-1], np.int64))
        out = {k: unique(f"{base}.{k}") for k in ("slot", "slot32", "is_hot", "hot_slot", "hot_index", "cold_index",
                                                   "is_hot_3d", "rows_fp16")}
        nodes = [make_node("Gather", [slots, ids], [out["slot"]], unique(f"{name}HotSlot"), axis=0)]

        def then(op: str, inputs: list[ir.Value | None], output: str, suffix: str, **attrs: AttrValue) -> ir.Value:
            nodes.append(make_node(op, inputs, [out[output]], unique(f"{name}{suffix}"), "", **attrs))
            return nodes[-1].outputs[0]

        slot32 = then("Cast", [nodes[0].outputs[0]], "slot32", "HotSlotCast", to=ir.DataType.INT32)
        is_hot = then("Less", [slot32, zero], "is_hot", "IsHot")
        hot_slot = then("Sub", [minus_one, slot32], "hot_slot", "HotRow")
        hot_index = then("Max", [hot_slot, zero], "hot_index", "HotIndex")
        cold_index = then("Max", [slot32, zero], "cold_index", "ColdIndex")
        hot_node, hot_bytes, hot_error = self._lookup(site, table[hot], hot_index, HOT_ROW_BITS, True, f"{base}.hot",
                                                      name + "Hot", hot)
        cold_node, cold_bytes, cold_error = self._lookup(site, table[cold], cold_index, lp.bits, lp.symmetric,
                                                         f"{base}.cold", name + "Cold", cold)
        nodes += [hot_node, cold_node]
        is_hot_3d = then("Unsqueeze", [is_hot, last_axis], "is_hot_3d", "IsHot3d")
        then("Where", [is_hot_3d, hot_node.outputs[0], cold_node.outputs[0]], "rows_fp16", "HotOrCold")
        return nodes, hot_bytes + cold_bytes + slot.nbytes, hot_error + cold_error
