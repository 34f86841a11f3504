"""`--format dynamic`: int8 DynamicQuantizeMatMul for 8-bit layers, and for 4-bit layers stored as 4-bit codes."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper

from cptquant.exporter.graph_check import optimized_graph
from cptquant.exporter.layer_map import WeightUse
from cptquant.exporter.lowering import KernelChoice, Lowered, lower_model
from cptquant.exporter.pipeline import export_quantized
from cptquant.model_loading import wrap_model
from cptquant.onnx_io.inputs import feeds_for
from cptquant.passes.measurements import CalibrationMeasurements
from cptquant.plan import LayerPlan, Plan, uniform_plan
from cptquant.quant.quantize import quantize_blocked, quantize_columns_within
from cptquant.quant.storage import FORMAT_DYNAMIC, REDUCED_RANGE_MAX
from cptquant.runtimes.cpu import u8s8_gemm_saturates
from cptquant.testing import tiny_bert

K, N = 96, 40


def _one_matmul(weight: np.ndarray, bias: np.ndarray | None) -> onnx.ModelProto:
    nodes = [helper.make_node("MatMul", ["x", "w"], ["mm" if bias is not None else "y"], name="/fc/MatMul")]
    inits = [numpy_helper.from_array(weight, "w")]
    if bias is not None:
        nodes.append(helper.make_node("Add", ["b", "mm"], ["y"], name="/fc/Add"))
        inits.append(numpy_helper.from_array(bias, "b"))
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [None, K])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [None, N])], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21), helper.make_opsetid("com.microsoft", 1)])


# A known defect on such CPUs, not of these tests: the assertions hold wherever the kernel does not saturate.
SATURATES = pytest.mark.skipif(u8s8_gemm_saturates(), reason="this CPU's u8s8 GEMM saturates full-range int8 weights "
                               "(AVX2 without VNNI): a known defect of --format dynamic here, docs/ort-kernels.md")


def _lower_dynamic(model: onnx.ModelProto, bits: int, symmetric: bool, smoothing: np.ndarray | None = None,
                   reduce_range: bool = False) -> Lowered:
    plan = Plan(layers={"fc": LayerPlan(bits=bits, symmetric=symmetric)})
    return lower_model(model, {"fc": [WeightUse("/fc/MatMul", "MatMul", "w")]}, plan,
                       KernelChoice(FORMAT_DYNAMIC, reduce_range=reduce_range),
                       smoothing=None if smoothing is None else {"fc": smoothing})


def _effective_weight(weight: np.ndarray, bits: int, symmetric: bool, reduce_range: bool) -> np.ndarray:
    """What the format computes with: per-column int8 (within ±63 with `reduce_range`) of the weight (8 bits)
    or of its blocked 4-bit version."""
    source = weight if bits == 8 else quantize_blocked(weight, bits, 32, symmetric).dequantize()
    if reduce_range:
        return quantize_columns_within(source, REDUCED_RANGE_MAX).dequantize()
    return quantize_blocked(source, 8, K, True).dequantize()


def _folded_int8_weights(model: onnx.ModelProto, folder: Path) -> list[np.ndarray]:
    """The int8 weights DynamicQuantizeMatMul reads once ORT has folded the 4-bit expansion."""
    onnx.save(model, folder / "model.onnx")
    optimized = optimized_graph(folder / "model.onnx").graph
    weights = {init.name: init for init in optimized.initializer}
    return [numpy_helper.to_array(weights[node.input[1]]) for node in optimized.node
            if node.op_type == "DynamicQuantizeMatMul"]


# Reduced range runs everywhere: ±63 weights cannot saturate the int16 pair sums of AVX2's vpmaddubsw.
@pytest.mark.parametrize("bits, symmetric, reduce_range", [
    pytest.param(8, True, False, marks=SATURATES), pytest.param(4, True, False, marks=SATURATES), (4, False, False),
    (8, True, True), (4, True, True), (4, False, True)])
def test_dynamic_matmul_computes_the_effective_weight(bits, symmetric, reduce_range, tmp_path):
    rng = np.random.default_rng(2)
    weight = rng.normal(size=(K, N)).astype(np.float32)
    bias = rng.normal(size=N).astype(np.float32)
    x = rng.normal(size=(5, K)).astype(np.float32)
    lowered = _lower_dynamic(_one_matmul(weight, bias), bits, symmetric, reduce_range=reduce_range)
    model, mse, block = lowered.model, lowered.layers["fc"].mse, lowered.layers["fc"].block_size
    onnx.checker.check_model(model)
    assert [n.op_type for n in model.graph.node if n.domain] == ["DynamicQuantizeMatMul"]
    assert not any(n.op_type == "Add" for n in model.graph.node)  # the bias moved into the kernel
    assert block == (K if bits == 8 else 32)
    expected = x @ _effective_weight(weight, bits, symmetric, reduce_range) + bias
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    got = session.run(None, {"x": x})[0]
    # Activations are quantized to uint8 per tensor at run time: allow that rounding.
    np.testing.assert_allclose(got, expected, atol=0.03 * np.abs(expected).max())
    assert mse > 0
    widest = max(int(np.abs(w.astype(np.int16)).max()) for w in _folded_int8_weights(model, tmp_path))
    assert widest <= REDUCED_RANGE_MAX if reduce_range else widest > REDUCED_RANGE_MAX


# At 4 bits the weight's own rounding dominates the error (and the scaled-up rows coarsen their blocks).
@pytest.mark.parametrize("bits, symmetric, gain", [pytest.param(8, True, 0.5, marks=SATURATES), (4, False, 0.8)])
def test_outlier_channels_are_scaled_down_before_the_int8_product(bits, symmetric, gain):
    """Two input channels 40x larger than the rest: X W = (X / s)(s W) with s = sqrt(40) there; the error falls."""
    rng = np.random.default_rng(3)
    weight = rng.normal(size=(K, N)).astype(np.float32)
    x = rng.normal(size=(6, K)).astype(np.float32)
    x[:, [3, 50]] *= 40
    smoothing = np.ones(K, np.float32)
    smoothing[[3, 50]] = np.sqrt(40)
    errors = {}
    for factors in (None, smoothing):
        lowered = _lower_dynamic(_one_matmul(weight, None), bits, symmetric, factors)
        model = lowered.model
        onnx.checker.check_model(model)
        session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
        errors[factors is None] = np.abs(session.run(None, {"x": x})[0] - x @ weight).max()
        if factors is not None:
            assert [n.op_type for n in model.graph.node][-2:] == ["Mul", "DynamicQuantizeMatMul"]
            # not the layer's weight
            assert not any(name.startswith("fc.input_smoothing") for name in lowered.layers["fc"].new_initializers)
    assert errors[False] < gain * errors[True], errors


def _mixed_plan(loaded, graph) -> Plan:
    plan = uniform_plan(graph, 8)
    for i, layer in enumerate(layer for layer in graph.layers if layer.block is not None):
        plan.layers[layer.name].bits = (4, 8, 16)[i % 3]
    return plan


@pytest.fixture(scope="module")
def bert_dynamic(tmp_path_factory):
    loaded = wrap_model(tiny_bert())
    out = tmp_path_factory.mktemp("bert-dyn") / "model.onnx"
    # A low outlier ratio: random weights have no real outlier channels, and the split path must be exercised.
    return loaded, export_quantized(loaded, _mixed_plan, out, progress=False, fmt=FORMAT_DYNAMIC, outlier_ratio=1.5,
                                    calibration=CalibrationMeasurements())


def test_tiny_bert_runs_dynamic_quantize_matmul_for_4_and_8_bit_layers(bert_dynamic):
    _, result = bert_dynamic
    layers = result.report.to_dict()["layers"]
    low_bit = [name for name, entry in layers.items() if entry["bits"] in (4, 8) and "embeddings" not in name]
    assert {layers[name]["bits"] for name in low_bit} == {4, 8}
    assert all(layers[name]["kernels"] == ["DynamicQuantizeMatMul"] for name in low_bit)
    check = result.report.graph_check
    assert check["unfused"] == [] and check["fp16_casts_left"] == []
    assert check["kernels"]["DynamicQuantizeMatMul"] == len(low_bit)
    assert check["expected_kernels"]["DynamicQuantizeMatMul"] == len(low_bit)
    assert check["expected_kernels"]["GatherBlockQuantized"] == 3 and check["expected_kernels"]["fp16"] >= 1
    assert any(layers[name].get("outlier_channels", 0) > 0 for name in low_bit)

    optimized = optimized_graph(result.paths.model).graph
    ops = [n.op_type for n in optimized.node]
    assert "DequantizeLinear" not in ops and "MatMulNBits" not in ops and "Round" not in ops
    weights = {init.name: init for init in optimized.initializer}
    for node in optimized.node:
        if node.op_type == "DynamicQuantizeMatMul":  # the int4 -> int8 expansion was folded into an initializer
            assert weights[node.input[1]].data_type == TensorProto.INT8


def test_tiny_bert_dynamic_outputs_match_torch(bert_dynamic):
    loaded, result = bert_dynamic
    ids = np.random.default_rng(0).integers(5, 900, size=(2, 24))
    mask = np.ones_like(ids)
    mask[1, 16:] = 0
    with torch.no_grad():
        ref = loaded.model(input_ids=torch.from_numpy(ids), attention_mask=torch.from_numpy(mask)).last_hidden_state
    session = ort.InferenceSession(str(result.paths.model), providers=["CPUExecutionProvider"])
    got = session.run(None, feeds_for(session, ids, mask))[0]
    real = mask.astype(bool)
    a, b = got[real], ref.numpy()[real]
    cos = (a * b).sum(-1) / (np.linalg.norm(a, axis=-1) * np.linalg.norm(b, axis=-1))
    assert cos.min() > 0.98, cos.min()
    assert result.report.parity_vs_torch_fp32["mean_cosine"] > 0.99


def test_dynamic_4_bit_layers_are_4_bit_on_disk(bert_dynamic):
    _, result = bert_dynamic
    model = onnx.load(str(result.paths.model))
    stored = {init.name: init for init in model.graph.initializer}
    for name, entry in result.report.to_dict()["layers"].items():
        if entry["bits"] != 4 or "embeddings" in name:
            continue
        params = entry["bytes_fp32"] // 4
        codes = stored[f"{name}.weight_q4"]
        assert codes.data_type in (TensorProto.INT4, TensorProto.UINT4)
        assert len(codes.raw_data) == params // 2  # two codes per byte, no int8 copy in the file
        assert not any(init.data_type == TensorProto.INT8 and init.name.startswith(name) for init in stored.values())
        if not entry.get("outlier_channels"):  # split-off rows are FP16: only plain layers have this bound
            assert entry["bytes_after"] < 0.75 * params


@pytest.mark.parametrize("flag, reduced", [([], True), (["--no-reduce-range"], False)])
def test_cli_dynamic_format_with_gptq_codes(tmp_path, monkeypatch, flag, reduced):
    """`cptq-export --format dynamic`: GPTQ chooses the 4-bit codes, which the int8 expansion then reads. On a
    CPU whose int8 GEMM saturates (pretended here) the int8 weights are within ±63 unless told otherwise."""
    import json

    from typer.testing import CliRunner

    from cptquant.cli import export_app
    from cptquant.runtimes import cpu
    from cptquant.testing import save_tiny_model

    monkeypatch.setattr(cpu, "u8s8_gemm_saturates", lambda: True)
    folder = save_tiny_model(tiny_bert(), tmp_path / "bert")
    out = tmp_path / "out"
    result = CliRunner().invoke(export_app, [str(folder), "--bits", "4", "--format", "dynamic", "--calib-samples", "8",
                                             "--seq-len", "32", "-o", str(out), "--no-verify", "--no-progress", *flag])
    assert result.exit_code == 0, result.output
    report = json.loads((out / "model.report.json").read_text())
    assert report["weight_format"] == "dynamic" and report["reduce_range"] is reduced
    widest = max(int(np.abs(w.astype(np.int16)).max())
                 for w in _folded_int8_weights(onnx.load(str(out / "model.onnx")), tmp_path))
    assert widest <= REDUCED_RANGE_MAX if reduced else widest > REDUCED_RANGE_MAX
    matmuls = {name: entry for name, entry in report["layers"].items() if "embeddings" not in name}
    assert {entry["algorithm"] for entry in matmuls.values()} == {"gptq"}
    assert all(entry["kernels"] == ["DynamicQuantizeMatMul"] for entry in matmuls.values())
    assert report["graph_check"]["unfused"] == []


@pytest.mark.parametrize("build", ["tiny_opt", "tiny_gpt2"])
def test_decoders_export_in_dynamic_format(build, tmp_path):
    """Gemm layers (OPT's fc1/fc2, GPT-2's Conv1D) and the tied LM head also become DynamicQuantizeMatMul."""
    import cptquant.testing

    loaded = wrap_model(getattr(cptquant.testing, build)())
    result = export_quantized(loaded, lambda _l, g: uniform_plan(g, 4), tmp_path / "model.onnx", progress=False,
                              fmt=FORMAT_DYNAMIC, calibration=CalibrationMeasurements())
    check = result.report.graph_check
    assert check["unfused"] == []
    assert check["kernels"]["DynamicQuantizeMatMul"] == check["expected_kernels"]["DynamicQuantizeMatMul"] >= 8
    assert result.report.parity_vs_torch_fp32["mean_cosine"] > 0.95


def test_a_reduced_range_8_bit_layer_tells_the_quantizer_what_it_computes_with():
    """GPTQ's sequential Hessians (the next blocks') must see the ±63 weight, which no quantizer call made."""
    from cptquant.quant.weight_quantizers import RoundToNearest

    class Recording(RoundToNearest):
        def __init__(self):
            self.told = {}

        def wrote(self, layer, weight, input_scale=None):
            self.told[layer] = weight

    weight = np.random.default_rng(4).normal(size=(K, N)).astype(np.float32)
    quantizer = Recording()
    plan = Plan(layers={"fc": LayerPlan(bits=8, symmetric=True)})
    lower_model(_one_matmul(weight, None), {"fc": [WeightUse("/fc/MatMul", "MatMul", "w")]}, plan,
                KernelChoice(FORMAT_DYNAMIC, reduce_range=True), quantizer)
    told = quantizer.told["fc"]
    assert int(np.abs(told.q).max()) == REDUCED_RANGE_MAX
    np.testing.assert_allclose(told.dequantize(), quantize_columns_within(weight, REDUCED_RANGE_MAX).dequantize())


def test_layers_reading_one_input_with_the_same_factors_share_one_smoothing_mul():
    """An encoder's query, key and value read one LayerNorm output: one Mul by 1/s feeds all three (here in
    the opposite graph order to the plan's), a layer with other factors keeps its own; outputs are unchanged."""
    rng = np.random.default_rng(5)
    names = ["q", "k", "v", "o"]
    weights = {name: rng.normal(size=(K, N)).astype(np.float32) for name in names}
    nodes = [helper.make_node("Relu", ["x"], ["r"], name="/relu")]
    nodes += [helper.make_node("MatMul", ["r", f"w_{name}"], [f"y_{name}"], name=f"/{name}/MatMul")
              for name in reversed(names)]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [None, K])],
                              [helper.make_tensor_value_info(f"y_{name}", TensorProto.FLOAT, [None, N])
                               for name in names],
                              [numpy_helper.from_array(w, f"w_{name}") for name, w in weights.items()])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21), helper.make_opsetid("com.microsoft", 1)])
    shared = np.ones(K, np.float32)
    shared[[3, 50]] = np.sqrt(40)
    other = np.ones(K, np.float32)
    other[7] = 3.0
    smoothing = {"q": shared, "k": shared.copy(), "v": shared.copy(), "o": other}
    plan = Plan(layers={name: LayerPlan(bits=8) for name in names})
    uses = {name: [WeightUse(f"/{name}/MatMul", "MatMul", f"w_{name}")] for name in names}
    lowered = lower_model(model, uses, plan, KernelChoice(FORMAT_DYNAMIC, reduce_range=u8s8_gemm_saturates()),
                          smoothing=smoothing).model
    onnx.checker.check_model(lowered)
    muls = [n for n in lowered.graph.node if n.op_type == "Mul"]
    assert len(muls) == 2, [n.name for n in muls]
    readers = {n.input[0] for n in lowered.graph.node if n.op_type == "DynamicQuantizeMatMul"}
    assert readers == {m.output[0] for m in muls}
    x = np.abs(rng.normal(size=(6, K))).astype(np.float32)
    x[:, [3, 50]] *= 40
    session = ort.InferenceSession(lowered.SerializeToString(), providers=["CPUExecutionProvider"])
    for name, y in zip(names, session.run([f"y_{name}" for name in names], {"x": x})):
        assert np.abs(y - x @ weights[name]).max() < 0.05 * np.abs(x @ weights[name]).max(), name
