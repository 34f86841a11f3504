"""The last pass: drop what nothing reads, and lay the file out in layer order.

The graph keeps the exporter's initializers first, then every layer's new tensors together, in
layer-map order and, within a layer, in the order its uses were written; the constant nodes (which read
initializers only) go first, in the same order, so the graph stays topologically sorted. The layout
depends on the plan, not on the order the passes ran in.
"""

from __future__ import annotations

import onnx_ir as ir

from .base import LoweringPass
from .context import MS_DOMAIN, Site, name_of


class Finish(LoweringPass):
    def wanted(self, site: Site) -> bool:
        return False

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        self._check_model(model)
        lowering, graph = self.lowering, self.lowering.graph
        self._drop_unused(graph)
        constant = [node for _, node in sorted(lowering.constant_nodes, key=lambda item: item[0])
                    if node.graph is graph]
        graph.remove(constant)
        if constant and len(graph):
            graph.insert_before(graph[0], constant)
        else:
            graph.extend(constant)
        created = [value for _, value in sorted(lowering.created, key=lambda item: item[0])
                   if graph.initializers.get(name_of(value)) is value]
        for value in created:
            graph.initializers.pop(name_of(value))
        for value in created:
            graph.register_initializer(value)
        if any(node.domain == MS_DOMAIN for node in graph) and MS_DOMAIN not in model.opset_imports:
            model.opset_imports[MS_DOMAIN] = 1
        return ir.passes.PassResult(model, modified=True)

    def ensures(self, model: ir.Model) -> None:
        produced = {value for value in model.graph.inputs} | set(model.graph.initializers.values())
        for node in model.graph:
            if any(value is not None and value not in produced for value in node.inputs):
                raise ir.passes.PostconditionError(f"node {node.name} reads a value produced after it")
            produced.update(node.outputs)

    @staticmethod
    def _drop_unused(graph: ir.Graph) -> None:
        """Transposes and Identities whose output nothing reads (a weight's old path), then initializers."""
        changed = True
        while changed:
            changed = False
            for node in list(graph):
                if node.op_type in ("Transpose", "Identity") and not any(
                        value.uses() or value.is_graph_output() for value in node.outputs):
                    graph.remove(node, safe=True)
                    changed = True
        for name, value in list(graph.initializers.items()):
            if not value.uses() and not value.is_graph_output() and not value.is_graph_input():
                graph.initializers.pop(name)
