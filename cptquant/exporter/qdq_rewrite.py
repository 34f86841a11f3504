"""The rewriting pass: give each mapped layer its planned bit width in the ONNX graph.

- 4/8-bit MatMul weights become a blocked `DequantizeLinear` (opset 21, blocks along the input
  dimension); ORT fuses DQ -> MatMul into `MatMulNBits` (shared/NOTES.md §1).
- `Gemm` (nn.Linear / Conv1D on 2-D input) is first rewritten as `MatMul` + `Add`, since the
  fusion only matches MatMul.
- 4/8-bit embedding tables become `com.microsoft.GatherBlockQuantized`: a DQ -> Gather would
  dequantize the whole table on every call.
- 16-bit weights are stored as FP16 with a `Cast` that ORT folds away at session start.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from ..errors import CptqError
from ..plan import LayerPlan, Plan
from .layer_map import LayerMap, WeightUse
from .quantize import QuantizedWeight, pack_uint4_last_axis, quantize_blocked
from .weight_quantizers import RoundToNearest

MS_DOMAIN = "com.microsoft"
KERNEL_MATMUL_NBITS = "MatMulNBits"
KERNEL_GATHER_BQ = "GatherBlockQuantized"
KERNEL_FP16 = "fp16"


@dataclass
class RewrittenLayer:
    name: str
    bits: int
    block_size: int | None
    expected_kernels: list[str]  # what ORT must run for each use of this layer's weight
    bytes_fp32: int  # bytes of the weight as exported (every stored copy)
    bytes_after: int  # bytes of what replaced it (integers, scales, zero points)
    new_initializers: list[str] = field(default_factory=list)
    mse: float = 0.0  # mean squared weight error of the quantization (0 for 16 bits)
    algorithm: str = "rtn"  # how the codes were chosen: rtn or gptq (embedding tables: always rtn)


class _Graph:
    """Small helper over a ModelProto graph: initializer lookup, consumers, unique names."""

    def __init__(self, model: onnx.ModelProto):
        self.model = model
        self.graph = model.graph
        self.initializers = {init.name: init for init in self.graph.initializer}
        self.names = {n.name for n in self.graph.node} | set(self.initializers) | {
            o for n in self.graph.node for o in n.output}
        self.prelude: list[onnx.NodeProto] = []  # nodes that depend on initializers only
        self.created: list[str] = []  # initializers this pass added, in order

    def unique(self, base: str) -> str:
        name, i = base, 1
        while name in self.names:
            name, i = f"{base}_{i}", i + 1
        self.names.add(name)
        return name

    def array(self, name: str) -> np.ndarray:
        return numpy_helper.to_array(self.initializers[name])

    def add_initializer(self, tensor: onnx.TensorProto) -> str:
        self.created.append(tensor.name)
        self.graph.initializer.append(tensor)
        self.initializers[tensor.name] = tensor
        return tensor.name

    def node(self, name: str) -> onnx.NodeProto:
        for node in self.graph.node:
            if node.name == name:
                return node
        raise KeyError(name)

    def consumers(self, tensor: str) -> list[onnx.NodeProto]:
        return [n for n in self.graph.node if tensor in n.input] + [n for n in self.prelude if tensor in n.input]

    def drop_unused(self) -> None:
        """Remove Transposes and initializers that nothing reads any more."""
        graph_outputs = {o.name for o in self.graph.output}
        changed = True
        while changed:
            changed = False
            used = {i for n in list(self.graph.node) + self.prelude for i in n.input} | graph_outputs
            for node in list(self.graph.node):
                if node.op_type == "Transpose" and not any(o in used for o in node.output):
                    self.graph.node.remove(node)
                    changed = True
        used = {i for n in list(self.graph.node) + self.prelude for i in n.input} | graph_outputs
        for init in list(self.graph.initializer):
            if init.name not in used:
                self.graph.initializer.remove(init)
                del self.initializers[init.name]

    def finish(self) -> None:
        # Prelude nodes read initializers only, so putting them first keeps the graph topologically sorted.
        nodes = self.prelude + list(self.graph.node)
        del self.graph.node[:]
        self.graph.node.extend(nodes)
        self.drop_unused()


def _int_tensor(name: str, values: np.ndarray, bits: int, signed: bool) -> onnx.TensorProto:
    if bits == 4:
        # raw_data packs two values per byte (low nibble first); the int32_data field would spend a
        # varint on every value and make the file larger than the weights it holds.
        dtype = TensorProto.INT4 if signed else TensorProto.UINT4
        nibbles = (values.astype(np.int16).ravel() & 0x0F).astype(np.uint8)
        return helper.make_tensor(name, dtype, values.shape, pack_uint4_last_axis(nibbles).tobytes(), raw=True)
    return numpy_helper.from_array(values.astype(np.int8 if signed else np.uint8), name)


def _weight_seen_by_consumer(g: _Graph, use: WeightUse) -> np.ndarray:
    weight = g.array(use.initializer)
    return weight.T if use.via_transpose else weight


def _gemm_to_matmul(g: _Graph, use: WeightUse, weight: np.ndarray) -> tuple[onnx.NodeProto, np.ndarray]:
    """Replace Gemm(A, B, C) by MatMul(A, B') + Add(C); returns the MatMul and B' as [K, N]."""
    gemm = g.node(use.node)
    attrs = {a.name: helper.get_attribute_value(a) for a in gemm.attribute}
    if attrs.get("transA", 0):
        raise CptqError(f"node {gemm.name}: Gemm with transA=1 is not supported")
    alpha, beta = float(attrs.get("alpha", 1.0)), float(attrs.get("beta", 1.0))
    weight_kn = (weight.T if attrs.get("transB", 0) else weight) * np.float32(alpha)
    index = list(g.graph.node).index(gemm)
    mm_out = g.unique(gemm.output[0] + "_matmul")
    matmul = helper.make_node("MatMul", [gemm.input[0], use.initializer], [mm_out],
                              name=g.unique(gemm.name.replace("Gemm", "MatMul")))
    new_nodes = [matmul]
    if len(gemm.input) > 2 and gemm.input[2]:
        bias = gemm.input[2]
        if beta != 1.0:
            if bias not in g.initializers:
                raise CptqError(f"node {gemm.name}: Gemm with beta != 1 and a computed bias is not supported")
            bias = g.add_initializer(numpy_helper.from_array(g.array(bias) * np.float32(beta), g.unique(bias + "_beta")))
        new_nodes.append(helper.make_node("Add", [mm_out, bias], [gemm.output[0]],
                                          name=g.unique(gemm.name.replace("Gemm", "Add"))))
    else:
        matmul.output[0] = gemm.output[0]
    g.graph.node.remove(gemm)
    for offset, node in enumerate(new_nodes):
        g.graph.node.insert(index + offset, node)  # protobuf copies the node: look it up again below
    return g.node(matmul.name), weight_kn


def _rewire(node: onnx.NodeProto, old: str, new: str) -> None:
    for i, name in enumerate(node.input):
        if name == old:
            node.input[i] = new


FORMAT_QDQ = "qdq"  # standard DequantizeLinear -> MatMul; ORT fuses it into MatMulNBits
FORMAT_NBITS = "nbits"  # com.microsoft.MatMulNBits written directly
FORMATS = (FORMAT_QDQ, FORMAT_NBITS)
# MatMulNBits accuracy level 4 = int8 activations inside the kernel; the level ORT's own DQ->MatMul fusion uses.
NBITS_ACCURACY_LEVEL = 4


def _quantize_matmul(g: _Graph, use: WeightUse, lp: LayerPlan, clip: str, base: str, fmt: str,
                     quantizer=None, layer: str = "") -> tuple[int, float]:
    weight = _weight_seen_by_consumer(g, use)
    if use.op_type == "Gemm":
        consumer, weight_kn = _gemm_to_matmul(g, use, weight)
    else:
        consumer, weight_kn = g.node(use.node), weight
    quantizer = quantizer or RoundToNearest()
    qw = quantizer(layer or base, weight_kn, lp.bits, lp.block_size, lp.symmetric, clip)
    if fmt == FORMAT_NBITS:
        _write_matmul_nbits(g, consumer, qw, base)
        return qw.nbytes(), _mse(qw, weight_kn)
    q_name = g.add_initializer(_int_tensor(g.unique(f"{base}.weight_q{lp.bits}"), qw.q, lp.bits, qw.symmetric))
    s_name = g.add_initializer(numpy_helper.from_array(qw.scale, g.unique(f"{base}.weight_scale")))
    inputs = [q_name, s_name]
    if not qw.symmetric:
        inputs.append(g.add_initializer(_int_tensor(g.unique(f"{base}.weight_zp"), qw.zero_point, lp.bits, False)))
    dq_out = g.unique(f"{base}.weight_dq")
    g.prelude.append(helper.make_node("DequantizeLinear", inputs, [dq_out], name=g.unique(f"{base}.DequantizeLinear"),
                                      axis=0, block_size=lp.block_size))
    consumer.input[1] = dq_out
    return qw.nbytes(), _mse(qw, weight_kn)


def _write_matmul_nbits(g: _Graph, matmul: onnx.NodeProto, qw: QuantizedWeight, base: str) -> None:
    """Replace MatMul(A, W) by MatMulNBits: codes per output column, blocks along K, packed low nibble first."""
    k, n = qw.q.shape
    blocks = k // qw.block_size
    codes = (qw.q.astype(np.int16) + 2 ** (qw.bits - 1)).astype(np.uint8) if qw.symmetric else qw.q.astype(np.uint8)
    codes = np.ascontiguousarray(codes.T).reshape(n, blocks, qw.block_size)
    if qw.bits == 4:
        codes = pack_uint4_last_axis(codes)
    inputs = [
        matmul.input[0],
        g.add_initializer(numpy_helper.from_array(codes, g.unique(f"{base}.weight_q{qw.bits}"))),
        g.add_initializer(numpy_helper.from_array(np.ascontiguousarray(qw.scale.T).reshape(-1),
                                                  g.unique(f"{base}.weight_scale"))),
    ]
    if not qw.symmetric:  # without zero points the kernel assumes 2^(bits-1): the symmetric case
        zp = np.ascontiguousarray(qw.zero_point.T)
        zp = pack_uint4_last_axis(zp) if qw.bits == 4 else zp
        inputs.append(g.add_initializer(numpy_helper.from_array(zp.reshape(-1), g.unique(f"{base}.weight_zp"))))
    node = helper.make_node(KERNEL_MATMUL_NBITS, inputs, list(matmul.output), name=g.unique(matmul.name + "NBits"),
                            domain=MS_DOMAIN, K=k, N=n, bits=qw.bits, block_size=qw.block_size,
                            accuracy_level=NBITS_ACCURACY_LEVEL)
    index = list(g.graph.node).index(matmul)
    g.graph.node.remove(matmul)
    g.graph.node.insert(index, node)


def _quantize_gather(g: _Graph, use: WeightUse, lp: LayerPlan, clip: str, base: str) -> tuple[int, float]:
    gather = g.node(use.node)
    axis = next((a.i for a in gather.attribute if a.name == "axis"), 0)
    if axis != 0:
        raise CptqError(f"node {gather.name}: embedding Gather on axis {axis} is not supported")
    table = _weight_seen_by_consumer(g, use)  # [rows, hidden]
    qw = quantize_blocked(table.T, lp.bits, lp.block_size, lp.symmetric, clip)  # blocks along hidden
    q = qw.q.T  # [rows, hidden]
    scale = np.ascontiguousarray(qw.scale.T)  # [rows, hidden / block]
    offset = 2 ** (lp.bits - 1)
    # uint8 storage; with no zero point the kernel assumes 2^(bits-1), i.e. symmetric.
    data = (q.astype(np.int16) + offset).astype(np.uint8) if qw.symmetric else q.astype(np.uint8)
    if lp.bits == 4:
        data = pack_uint4_last_axis(data)
    # FP16 scales: a table's scales are 1/8 of its 4-bit bytes in float32 (0.7 MB of MiniLM's 7.5 MB); the
    # kernel then returns FP16 rows, and one Cast of the gathered [batch, seq, hidden] restores float32.
    inputs = [
        g.add_initializer(numpy_helper.from_array(data, g.unique(f"{base}.weight_q{lp.bits}"))),
        gather.input[1],
        g.add_initializer(numpy_helper.from_array(scale.astype(np.float16), g.unique(f"{base}.weight_scale_fp16"))),
    ]
    if not qw.symmetric:
        zp = np.ascontiguousarray(qw.zero_point.T)
        if lp.bits == 4:
            zp = pack_uint4_last_axis(zp)
        inputs.append(g.add_initializer(numpy_helper.from_array(zp, g.unique(f"{base}.weight_zp"))))
    half_rows = g.unique(f"{base}.gathered_fp16")
    node = helper.make_node(KERNEL_GATHER_BQ, inputs, [half_rows], name=g.unique(gather.name + "BlockQuantized"),
                            domain=MS_DOMAIN, gather_axis=0, quantize_axis=1, block_size=lp.block_size, bits=lp.bits)
    cast = helper.make_node("Cast", [half_rows], list(gather.output), name=g.unique(gather.name + "Cast"),
                            to=TensorProto.FLOAT)
    index = list(g.graph.node).index(gather)
    g.graph.node.remove(gather)
    g.graph.node.insert(index, cast)
    g.graph.node.insert(index, node)
    qw16 = dataclasses.replace(qw, scale=qw.scale.astype(np.float16).astype(np.float32))  # what the file holds
    return qw.nbytes() - 2 * qw.scale.size, _mse(qw16, table.T)


def _to_fp16(g: _Graph, use: WeightUse, base: str) -> int:
    consumer = g.node(use.node)
    half = g.array(use.initializer).astype(np.float16)
    h_name = g.add_initializer(numpy_helper.from_array(half, g.unique(f"{base}.weight_fp16")))
    cast_out = g.unique(f"{base}.weight_cast")
    g.prelude.append(helper.make_node("Cast", [h_name], [cast_out], name=g.unique(f"{base}.Cast"), to=TensorProto.FLOAT))
    if use.via_transpose:
        g.node(use.via_transpose).input[0] = cast_out
    else:
        _rewire(consumer, use.initializer, cast_out)
    return half.nbytes


def _mse(qw: QuantizedWeight, weight_kn: np.ndarray) -> float:
    return float(np.mean((qw.dequantize() - weight_kn) ** 2))


def rewrite_model(model: onnx.ModelProto, layer_map: LayerMap, plan: Plan, fmt: str = FORMAT_QDQ,
                  nbits_layers: frozenset[str] = frozenset(), quantizer=None) -> dict[str, RewrittenLayer]:
    """Apply `plan` to `model` in place; returns what was done to each layer.

    `fmt` chooses how 4/8-bit MatMul weights are written; layers in `nbits_layers` get MatMulNBits
    whatever `fmt` says (used where another ORT fusion would pre-empt DQ -> MatMul, see pipeline).
    `quantizer` turns MatMul weights into codes (round-to-nearest by default, or GPTQ); embedding
    tables are always round-to-nearest.
    """
    quantizer = quantizer or RoundToNearest()
    g = _Graph(model)
    done: dict[str, RewrittenLayer] = {}
    for name, mapping in layer_map.mapped.items():
        lp = plan.layers.get(name)
        if lp is None:
            continue
        record = RewrittenLayer(name, lp.bits, lp.block_size if lp.bits < 16 else None, [], 0, 0)
        first_created = len(g.created)
        seen_inits: set[str] = set()
        errors = []
        for i, use in enumerate(mapping.uses):
            base = name if len(mapping.uses) == 1 else f"{name}.{i}"
            if use.initializer not in seen_inits:
                record.bytes_fp32 += g.array(use.initializer).size * 4
                seen_inits.add(use.initializer)
            if lp.bits == 16:
                record.bytes_after += _to_fp16(g, use, base)
                record.expected_kernels.append(KERNEL_FP16)
            elif use.op_type == "Gather":
                nbytes, mse = _quantize_gather(g, use, lp, plan.clip, base)
                record.bytes_after += nbytes
                errors.append(mse)
                record.expected_kernels.append(KERNEL_GATHER_BQ)
            else:
                layer_fmt = FORMAT_NBITS if name in nbits_layers else fmt
                nbytes, mse = _quantize_matmul(g, use, lp, plan.clip, base, layer_fmt, quantizer, name)
                record.algorithm = quantizer.algorithm_for(name, lp.bits)
                record.bytes_after += nbytes
                errors.append(mse)
                record.expected_kernels.append(KERNEL_MATMUL_NBITS)
        record.mse = float(np.mean(errors)) if errors else 0.0
        record.new_initializers = g.created[first_created:]
        done[name] = record
    g.finish()
    if any(node.domain == MS_DOMAIN for node in model.graph.node):
        if not any(op.domain == MS_DOMAIN for op in model.opset_import):
            model.opset_import.append(helper.make_opsetid(MS_DOMAIN, 1))
    return done
