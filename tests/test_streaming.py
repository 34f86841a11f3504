"""Large-model paths that hold one weight (or one block) at a time: equal to the in-memory paths."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import numpy_helper
from onnxruntime.transformers.float16 import convert_float_to_float16

from cptquant.model_loading import wrap_model
from cptquant.onnx_io.float16 import convert_streamed, has_external_data
from cptquant.onnx_io.onnx_export import export_onnx, load_onnx
from cptquant.testing import tiny_llama, tiny_tokenizer


def test_fp16_baseline_of_external_data_equals_the_converter_in_memory(tmp_path):
    loaded = wrap_model(tiny_llama(0, tied=True), None, tiny_tokenizer("llama"))
    export_onnx(loaded, tmp_path / "fp32")
    model = load_onnx(tmp_path / "fp32" / "model.onnx")
    (tmp_path / "ext").mkdir()
    onnx.save_model(model, str(tmp_path / "ext" / "model.onnx"), save_as_external_data=True,
                    all_tensors_to_one_file=True, location="model.onnx_data", size_threshold=0)
    assert has_external_data(tmp_path / "ext" / "model.onnx")
    assert not has_external_data(tmp_path / "fp32" / "model.onnx")

    in_memory = convert_float_to_float16(load_onnx(tmp_path / "fp32" / "model.onnx"), keep_io_types=True, disable_shape_infer=True)
    convert_streamed(tmp_path / "ext" / "model.onnx", tmp_path / "fp16" / "model.onnx")
    streamed = load_onnx(tmp_path / "fp16" / "model.onnx")

    expected = {t.name: numpy_helper.to_array(t) for t in in_memory.graph.initializer}
    got = {t.name: numpy_helper.to_array(t) for t in streamed.graph.initializer}
    assert set(got) == set(expected)
    for name, array in expected.items():
        assert got[name].dtype == array.dtype and np.array_equal(got[name], array), name
    assert [n.op_type for n in streamed.graph.node] == [n.op_type for n in in_memory.graph.node]
    assert list(streamed.graph.value_info) == list(in_memory.graph.value_info)
    assert (tmp_path / "fp16" / "model.onnx_data").is_file()
    session = ort.InferenceSession(str(tmp_path / "fp16" / "model.onnx"), providers=["CPUExecutionProvider"])
    assert session.get_inputs()[0].name == "input_ids"


def _external_fp32_export(monkeypatch):
    """The pipeline's FP32 export, re-saved with every weight in external data (as optimum writes a model
    over 2 GB), so that a tiny model takes the large-model path: graph alone, weights memory-mapped."""
    import cptquant.exporter.pipeline as pipeline

    real = pipeline.export_onnx

    def export_then_externalize(loaded, folder):
        first = real(loaded, folder)
        model = load_onnx(first)
        onnx.save_model(model, str(first), save_as_external_data=True, all_tensors_to_one_file=True,
                        location=first.name + "_data", size_threshold=0)
        return first

    monkeypatch.setattr(pipeline, "export_onnx", export_then_externalize)


@pytest.mark.parametrize("case", [("opt", "qdq", "gptq"), ("llama", "nbits", "rtn"), ("bert", "dynamic", "gptq")],
                         ids="-".join)
def test_export_from_external_fp32_data_writes_the_same_bytes(case, tmp_path, monkeypatch):
    """Mixed 4/8/16-bit plans with hot rows, GPTQ (block by block), the FusedGemm repair and smoothing: the
    model written from a memory-mapped FP32 export is byte for byte the one written from memory."""
    from test_export_bytes import export_case

    in_memory, _ = export_case(*case, tmp_path / "memory")
    _external_fp32_export(monkeypatch)
    streamed, report = export_case(*case, tmp_path / "streamed")
    assert streamed == in_memory
