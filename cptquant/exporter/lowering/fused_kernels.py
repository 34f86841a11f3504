"""Sibling MatMulNBits (one input, same bits / block / zero-point layout) -> one MatMulNBits + Split.

Where the siblings are a layer's q/k/v and GroupQueryAttention reads them alone, the Split goes too: GQA
takes the packed output as its query and no key or value (as the GenAI model builder writes it).

A decoder layer's q/k/v projections read the same normalised hidden state, and so do the MLP's gate and
up projections. At one token per step each kernel call costs mostly its fixed part (quantizing the
input row to int8 at accuracy level 4, the thread pool's dispatch), so one call with N = the sum of
their outputs, split after, decodes faster (docs/benchmarks.md, "Why the GenAI builder decodes faster").
The weights stay each layer's own: the fused kernel reads a Concat (along N) of the layers' codes,
scales and zero points, constant inputs that ORT folds at session start; the file stores each layer's
tensors as before. Exact: each output column of MatMulNBits depends on its own weight column alone, and
the input row is quantized identically for all of them.

Only kernels the lowering wrote (MatMulNBits sites) are fused; a tied head's kernel is not a sibling of
anything (it reads the final norm, alone).
"""

from __future__ import annotations

from collections import defaultdict

import numpy as np
import onnx_ir as ir

from ...quant.storage import KERNEL_MATMUL_NBITS
from .base import LoweringPass
from .context import MS_DOMAIN, Site, input_of, make_node, name_of, take_over
from .group_query_attention import GQA

FUSED_ATTRIBUTES = ("K", "bits", "block_size", "accuracy_level")


class FuseSiblingKernels(LoweringPass):
    def wanted(self, site: Site) -> bool:
        return site.table_site is None and site.node.op_type == KERNEL_MATMUL_NBITS and site.node.domain == MS_DOMAIN

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        self._check_model(model)
        groups: dict[tuple[object, ...], list[Site]] = defaultdict(list)
        for site in self.sites():
            node = site.node
            key = (id(input_of(node, 0)), len(node.inputs),
                   *(node.attributes[name].as_int() if name in node.attributes else None
                     for name in FUSED_ATTRIBUTES))
            groups[key].append(site)
        fused = [sites for sites in groups.values() if len({id(s.node) for s in sites}) == len(sites) > 1]
        for sites in fused:
            self._fuse(sorted(sites, key=lambda s: (s.order, s.use_index)))
        return ir.passes.PassResult(model, modified=bool(fused))

    def _fuse(self, sites: list[Site]) -> None:
        lowering, names, graph = self.lowering, self.lowering.names, self.lowering.graph
        last = sites[-1]  # the concatenations are filed after every tensor they read (Finish orders by it)
        nodes = [site.node for site in sites]
        widths = [node.attributes["N"].as_int() for node in nodes]
        base = f"{last.base}.fused_with_{len(sites) - 1}"
        inputs: list[ir.Value | None] = [input_of(nodes[0], 0)]
        for j in range(1, len(nodes[0].inputs)):
            concat = make_node("Concat", [input_of(node, j) for node in nodes], [names.unique(f"{base}.input_{j}")],
                               names.unique(f"{base}.Concat_{j}"), axis=0)
            joined = lowering.add_constant_node(last, concat, derived=True, key=lowering.key(last))
            for site in sites[:-1]:  # computed from every fused layer's weight
                lowering.derived[site.layer].append(name_of(joined))
            inputs.append(joined)
        attributes = {name: nodes[0].attributes[name].as_int() for name in FUSED_ATTRIBUTES
                      if name in nodes[0].attributes}
        kernel = make_node(KERNEL_MATMUL_NBITS, inputs, [names.unique(f"{base}.output")],
                           names.unique(f"{base}.MatMulNBits"), domain=MS_DOMAIN, N=sum(widths), **attributes)
        first = min(nodes, key=lambda node: list(graph).index(node))
        attention = _packed_attention(nodes)
        if attention is not None:  # GQA reads packed q/k/v itself: no Split
            graph.insert_before(first, [kernel])
            for index in range(3):
                attention.replace_input_with(index, kernel.outputs[0] if index == 0 else None)
        else:
            sizes = lowering.add_initializer(last, f"{base}.split", ir.tensor(np.array(widths, np.int64)), owned=False)
            split = ir.Node("", "Split", [kernel.outputs[0], sizes],
                            [ir.convenience.convert_attribute("axis", -1)],
                            outputs=[ir.Value(name=names.unique(f"{base}.part_{i}")) for i in range(len(nodes))],
                            name=names.unique(f"{base}.Split"))
            graph.insert_before(first, [kernel, split])
            for node, part in zip(nodes, split.outputs):
                take_over(node.outputs[0], part)
        graph.remove(nodes, safe=True)
        for site in sites:
            site.node = kernel

    def check_after(self, site: Site) -> None:
        if site.node.op_type != KERNEL_MATMUL_NBITS or site.node.domain != MS_DOMAIN:
            raise ir.passes.PostconditionError(f"{site.layer}: not a MatMulNBits kernel after fusing")


def _packed_attention(nodes: list[ir.Node]) -> ir.Node | None:
    """The GroupQueryAttention that reads these three kernels' outputs, alone, as its query, key and value
    (inputs 0, 1, 2 in that order), or None. Its packed form takes the fused kernel's output as the query and
    no key or value: the head layout [q heads | k heads | v heads] is the Concat's order along N."""
    if len(nodes) != 3:
        return None
    readers = []
    for index, node in enumerate(nodes):
        uses = list(node.outputs[0].uses())
        if len(uses) != 1 or node.outputs[0].is_graph_output():
            return None
        reader, at = uses[0]
        if reader.op_type != GQA or reader.domain != MS_DOMAIN or at != index:
            return None
        readers.append(reader)
    return readers[0] if all(reader is readers[0] for reader in readers) else None
