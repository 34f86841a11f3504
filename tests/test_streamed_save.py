"""onnx_io/streamed_save.py writes an onnx-ir model one initializer at a time: the file is byte for byte the one
`save_onnx` writes from the whole ModelProto, below 2 GB (spliced) and above it (external data, unsplit)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from onnx import TensorProto, helper, numpy_helper
from test_lowering import USES, _plan, small_model

import cptquant.onnx_io.streamed_save as streamed_save
from cptquant.exporter.lowering import KernelChoice, lower_model, lower_model_into
from cptquant.onnx_io.onnx_export import save_onnx
from cptquant.quant.storage import FORMAT_DYNAMIC, FORMAT_NBITS, FORMAT_QDQ


def _model_with_every_part() -> onnx.ModelProto:
    """Fields on both sides of the graph and of its initializers: doc strings, value infos, metadata, opsets."""
    rng = np.random.default_rng(1)
    inits = [numpy_helper.from_array(rng.normal(size=shape).astype(dtype), name)
             for name, shape, dtype in (("w", (300, 40), np.float32), ("b", (40,), np.float32),
                                        ("idx", (3,), np.int64), ("big", (1000, 700), np.float16))]
    nodes = [helper.make_node("MatMul", ["x", "w"], ["h"], name="mm", doc_string="a node"),
             helper.make_node("Add", ["h", "b"], ["y"], name="add")]
    graph = helper.make_graph(nodes, "graph name", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 300])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 40])], inits,
                              doc_string="graph doc",
                              value_info=[helper.make_tensor_value_info("h", TensorProto.FLOAT, [2, 40])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21), helper.make_opsetid("com.x", 1)],
                              producer_name="p", producer_version="1", doc_string="model doc")
    model.domain, model.model_version = "d", 3
    helper.set_model_props(model, {"k": "v"})
    return model


def _finish(proto: onnx.ModelProto) -> None:
    proto.graph.ClearField("value_info")  # a change the caller makes to the ModelProto, as the lowering does


def _whole(model: onnx.ModelProto, path: Path) -> list[Path]:
    proto = ir.serde.serialize_model(ir.serde.deserialize_model(model))
    _finish(proto)
    return save_onnx(proto, path)


def test_the_streamed_file_is_save_onnxs(tmp_path: Path) -> None:
    model = _model_with_every_part()
    [expected] = _whole(model, tmp_path / "whole.onnx")
    ir_model = ir.serde.deserialize_model(model)
    assert streamed_save.save_ir_model(ir_model, tmp_path / "streamed.onnx", _finish) == [tmp_path / "streamed.onnx"]
    assert (tmp_path / "streamed.onnx").read_bytes() == expected.read_bytes()
    read = [value for node in ir_model.graph for value in node.inputs if value is not None]
    assert read and all(value.const_value is None for value in read)  # the model's tensors let go of


def test_over_2_gb_it_is_save_onnxs_external_data(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import cptquant.onnx_io.onnx_export as onnx_export

    monkeypatch.setattr(onnx_export, "TWO_GB", 100_000)  # the model is "over 2 GB" for both writers
    monkeypatch.setattr(streamed_save, "TWO_GB", 100_000)
    model = _model_with_every_part()
    expected = _whole(model, tmp_path / "whole" / "model.onnx")
    written = streamed_save.save_ir_model(ir.serde.deserialize_model(model), tmp_path / "streamed" / "model.onnx",
                                          _finish)
    assert [p.name for p in written] == [p.name for p in expected] == ["model.onnx", "model.onnx_data"]
    for got, want in zip(written, expected, strict=True):
        assert got.read_bytes() == want.read_bytes()


@pytest.mark.parametrize("fmt", [FORMAT_QDQ, FORMAT_NBITS, FORMAT_DYNAMIC])
@pytest.mark.parametrize("bits", [4, 8, 16])
def test_a_lowered_file_is_the_same_written_either_way(tmp_path: Path, fmt: str, bits: int) -> None:
    lowered = lower_model(small_model(), USES, _plan(bits, True), KernelChoice(fmt))
    save_onnx(lowered.model, tmp_path / "whole.onnx")
    written, records = lower_model_into(tmp_path / "streamed.onnx", small_model(), USES, _plan(bits, True),
                                        KernelChoice(fmt))
    assert written == [tmp_path / "streamed.onnx"]
    assert (tmp_path / "streamed.onnx").read_bytes() == (tmp_path / "whole.onnx").read_bytes()
    assert records == lowered.layers
