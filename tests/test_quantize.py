"""Properties of the blocked quantizer and of the packed layouts ORT reads."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays
from onnx import TensorProto, helper, numpy_helper

from cptquant.quant.quantize import block_codes, block_params, fake_quantize, quantize_blocked
from cptquant.quant.storage import pack_uint4_last_axis, unpack_uint4_last_axis

BLOCKS = st.sampled_from([16, 32, 64])
FINITE = st.floats(-1e3, 1e3, allow_nan=False, allow_infinity=False, width=32)


@st.composite
def weights(draw):
    block = draw(BLOCKS)
    k = block * draw(st.integers(1, 3))
    n = draw(st.integers(1, 7))  # odd and tiny output sizes
    return draw(arrays(np.float32, (k, n), elements=FINITE)), block


@settings(max_examples=60, deadline=None)
@given(weights(), st.sampled_from([4, 8]), st.booleans())
def test_absmax_error_is_at_most_half_a_step(wb, bits, symmetric):
    weight, block = wb
    qw = quantize_blocked(weight, bits, block, symmetric)
    step = np.repeat(qw.scale, block, axis=0)
    err = np.abs(qw.dequantize() - weight)
    assert np.all(err <= step / 2 + 1e-6 * np.maximum(1.0, np.abs(weight)))
    lo, hi = (-(2 ** (bits - 1)), 2 ** (bits - 1) - 1) if symmetric else (0, 2**bits - 1)
    assert qw.q.min() >= lo and qw.q.max() <= hi


@settings(max_examples=40, deadline=None)
@given(weights(), st.sampled_from([4, 8]))
def test_mse_clip_never_worse_than_absmax(wb, bits):
    weight, block = wb
    absmax = np.mean((quantize_blocked(weight, bits, block, clip="absmax").dequantize() - weight) ** 2)
    mse = np.mean((quantize_blocked(weight, bits, block, clip="mse").dequantize() - weight) ** 2)
    assert mse <= absmax * (1 + 1e-5) + 1e-12


@settings(max_examples=40, deadline=None)
@given(weights(), st.booleans(), st.integers(0, 2**31 - 1))
def test_weighted_clip_search_minimises_the_weighted_error(wb, symmetric, seed):
    # GPTQ weighs each row by its input energy: among the same candidate ranges, the weighted search's choice
    # has no larger weighted error than the plain search's (and the plain search is the weighted one at equal weights).
    weight, block = wb
    blocks = weight.reshape(-1, block, weight.shape[1])
    row_weights = np.random.default_rng(seed).uniform(0.0, 10.0, blocks.shape[:2]).astype(np.float32)

    def weighted_error(scale, zero_point):
        codes = block_codes(blocks, scale, zero_point, 4).astype(np.float32)
        if zero_point is not None:
            codes -= zero_point[:, None, :]
        return (((codes * scale[:, None, :] - blocks) ** 2) * row_weights[:, :, None]).sum(axis=1)

    weighted = block_params(blocks, 4, symmetric, "mse", row_weights)
    plain = block_params(blocks, 4, symmetric, "mse")
    assert np.all(weighted_error(*weighted) <= weighted_error(*plain) * (1 + 1e-5) + 1e-12)
    ones = block_params(blocks, 4, symmetric, "mse", np.ones_like(row_weights))
    assert np.array_equal(ones[0], plain[0])


@settings(max_examples=60, deadline=None)
@given(arrays(np.uint8, st.tuples(st.integers(1, 4), st.integers(1, 33)), elements=st.integers(0, 15)))
def test_uint4_packing_roundtrips(values):
    packed = pack_uint4_last_axis(values)
    assert packed.shape[-1] == (values.shape[-1] + 1) // 2
    assert np.array_equal(unpack_uint4_last_axis(packed, values.shape[-1]), values)


@settings(max_examples=40, deadline=None)
@given(arrays(np.int8, st.tuples(st.integers(1, 5), st.integers(1, 9)), elements=st.integers(-8, 7)), st.booleans())
def test_int4_initializers_are_packed_exactly(values, signed):
    import onnx_ir as ir

    from cptquant.exporter.lowering.matmul import int_tensor

    values = values if signed else (values.astype(np.int16) + 8).astype(np.uint8)
    tensor = ir.serde.serialize_tensor(int_tensor(values, 4, signed))
    assert len(tensor.raw_data) == (values.size + 1) // 2  # two values per byte on disk
    assert np.array_equal(numpy_helper.to_array(tensor).astype(np.int16), values.astype(np.int16))


@pytest.mark.parametrize("clip", ["absmax", "mse"])
@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("transposed", [False, True])
def test_a_wide_weight_quantized_in_column_slices_equals_it_whole(clip, symmetric, transposed, monkeypatch):
    """Columns are independent, so slicing a wide weight (bounded memory) changes no code, scale or zero point."""
    from cptquant.quant import quantize

    rng = np.random.default_rng(3)
    weight = rng.standard_normal((96, 70) if not transposed else (70, 96)).astype(np.float32)
    weight = weight.T if transposed else weight  # an embedding table is quantized as its transpose
    whole = quantize_blocked(weight, 4, 32, symmetric, clip)
    monkeypatch.setattr(quantize, "_CHUNK_ELEMENTS", 96 * 16)  # slices of 16 columns, the last one of 6
    sliced = quantize_blocked(weight, 4, 32, symmetric, clip)
    np.testing.assert_array_equal(sliced.q, whole.q)
    np.testing.assert_array_equal(sliced.scale, whole.scale)
    if symmetric:
        assert sliced.zero_point is None and whole.zero_point is None
    else:
        np.testing.assert_array_equal(sliced.zero_point, whole.zero_point)
    np.testing.assert_allclose(sliced.squared_error(weight), np.sum((whole.dequantize() - weight) ** 2), rtol=1e-5)
    np.testing.assert_allclose(sliced.squared_error(weight, mean=True), np.mean((whole.dequantize() - weight) ** 2),
                               rtol=1e-5)


@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("weighted", [False, True])
def test_the_clip_search_in_column_slices_equals_it_whole(symmetric, weighted, monkeypatch):
    """The MSE search tries its ratios on a slice of columns at a time (to stay in cache): the same scales and
    zero points to the last bit."""
    from cptquant.quant import quantize

    rng = np.random.default_rng(5)
    blocks = rng.standard_normal((3, 32, 70)).astype(np.float32)
    row_weights = rng.uniform(0.1, 2.0, (3, 32)) if weighted else None
    whole = block_params(blocks, 4, symmetric, "mse", row_weights)
    monkeypatch.setattr(quantize, "_SEARCH_ELEMENTS", 3 * 32 * 16)  # slices of 16 columns, the last one of 6
    sliced = block_params(blocks, 4, symmetric, "mse", row_weights)
    assert sliced[0].tobytes() == whole[0].tobytes()
    if symmetric:
        assert sliced[1] is None and whole[1] is None
    else:
        assert sliced[1].tobytes() == whole[1].tobytes()


def test_all_zero_block_stays_zero():
    weight = np.zeros((32, 3), np.float32)
    weight[:, 1] = np.linspace(-1, 1, 32)
    out = fake_quantize(weight, 4, 32)
    assert np.all(out[:, 0] == 0) and np.all(out[:, 2] == 0)


def _run_single(node, initializers, inputs, outputs, opsets):
    graph = helper.make_graph([node], "g", inputs, outputs, initializers)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid(d, v) for d, v in opsets])
    return ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("symmetric", [True, False])
def test_gather_block_quantized_layout_matches_numpy(bits, symmetric):
    """The rewriting pass's embedding layout, read back by ORT's kernel, equals our dequantization."""
    from cptquant.exporter.layer_map import WeightUse
    from cptquant.exporter.lowering import lower_model
    from cptquant.plan import LayerPlan, Plan

    rng = np.random.default_rng(0)
    table = rng.normal(size=(50, 64)).astype(np.float32)
    gather = helper.make_node("Gather", ["table", "ids"], ["out"], name="/emb/Gather")
    model = helper.make_model(
        helper.make_graph([gather], "g", [helper.make_tensor_value_info("ids", TensorProto.INT64, [None])],
                          [helper.make_tensor_value_info("out", TensorProto.FLOAT, [None, 64])],
                          [numpy_helper.from_array(table, "table")]),
        opset_imports=[helper.make_opsetid("", 21), helper.make_opsetid("com.microsoft", 1)])
    plan = Plan(layers={"emb": LayerPlan(bits=bits, symmetric=symmetric)})
    lowered = lower_model(model, {"emb": [WeightUse("/emb/Gather", "Gather", "table", None, "out_in")]}, plan)
    session = ort.InferenceSession(lowered.model.SerializeToString(), providers=["CPUExecutionProvider"])
    ids = np.array([0, 7, 49, 7], np.int64)
    qw = quantize_blocked(table.T, bits, 32, symmetric)
    # The file keeps FP16 scales and the kernel returns FP16 rows: one rounding of the exact product.
    qw.scale = qw.scale.astype(np.float16).astype(np.float32)
    expected = qw.dequantize().T[ids].astype(np.float16).astype(np.float32)
    np.testing.assert_allclose(session.run(None, {"ids": ids})[0], expected, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("symmetric", [True, False])
def test_matmul_nbits_and_qdq_agree(bits, symmetric, tmp_path):
    """The two ways of writing a quantized MatMul compute the same product as numpy, and ORT runs both as
    one MatMulNBits (the FP16 scales' Cast folded away before the QDQ fusion)."""
    from cptquant.exporter.graph_check import optimized_graph
    from cptquant.exporter.layer_map import WeightUse
    from cptquant.exporter.lowering import KernelChoice, lower_model
    from cptquant.plan import LayerPlan, Plan
    from cptquant.quant.storage import FORMAT_NBITS, FORMAT_QDQ

    rng = np.random.default_rng(1)
    weight = rng.normal(size=(96, 40)).astype(np.float32)
    x = rng.normal(size=(3, 96)).astype(np.float32)
    stored = quantize_blocked(weight, bits, 32, symmetric)
    stored.scale = stored.scale.astype(np.float16).astype(np.float32)  # the file keeps FP16 scales
    expected = x @ stored.dequantize()
    for fmt in (FORMAT_QDQ, FORMAT_NBITS):
        mm = helper.make_node("MatMul", ["x", "w"], ["y"], name="/fc/MatMul")
        model = helper.make_model(
            helper.make_graph([mm], "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [None, 96])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [None, 40])],
                              [numpy_helper.from_array(weight, "w")]),
            opset_imports=[helper.make_opsetid("", 21), helper.make_opsetid("com.microsoft", 1)])
        plan = Plan(layers={"fc": LayerPlan(bits=bits, symmetric=symmetric)})
        model = lower_model(model, {"fc": [WeightUse("/fc/MatMul", "MatMul", "w")]}, plan, KernelChoice(fmt)).model
        onnx.checker.check_model(model)
        onnx.save(model, str(tmp_path / f"{fmt}.onnx"))
        assert [n.op_type for n in optimized_graph(tmp_path / f"{fmt}.onnx").graph.node] == ["MatMulNBits"]
        session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
        got = session.run(None, {"x": x})[0]
        # MatMulNBits runs with int8 activations (accuracy level 4): allow that rounding.
        np.testing.assert_allclose(got, expected, rtol=0.02, atol=0.05 * np.abs(expected).max())


@pytest.mark.parametrize("bits", [4, 8])
def test_torch_fake_quantize_equals_the_exporters(bits):
    import torch

    from cptquant.passes.common import fake_quantize_symmetric_torch

    rng = np.random.default_rng(1)
    weight = rng.normal(size=(128, 48)).astype(np.float32)
    weight[:32, 0] = 0.0  # an all-zero block: scale 1, codes 0
    weight[40, 3] = 2.5 * np.abs(weight[32:64, 3]).max()  # an outlier sets its block's scale
    expected = fake_quantize(weight, bits, 32, True, "absmax")
    assert np.array_equal(fake_quantize_symmetric_torch(torch.from_numpy(weight), bits, 32).numpy(), expected)
