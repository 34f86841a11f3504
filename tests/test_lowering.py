"""The lowering passes and the storage model, on a small hand-built graph: bytes, contracts, layout."""

from __future__ import annotations

import math

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from cptquant.exporter.layer_map import WeightUse
from cptquant.exporter.lowering import KernelChoice, lower_model, lowering_passes
from cptquant.exporter.lowering.gemm_to_matmul import GemmToMatMul
from cptquant.exporter.lowering.matmul_qdq import MatMulToBlockedDq
from cptquant.passes.allocate import unit_bytes
from cptquant.plan import LayerPlan, Plan
from cptquant.quant.storage import (
    FORMAT_DYNAMIC,
    FORMAT_NBITS,
    FORMAT_QDQ,
    FP16_NODE_BYTES,
    NODE_BYTES,
    ZERO_POINT_NODE_BYTES,
    WeightShape,
    weight_nbytes,
)

ROWS, HIDDEN, FFN = 200, 64, 96
USES = {"emb": [WeightUse("/emb/Gather", "Gather", "table", None, "out_in")],
        "up": [WeightUse("/up/MatMul", "MatMul", "w_up")],
        "down": [WeightUse("/down/Gemm", "Gemm", "w_down", None, "out_in")]}
SHAPES = {"emb": WeightShape(HIDDEN, ROWS, table=True), "up": WeightShape(HIDDEN, FFN), "down": WeightShape(FFN, HIDDEN)}


def small_model() -> onnx.ModelProto:
    """ids -> Gather(table) -> MatMul(w_up) + Add -> Relu -> [tokens, FFN] -> Gemm(w_down, transB) -> y."""
    rng = np.random.default_rng(0)
    nodes = [helper.make_node("Gather", ["table", "ids"], ["h"], name="/emb/Gather", axis=0),
             helper.make_node("MatMul", ["h", "w_up"], ["u"], name="/up/MatMul"),
             helper.make_node("Add", ["u", "b_up"], ["ub"], name="/up/Add"),
             helper.make_node("Relu", ["ub"], ["r"], name="/act/Relu"),
             helper.make_node("Gemm", ["r", "w_down", "b_down"], ["y"], name="/down/Gemm", transB=1)]
    inits = [numpy_helper.from_array(rng.normal(size=shape).astype(np.float32), name)
             for name, shape in (("table", (ROWS, HIDDEN)), ("w_up", (HIDDEN, FFN)), ("b_up", (FFN,)),
                                 ("w_down", (HIDDEN, FFN)), ("b_down", (HIDDEN,)))]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("ids", TensorProto.INT64, [None])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [None, HIDDEN])], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)])


def _plan(bits: int, symmetric: bool, hot_rows: list[int] | None = None) -> Plan:
    layers = {name: LayerPlan(bits=bits, symmetric=symmetric) for name in USES}
    layers["emb"].hot_rows = hot_rows
    return Plan(layers=layers)


def _stored_bytes(model: onnx.ModelProto, names: list[str]) -> int:
    inits = {init.name: init for init in model.graph.initializer}
    return sum(ir.serde.deserialize_tensor(inits[name]).nbytes for name in names)


@pytest.mark.parametrize("fmt", [FORMAT_QDQ, FORMAT_NBITS, FORMAT_DYNAMIC])
@pytest.mark.parametrize("bits,symmetric", [(4, True), (4, False), (8, True), (16, True)])
def test_bytes_written_are_the_storage_models(fmt, bits, symmetric):
    """What the lowering writes for a layer is what the allocator prices: the same layouts, to the byte."""
    lowered = lower_model(small_model(), USES, _plan(bits, symmetric), KernelChoice(fmt))
    for name, record in lowered.layers.items():
        shape = SHAPES[name]
        assert record.bytes_after == weight_nbytes(shape, bits, 32, symmetric, fmt) - (
            4 * shape.k if fmt == FORMAT_DYNAMIC and not shape.table and bits < 16 else 0)  # no outliers here
        assert record.bytes_after == _stored_bytes(lowered.model, record.new_initializers), name
    total = unit_bytes(list(SHAPES.values()), bits, 32, "never" if symmetric else "always", fmt)
    written = sum(r.bytes_after for r in lowered.layers.values())
    expansions = 3 * sum(not s.table for s in SHAPES.values()) if fmt == FORMAT_DYNAMIC and bits == 4 else 0
    names = (FP16_NODE_BYTES if bits == 16 else 0 if symmetric else ZERO_POINT_NODE_BYTES) * len(SHAPES)
    assert 0 <= total - written <= (NODE_BYTES * (1 + expansions) + names
                                    + sum(4 * s.k for s in SHAPES.values() if not s.table))


def test_hot_row_tables_are_priced_as_written():
    hot = list(range(0, ROWS, 7))
    lowered = lower_model(small_model(), USES, _plan(4, False, hot))
    record = lowered.layers["emb"]
    assert record.expected_kernels == ["GatherBlockQuantized"] * 2 and record.hot_rows == len(hot)
    slots = ROWS * 2  # int16 slot table: an index, not a weight
    assert record.bytes_after == _stored_bytes(lowered.model, record.new_initializers) + slots
    shape = WeightShape(HIDDEN, ROWS, table=True, hot_rows=len(hot))
    assert record.bytes_after == weight_nbytes(shape, 4, 32, False, FORMAT_QDQ)


def test_lowered_model_runs_and_keeps_the_exporters_layout():
    model = small_model()
    lowered = lower_model(model, USES, _plan(4, False), KernelChoice(FORMAT_QDQ, {"down": FORMAT_NBITS}))
    onnx.checker.check_model(lowered.model)
    assert [n.op_type for n in lowered.model.graph.node if n.domain] == ["GatherBlockQuantized", "MatMulNBits"]
    assert list(lowered.model.graph.value_info) == list(model.graph.value_info)  # none added
    assert [op.domain for op in lowered.model.opset_import] == ["", "com.microsoft"]
    # Constant nodes first, then the graph; the exporter's initializers first, then each layer's in turn.
    ops = [n.op_type for n in lowered.model.graph.node]
    assert ops[:3] == ["Cast", "DequantizeLinear", "Cast"] and "DequantizeLinear" not in ops[3:]
    names = [init.name for init in lowered.model.graph.initializer]
    assert names[:2] == ["b_up", "b_down"] and names[2].startswith("emb.") and names[-1].startswith("down.")
    session = ort.InferenceSession(lowered.model.SerializeToString(), providers=["CPUExecutionProvider"])
    out = session.run(None, {"ids": np.array([0, 5, 199], np.int64)})[0]
    assert out.shape == (3, HIDDEN) and np.isfinite(out).all()
    assert model.graph.node[0].op_type == "Gather"  # the input model is left as it was


def test_the_file_layout_does_not_depend_on_the_order_of_independent_passes():
    def reordered(lowering):
        passes = lowering_passes(lowering)
        return [passes[0]] + list(reversed(passes[1:6])) + passes[6:]

    kernels = KernelChoice(FORMAT_DYNAMIC, {"up": FORMAT_QDQ})
    plan = _plan(4, False, [3, 4, 5])
    default = lower_model(small_model(), USES, plan, kernels).model.SerializeToString()
    assert lower_model(small_model(), USES, plan, kernels, passes=reordered).model.SerializeToString() == default


def test_passes_state_what_they_require():
    """The MatMul lowering takes MatMuls: a Gemm it is given unlowered fails its precondition."""
    def without_gemm_lowering(lowering):
        return [p for p in lowering_passes(lowering) if not isinstance(p, GemmToMatMul)]

    with pytest.raises(ir.passes.PassError) as failure:
        lower_model(small_model(), USES, _plan(4, True), passes=without_gemm_lowering)
    cause = failure.value
    while cause.__cause__ is not None and not isinstance(cause, ir.passes.PreconditionError):
        cause = cause.__cause__
    assert isinstance(cause, ir.passes.PreconditionError) and "expected a MatMul" in str(cause)
    assert MatMulToBlockedDq.format == FORMAT_QDQ


def test_int4_sizes_round_up_to_whole_bytes():
    # 3 blocks per column: MatMulNBits packs each column's zero points on their own (a padding nibble).
    assert weight_nbytes(WeightShape(96, 5), 4, 32, False, FORMAT_NBITS) == 96 * 5 // 2 + 2 * 15 + 5 * math.ceil(3 / 2)
    assert weight_nbytes(WeightShape(96, 5), 4, 32, False, FORMAT_QDQ) == 96 * 5 // 2 + 2 * 15 + math.ceil(15 / 2)


TIED_USES = {"emb": [WeightUse("/emb/Gather", "Gather", "table", None, "out_in")],
             "head": [WeightUse("/head/MatMul", "MatMul", "table", "/head/Transpose")]}


def tied_model() -> onnx.ModelProto:
    """ids -> Gather(table) -> Relu -> MatMul(Transpose(table)) -> logits: an LM head tied to its table."""
    rng = np.random.default_rng(1)
    nodes = [helper.make_node("Gather", ["table", "ids"], ["h"], name="/emb/Gather", axis=0),
             helper.make_node("Relu", ["h"], ["r"], name="/act/Relu"),
             helper.make_node("Transpose", ["table"], ["table_t"], name="/head/Transpose", perm=[1, 0]),
             helper.make_node("MatMul", ["r", "table_t"], ["logits"], name="/head/MatMul")]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("ids", TensorProto.INT64, [None])],
                              [helper.make_tensor_value_info("logits", TensorProto.FLOAT, [None, ROWS])],
                              [numpy_helper.from_array(rng.normal(size=(ROWS, HIDDEN)).astype(np.float32), "table")])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)])


def _tied_plan(bits: int, symmetric: bool, hot_rows: list[int] | None = None) -> Plan:
    return Plan(layers={"emb": LayerPlan(bits=bits, symmetric=symmetric, hot_rows=hot_rows),
                        "head": LayerPlan(bits=bits, symmetric=symmetric)})


def _logits(model: onnx.ModelProto, ids: np.ndarray) -> np.ndarray:
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return session.run(None, {"ids": ids})[0]


@pytest.mark.parametrize("fmt", [FORMAT_QDQ, FORMAT_NBITS])
@pytest.mark.parametrize("bits,symmetric", [(4, False), (4, True), (8, True)])
def test_a_tied_head_reads_its_tables_codes(fmt, bits, symmetric, monkeypatch):
    """The head is MatMulNBits over the table the Gather reads: the file holds the table once, the logits
    are those of a head quantized on its own, and the allocator prices the head at what it adds."""
    shared = lower_model(tied_model(), TIED_USES, _tied_plan(bits, symmetric), KernelChoice(fmt))
    head = shared.layers["head"]
    assert head.expected_kernels == ["MatMulNBits"] and head.bytes_after == 0 and head.new_initializers == []
    assert head.bytes_fp32 == 0  # the tied weight is counted once, with its table
    assert head.bytes_after == weight_nbytes(WeightShape(HIDDEN, ROWS, tied_head=True), bits, 32, symmetric, fmt)
    monkeypatch.setattr("cptquant.exporter.lowering.context.shares_tied_table", lambda fmt: False)
    apart = lower_model(tied_model(), TIED_USES, _tied_plan(bits, symmetric), KernelChoice(fmt))
    assert apart.layers["head"].bytes_after > 0
    assert shared.model.ByteSize() < apart.model.ByteSize() - apart.layers["head"].bytes_after + 4096
    ids = np.arange(0, ROWS, 3, dtype=np.int64)
    np.testing.assert_allclose(_logits(shared.model, ids), _logits(apart.model, ids), rtol=1e-5, atol=1e-4)


def test_a_tied_heads_hot_rows_are_its_tables_and_come_back_in_vocabulary_order():
    hot = list(range(0, ROWS, 5))
    plain = lower_model(tied_model(), TIED_USES, _tied_plan(4, False))
    hot_lowered = lower_model(tied_model(), TIED_USES, _tied_plan(4, False, hot))
    head = hot_lowered.layers["head"]
    assert head.expected_kernels == ["MatMulNBits"] * 2
    assert head.bytes_after == 4 * ROWS == weight_nbytes(WeightShape(HIDDEN, ROWS, hot_rows=len(hot), tied_head=True),
                                                         4, 32, False, FORMAT_QDQ)
    ids = np.arange(ROWS, dtype=np.int64)
    table = numpy_helper.to_array(tied_model().graph.initializer[0])
    exact = np.maximum(table[ids], 0) @ table.T
    error_plain = np.abs(_logits(plain.model, ids) - exact)
    error_hot = np.abs(_logits(hot_lowered.model, ids) - exact)
    cold = np.setdiff1d(np.arange(ROWS), hot)
    # The hot columns use the 8-bit rows; the cold ones stay where they were, in their own places.
    assert error_hot[:, hot].mean() < 0.7 * error_plain[:, hot].mean()  # the 8-bit activations stay
    assert error_hot[:, cold].mean() == pytest.approx(error_plain[:, cold].mean(), rel=0.1)


def test_a_tied_heads_hot_rows_that_are_the_first_ids_need_no_reordering():
    """Hot rows 0 .. h - 1 (what passes/hot_rows.py gives a tied table): the two kernels' logits, concatenated,
    are already in vocabulary order, so no Gather and no index table; priced so, and the same logits."""
    hot = list(range(ROWS // 4))
    prefix = lower_model(tied_model(), TIED_USES, _tied_plan(4, False, hot))
    head = prefix.layers["head"]
    assert head.expected_kernels == ["MatMulNBits"] * 2 and head.bytes_after == 0
    assert weight_nbytes(WeightShape(HIDDEN, ROWS, hot_rows=len(hot), tied_head=True, hot_prefix=True),
                         4, 32, False, FORMAT_QDQ) == 0
    producer = next(node for node in prefix.model.graph.node if "logits" in node.output)
    assert producer.op_type == "Concat"
    assert not any("vocabulary_order" in init.name for init in prefix.model.graph.initializer)
    # in vocabulary order: every logit near the exact one, the 8-bit (hot) columns nearer than the 4-bit ones
    ids = np.arange(ROWS, dtype=np.int64)
    table = numpy_helper.to_array(tied_model().graph.initializer[0])
    exact = np.maximum(table[ids], 0) @ table.T
    error = np.abs(_logits(prefix.model, ids) - exact)
    assert error.max() < 0.1 * np.abs(exact).max()
    assert error[:, hot].mean() < 0.7 * error[:, len(hot):].mean()


def test_a_lowered_model_written_to_a_file_is_spent(tmp_path):
    """`write` drops each tensor once written: the in-memory model and a second write would be missing them."""
    lowered = lower_model(tied_model(), TIED_USES, _tied_plan(4, False))
    lowered.write(tmp_path / "model.onnx")
    assert onnx.load(str(tmp_path / "model.onnx")).graph.initializer
    with pytest.raises(RuntimeError, match="written"):
        _ = lowered.model
    with pytest.raises(RuntimeError, match="written once already"):
        lowered.write(tmp_path / "again.onnx")


def test_a_tied_fp16_table_is_written_once():
    lowered = lower_model(tied_model(), TIED_USES, _tied_plan(16, True))
    halves = [init for init in lowered.model.graph.initializer if init.data_type == TensorProto.FLOAT16]
    assert len(halves) == 1 and lowered.layers["head"].bytes_after == 0
    assert weight_nbytes(WeightShape(HIDDEN, ROWS, tied_head=True), 16, 32, True, FORMAT_QDQ) == 0


@pytest.mark.parametrize("one_file", [True, False])
def test_a_lowered_model_is_written_one_initializer_at_a_time(tmp_path, monkeypatch, one_file):
    """The streamed writer's file is SerializeToString's, byte for byte; over 2 GB (forced here) the weights go to
    `<name>_data` and ONNX Runtime gives the same outputs. Each tensor is dropped from the model once written."""
    import cptquant.onnx_io.streamed_write as streamed_write

    plan, kernels = _plan(4, False), KernelChoice(FORMAT_QDQ, {"down": FORMAT_NBITS})
    expected = lower_model(small_model(), USES, plan, kernels).model.SerializeToString()
    if not one_file:
        monkeypatch.setattr(streamed_write, "TWO_GB", 1000)
    lowered = lower_model(small_model(), USES, plan, kernels)
    written = lowered.write(tmp_path / "model.onnx")
    assert all(value.const_value is None for value in lowered.ir_model.graph.initializers.values())
    if one_file:
        assert written == [tmp_path / "model.onnx"] and (tmp_path / "model.onnx").read_bytes() == expected
        return
    assert written == [tmp_path / "model.onnx", tmp_path / "model.onnx_data"]
    assert (tmp_path / "model.onnx").stat().st_size < len(expected) // 2 < (tmp_path / "model.onnx_data").stat().st_size
    ids = {"ids": np.array([0, 5, 199], np.int64)}
    reference = ort.InferenceSession(expected, providers=["CPUExecutionProvider"]).run(None, ids)[0]
    streamed = ort.InferenceSession(str(tmp_path / "model.onnx"), providers=["CPUExecutionProvider"]).run(None, ids)[0]
    np.testing.assert_array_equal(streamed, reference)
