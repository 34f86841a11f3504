"""Large-model paths that hold one weight (or one block) at a time: equal to the in-memory paths."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import numpy_helper
from onnxruntime.transformers.float16 import convert_float_to_float16

from cptquant.model_loading import wrap_model
from cptquant.onnx_io.external_data import has_external_data
from cptquant.onnx_io.float16 import convert_streamed
from cptquant.onnx_io.onnx_export import export_onnx, load_onnx
from cptquant.testing import tiny_llama, tiny_tokenizer


@pytest.mark.parametrize("sliced", [False, True])
def test_fp16_baseline_of_external_data_equals_the_converter_in_memory(tmp_path, monkeypatch, sliced):
    if sliced:  # each weight converted in slices of 100 values, as a large one is (bounded memory)
        import cptquant.onnx_io.float16 as float16

        monkeypatch.setattr(float16, "SLICE_ELEMENTS", 100)
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


@pytest.mark.parametrize("case", [("llama", "nbits", "rtn"), ("opt", "qdq", "gptq"), ("bert", "dynamic", "gptq")],
                         ids="-".join)
def test_large_model_export_path_computes_what_the_in_memory_path_does(case, tmp_path, monkeypatch):
    """The path a model over 2 GB takes through optimum (no constant folding, external data gathered into one
    file a weight at a time by onnx_export._StreamingOnnx, no post-processing), forced on tiny models: the same
    codes, low-bit kernels for every layer (the export checks), and the same outputs under ONNX Runtime."""
    from test_export_bytes import export_case

    import cptquant.onnx_io.onnx_export as onnx_export

    _, in_memory = export_case(*case, tmp_path / "memory")
    monkeypatch.setattr(onnx_export, "_post_process_fits", lambda model: False)
    monkeypatch.setenv("FORCE_ONNX_EXTERNAL_DATA", "1")  # optimum gathers external data even below 2 GB
    real_gather = onnx_export.gather_external_data
    gathered = []
    monkeypatch.setattr(onnx_export, "gather_external_data",
                        lambda *args: gathered.append(args[2]) or real_gather(*args))
    _, large = export_case(*case, tmp_path / "large")
    assert gathered == ["model.onnx_data"]
    assert large["graph_check"]["kernels"] == in_memory["graph_check"]["kernels"]
    for name, layer in in_memory["layers"].items():
        assert large["layers"][name]["bits"] == layer["bits"], name
        if large["layers"][name].get("reads_table") != layer.get("reads_table"):
            # optimum without accelerate folds a tied head into its own transposed copy (written on its own);
            # unfolded, the head reads the table, and shares its codes
            assert large["layers"][name].get("reads_table")
            continue
        assert large["layers"][name]["weight_mse"] == pytest.approx(layer["weight_mse"], rel=1e-5), name
    feeds = _feeds(ort.InferenceSession(str(tmp_path / "memory" / "model.onnx"), providers=["CPUExecutionProvider"]))
    outputs = [ort.InferenceSession(str(tmp_path / folder / "model.onnx"), providers=["CPUExecutionProvider"])
               .run(None, feeds)[0] for folder in ("memory", "large")]
    if all(large["layers"][n].get("reads_table") == layer.get("reads_table") for n, layer in in_memory["layers"].items()):
        np.testing.assert_allclose(outputs[1], outputs[0], rtol=1e-4, atol=1e-4)
    else:  # the head's codes differ (the table's, not its own copy's): close, not equal
        a, b = outputs[0].ravel(), outputs[1].ravel()
        assert float(a @ b / np.linalg.norm(a) / np.linalg.norm(b)) > 0.99


def _feeds(session: ort.InferenceSession) -> dict[str, np.ndarray]:
    """Two sequences of 5 tokens, no past: ids, a full mask, positions, empty KV caches."""
    feeds = {}
    for spec in session.get_inputs():
        if spec.name == "input_ids":
            feeds[spec.name] = np.array([[5, 17, 99, 312, 45], [8, 600, 21, 3, 77]], np.int64)
        elif spec.name in ("attention_mask", "token_type_ids"):
            feeds[spec.name] = (np.ones if spec.name == "attention_mask" else np.zeros)((2, 5), np.int64)
        elif spec.name == "position_ids":
            feeds[spec.name] = np.tile(np.arange(5, dtype=np.int64), (2, 1))
        else:  # past_key_values.N.key/value: [batch, heads, 0, head size]
            shape = [2 if d == "batch_size" else 0 if not isinstance(d, int) else d for d in spec.shape]
            feeds[spec.name] = np.zeros(shape, np.float32)
    return feeds
