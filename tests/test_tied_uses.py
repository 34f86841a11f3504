"""The layer map when several tied layers match one weight (T5's and BART's shared embedding): each use of the
weight goes to one layer, and a tied layer left with none is read through its partner."""

from __future__ import annotations

import numpy as np
import onnx
import torch
from onnx import TensorProto, helper, numpy_helper
from torch import nn

from cptquant.exporter.layer_map import build_layer_map
from cptquant.layer_graph import build_layer_graph


class _TiedStacks(nn.Module):
    """BART's layout: a shared table, the encoder's token embedding on the same parameter, a tied head."""

    def __init__(self):
        super().__init__()
        self.shared = nn.Embedding(64, 32)
        self.encoder = nn.Module()
        self.encoder.embed_tokens = nn.Embedding(64, 32)
        self.encoder.embed_tokens.weight = self.shared.weight
        self.lm_head = nn.Linear(32, 64, bias=False)
        self.lm_head.weight = self.shared.weight


def _graph(table: np.ndarray) -> onnx.ModelProto:
    """A Gather named in the encoder's scope and a head MatMul reading its own transposed copy of the table."""
    nodes = [helper.make_node("Gather", ["table", "ids"], ["h"], name="/encoder/embed_tokens/Gather"),
             helper.make_node("MatMul", ["h", "table_t"], ["logits"], name="/lm_head/MatMul")]
    graph = helper.make_graph(
        nodes, "tied", [helper.make_tensor_value_info("ids", TensorProto.INT64, [1, 4])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, [1, 4, 64])],
        [numpy_helper.from_array(table, "table"), numpy_helper.from_array(np.ascontiguousarray(table.T), "table_t")])
    return helper.make_model(graph)


def test_each_use_of_a_tied_weight_goes_to_one_layer():
    torch.manual_seed(0)
    model = _TiedStacks()
    graph = build_layer_graph(model)
    assert {layer.name: layer.tied_to for layer in graph.layers} == {
        "shared": None, "encoder.embed_tokens": "shared", "lm_head": "shared"}
    layer_map = build_layer_map(_graph(model.shared.weight.detach().numpy()), model, graph)
    owners = {name: [(use.node, use.op_type) for use in mapping.uses] for name, mapping in layer_map.mapped.items()}
    assert owners == {"encoder.embed_tokens": [("/encoder/embed_tokens/Gather", "Gather")],  # scope and role
                      "lm_head": [("/lm_head/MatMul", "MatMul")]}  # a MatMul goes to the linear layer
    assert layer_map.read_through == {"shared": "encoder.embed_tokens"} and layer_map.absent == []


def test_weights_are_compared_in_row_blocks_with_allclose_s_answer(monkeypatch):
    """The layer map's value test, a block of rows at a time (bounded temporaries), answers as one np.allclose."""
    from cptquant.exporter import layer_map

    monkeypatch.setattr(layer_map, "_COMPARE_ELEMENTS", 20)  # blocks of 2 rows of 9 (or 1 row of 40)
    rng = np.random.default_rng(0)
    weight = rng.standard_normal((40, 9)).astype(np.float32)
    near = weight + np.float32(5e-7)
    far = weight.copy()
    far[-1, -1] += np.float32(1e-3)  # only the last block differs
    nan = weight.copy()
    nan[17, 3] = np.nan
    for stored, expected in [(weight, weight), (near, weight), (far, weight), (nan, weight), (nan, nan),
                             (np.ascontiguousarray(weight.T), weight.T), (weight.T, np.ascontiguousarray(weight.T)),
                             (far.T, weight.T), (weight, weight.T[:9]), (weight[:0], weight[:0])]:
        want = stored.shape == expected.shape and bool(np.allclose(stored, expected, rtol=0, atol=1e-6))
        assert layer_map._same_values(stored, expected) == want
