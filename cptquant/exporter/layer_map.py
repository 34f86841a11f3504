"""Map each layer of the plan to the ONNX initializer holding its weight and the nodes using it.

Matching is by the exporter's scope names (node `/encoder/layer.0/attention/self/query/MatMul`
belongs to module `encoder.layer.0.attention.self.query`, or to `model.decoder...` when the top
module's name was dropped) and is then confirmed by comparing the weight values. A weight reached
through a `Transpose` of an initializer (a deduplicated tied LM head) is followed too.

Tied layers (T5's and BART's shared embedding: the table, the encoder's and decoder's token embeddings
and the LM head share one parameter) all match the same weight by value; each use then goes to one of
them (`_one_owner_per_use`), and a tied layer left with none is read through its partner in that file.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx
import torch
from onnx import numpy_helper
from onnx.external_data_helper import uses_external_data
from torch import nn

from ..errors import CptqError
from ..layer_graph import ROLE_CONV1D, ROLE_EMBEDDING, Layer, LayerGraph
from ..onnx_io.external_data import external_location

WEIGHT_OPS = {"MatMul": 1, "Gemm": 1, "Gather": 0}  # op type -> input index of the weight
# Elements of each weight compared at once (16 MB of float32): the comparison's temporaries stay this size
# whatever the weight's (a 412 MB embedding table made several whole-table temporaries at once).
_COMPARE_ELEMENTS = 1 << 22


@dataclass
class WeightUse:
    node: str  # name of the consuming node
    op_type: str  # MatMul | Gemm | Gather
    initializer: str  # the initializer holding the weight
    via_transpose: str | None = None  # name of a Transpose node between initializer and consumer
    layout: str = "in_out"  # how the tensor the consumer sees is laid out: in_out ([K, N]) or out_in


@dataclass
class LayerMapping:
    layer: Layer
    uses: list[WeightUse] = field(default_factory=list)


@dataclass
class LayerMap:
    mapped: dict[str, LayerMapping]
    absent: list[str]  # layers whose weight the exported graph does not use (e.g. a pooler no output needs)
    # tied layers whose weight this file reads only through another layer tied to it -> that layer
    read_through: dict[str, str] = field(default_factory=dict)

    def uses(self) -> dict[str, list[WeightUse]]:
        """Each mapped layer's weight uses, in layer order: what the lowering rewrites."""
        return {name: mapping.uses for name, mapping in self.mapped.items()}


def _scope(node: onnx.NodeProto) -> str:
    return _scope_of_node(node.name)


def _matches_scope(layer_name: str, scope: str) -> bool:
    return bool(scope) and (layer_name == scope or layer_name.endswith("." + scope))


def _torch_weight(model: nn.Module, layer: Layer) -> np.ndarray:
    weight = model.get_submodule(layer.name).weight
    assert isinstance(weight, torch.Tensor)  # a layer of the graph has a weight (nn.Module types it Tensor | Module)
    return weight.detach().float().cpu().numpy()


def _expected_views(layer: Layer, weight: np.ndarray) -> dict[str, np.ndarray]:
    """The torch weight as the consumer would see it, by layout name."""
    if layer.role == ROLE_CONV1D:
        return {"in_out": weight, "out_in": weight.T}  # Conv1D stores [in, out]
    return {"out_in": weight, "in_out": weight.T}  # nn.Linear / nn.Embedding: [out, in] ([rows, hidden] for tables)


def _consumer_layout(node: onnx.NodeProto) -> str:
    if node.op_type == "Gemm":
        trans_b = next((a.i for a in node.attribute if a.name == "transB"), 0)
        return "out_in" if trans_b else "in_out"
    if node.op_type == "Gather":
        return "out_in"  # table [rows, hidden]
    return "in_out"


def _stored_array(tensor: onnx.TensorProto, base_dir: Path | None) -> np.ndarray:
    """An initializer's values without a copy: a view of its raw bytes, or a memory map of its external data."""
    if base_dir is not None and uses_external_data(tensor) and tensor.data_type == onnx.TensorProto.FLOAT:
        location, offset, _ = external_location(tensor)
        return np.memmap(base_dir / location, dtype=np.float32, mode="r", offset=offset, shape=tuple(tensor.dims))
    if tensor.data_type == onnx.TensorProto.FLOAT and tensor.raw_data:
        return np.frombuffer(tensor.raw_data, dtype=np.float32).reshape(tuple(tensor.dims))
    return numpy_helper.to_array(tensor, str(base_dir) if base_dir is not None else "")


def _same_values(stored: np.ndarray, expected: np.ndarray) -> bool:
    """`np.allclose(stored, expected, rtol=0, atol=1e-6)` for equal shapes (False for others), a block of rows at
    a time: the same elementwise test, its temporaries bounded by `_COMPARE_ELEMENTS`, and it stops at the
    first block that differs."""
    if stored.shape != expected.shape:
        return False
    if stored.ndim == 0 or stored.size <= _COMPARE_ELEMENTS:
        return bool(np.allclose(stored, expected, rtol=0, atol=1e-6))
    rows = max(1, _COMPARE_ELEMENTS // max(1, stored.size // stored.shape[0]))
    return all(np.allclose(stored[start:start + rows], expected[start:start + rows], rtol=0, atol=1e-6)
               for start in range(0, stored.shape[0], rows))


def build_layer_map(model_proto: onnx.ModelProto, torch_model: nn.Module, graph: LayerGraph,
                    names: list[str] | None = None, base_dir: Path | None = None) -> LayerMap:
    """`base_dir`: where the proto's external weights lie when it was loaded without them (onnx_export's
    load_onnx_lazily); each is then read through a memory map while it is compared, and let go."""
    initializers = {init.name: init for init in model_proto.graph.initializer}
    producers = {out: node for node in model_proto.graph.node for out in node.output}

    def array(name: str) -> np.ndarray:
        return _stored_array(initializers[name], base_dir)

    # Every (node, initializer) pair where a weight-consuming op reads a constant 2-D weight.
    candidates: list[tuple[onnx.NodeProto, str, str | None]] = []
    for node in model_proto.graph.node:
        index = WEIGHT_OPS.get(node.op_type)
        if index is None or len(node.input) <= index:
            continue
        source, transpose = node.input[index], None
        producer = producers.get(source)
        if producer is not None and producer.op_type == "Transpose" and producer.input[0] in initializers:
            source, transpose = producer.input[0], producer.name
        if source in initializers and len(initializers[source].dims) == 2:
            candidates.append((node, source, transpose))

    wanted = names if names is not None else graph.names()
    mapped: dict[str, LayerMapping] = {}
    absent: list[str] = []
    unmapped: list[str] = []
    for name in wanted:
        layer = graph[name]
        views = _expected_views(layer, _torch_weight(torch_model, layer))
        uses = []
        by_scope = [c for c in candidates if _matches_scope(name, _scope(c[0]))]
        # Scope first; fall back to values alone (some exporters drop scopes) when scope finds nothing.
        for pool in (by_scope, candidates):
            for node, init_name, transpose in pool:
                layout = _consumer_layout(node)
                if transpose is not None:  # the initializer is the transpose of what the consumer sees
                    layout = "out_in" if layout == "in_out" else "in_out"
                expected = views[layout]
                stored = array(init_name)
                if _same_values(stored, expected):
                    consumer_layout = _consumer_layout(node)
                    uses.append(WeightUse(node.name, node.op_type, init_name, transpose, consumer_layout))
            if uses:
                break
        if uses:
            mapped[name] = LayerMapping(layer, uses)
        elif not _value_present(views, initializers, array):
            absent.append(name)
        else:
            unmapped.append(name)
    read_through = _one_owner_per_use(mapped, graph)
    if unmapped:
        raise CptqError(f"cannot map {len(unmapped)} layer(s) to ONNX weights: {', '.join(unmapped)} (the weight is "
                        "in the exported file, but no MatMul, Gemm or Gather reads it as a constant 2-D tensor, "
                        "so the rewrite cannot replace it)")
    return LayerMap(mapped, absent, read_through)


def _scope_of_node(node_name: str) -> str:
    return node_name.lstrip("/").rsplit("/", 1)[0].replace("/", ".")


def _one_owner_per_use(mapped: dict[str, LayerMapping], graph: LayerGraph) -> dict[str, str]:
    """Give each node claimed by several (tied) layers to one of them, in order of preference: the op fits the
    layer's role (a Gather reads an embedding, a MatMul or Gemm a linear layer), the node's scope is the
    layer's name, the scope ends the layer's name, the layer owns the parameter (is tied to none); then the
    first in model order. Layers left without uses leave `mapped`; returns them -> the layer now owning
    their first use. A no-op where no node is claimed twice (every untied model)."""
    claims: dict[str, list[str]] = {}
    for name, mapping in mapped.items():
        for use in mapping.uses:
            claims.setdefault(use.node, []).append(name)
    order = {name: i for i, name in enumerate(mapped)}
    owner: dict[str, str] = {}
    for node, layers in claims.items():
        if len(layers) == 1:
            continue
        op_type = next(u.op_type for u in mapped[layers[0]].uses if u.node == node)
        scope = _scope_of_node(node)

        def preference(name: str) -> tuple[bool, bool, bool, bool, int]:
            layer = graph[name]
            fits = (op_type == "Gather") == (layer.role == ROLE_EMBEDDING)
            return (not fits, name != scope, not _matches_scope(name, scope), layer.tied_to is not None, order[name])

        owner[node] = min(layers, key=preference)
    if not owner:
        return {}
    read_through: dict[str, str] = {}
    for name in list(mapped):
        uses = mapped[name].uses
        kept = [use for use in uses if owner.get(use.node, name) == name]
        if not kept:
            read_through[name] = owner[uses[0].node]
            del mapped[name]
        else:
            mapped[name].uses = kept
    return read_through


def _value_present(views: dict[str, np.ndarray], initializers: dict[str, onnx.TensorProto],
                   array: Callable[[str], np.ndarray]) -> bool:
    """Whether the weight is stored anywhere in the file (then it is used in a way we cannot rewrite)."""
    shapes = {tuple(v.shape) for v in views.values()}
    for name, init in initializers.items():
        if tuple(init.dims) in shapes:
            stored = array(name)
            if any(_same_values(stored, v) for v in views.values()):
                return True
    return False
