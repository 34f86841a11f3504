"""The rewriting pass: give each mapped layer its planned bit width in the ONNX graph.

- 4/8-bit MatMul weights become a blocked `DequantizeLinear` (opset 21, blocks along the input
  dimension); ORT fuses DQ -> MatMul into `MatMulNBits` (shared/NOTES.md §1).
- `Gemm` (nn.Linear / Conv1D on 2-D input) is first rewritten as `MatMul` + `Add`, since the
  fusion only matches MatMul.
- 4/8-bit embedding tables become `com.microsoft.GatherBlockQuantized`: a DQ -> Gather would
  dequantize the whole table on every call. A 4-bit table's hot rows (the plan's `hot_rows`) go
  to a second, 8-bit table, chosen per token by a slot table (passes/hot_rows.py).
- 16-bit weights are stored as FP16 with a `Cast` that ORT folds away at session start.
- `--format dynamic` writes 4/8-bit MatMul weights for `com.microsoft.DynamicQuantizeMatMul` (int8
  weight per output column, activations quantized at run time): ORT's fastest CPU kernel for
  encoders once a call has more than a few rows. 4-bit weights stay 4-bit on disk and are expanded
  to int8 by constant-foldable ops that ORT folds at session start.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from ..errors import CptqError
from ..plan import HOT_ROW_BITS, LayerPlan, Plan
from .layer_map import LayerMap, WeightUse
from ..quant.quantize import QuantizedWeight, quantize_blocked
from ..quant.storage import hot_slot_dtype, pack_uint4_last_axis
from ..quant.weight_quantizers import RoundToNearest

MS_DOMAIN = "com.microsoft"
KERNEL_MATMUL_NBITS = "MatMulNBits"
KERNEL_GATHER_BQ = "GatherBlockQuantized"
KERNEL_DYNAMIC = "DynamicQuantizeMatMul"
KERNEL_FP16 = "fp16"
LOW_BIT_KERNELS = (KERNEL_MATMUL_NBITS, KERNEL_GATHER_BQ, KERNEL_DYNAMIC)


@dataclass
class RewrittenLayer:
    name: str
    bits: int
    block_size: int | None
    expected_kernels: list[str]  # what ORT must run for each use of this layer's weight
    bytes_fp32: int  # bytes of the weight as exported (every stored copy)
    bytes_after: int  # bytes of what replaced it (integers, scales, zero points)
    new_initializers: list[str] = field(default_factory=list)
    derived_tensors: list[str] = field(default_factory=list)  # computed from those initializers (folded by ORT)
    mse: float = 0.0  # mean squared weight error of the quantization (0 for 16 bits)
    outlier_channels: int = 0  # input channels scaled down before the int8 product (--format dynamic)
    algorithm: str = "rtn"  # how the codes were chosen: rtn or gptq (embedding tables: always rtn)
    hot_rows: int = 0  # rows of a 4-bit embedding table stored at 8 bits


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
        self.derived: list[str] = []  # prelude outputs computed from them, in order
        self.shapes: dict[tuple, str] = {}  # one int64 shape initializer per distinct shape

    def unique(self, base: str) -> str:
        name, i = base, 1
        while name in self.names:
            name, i = f"{base}_{i}", i + 1
        self.names.add(name)
        return name

    def array(self, name: str) -> np.ndarray:
        return numpy_helper.to_array(self.initializers[name])

    def add_initializer(self, tensor: onnx.TensorProto, owned: bool = True) -> str:
        """`owned`: the layer's quantized weight, which the graph check follows to its kernel."""
        if owned:
            self.created.append(tensor.name)
        self.graph.initializer.append(tensor)
        self.initializers[tensor.name] = tensor
        return tensor.name

    def shape(self, dims: tuple[int, ...]) -> str:
        if dims not in self.shapes:
            name = self.unique("cptq.shape_" + "x".join(map(str, dims)))
            self.graph.initializer.append(numpy_helper.from_array(np.array(dims, np.int64), name))
            self.initializers[name] = self.graph.initializer[-1]
            self.shapes[dims] = name
        return self.shapes[dims]

    def node(self, name: str) -> onnx.NodeProto:
        for node in self.graph.node:
            if node.name == name:
                return node
        raise KeyError(name)

    def consumers(self, tensor: str) -> list[onnx.NodeProto]:
        return [n for n in self.graph.node if tensor in n.input] + [n for n in self.prelude if tensor in n.input]

    def drop_unused(self) -> None:
        """Remove Transposes, Identities and initializers that nothing reads any more."""
        graph_outputs = {o.name for o in self.graph.output}
        changed = True
        while changed:
            changed = False
            used = {i for n in list(self.graph.node) + self.prelude for i in n.input} | graph_outputs
            for node in list(self.graph.node):
                if node.op_type in ("Transpose", "Identity") and not any(o in used for o in node.output):
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
FORMAT_DYNAMIC = "dynamic"  # com.microsoft.DynamicQuantizeMatMul: int8 per-column weights, dynamic activations
FORMATS = (FORMAT_QDQ, FORMAT_NBITS, FORMAT_DYNAMIC)
# MatMulNBits accuracy level 4 = int8 activations inside the kernel; the level ORT's own DQ->MatMul fusion uses.
NBITS_ACCURACY_LEVEL = 4


def _quantize_matmul(g: _Graph, use: WeightUse, lp: LayerPlan, clip: str, base: str, fmt: str,
                     quantizer=None, layer: str = "", smoothing: np.ndarray | None = None) -> tuple[int, float, int]:
    """Returns the bytes written, the weight's mean squared error and the block size used.

    `smoothing` (per input channel, `--format dynamic` only): see `_write_dynamic`.
    """
    weight = _weight_seen_by_consumer(g, use)
    if use.op_type == "Gemm":
        consumer, weight_kn = _gemm_to_matmul(g, use, weight)
    else:
        consumer, weight_kn = g.node(use.node), weight
    quantizer = quantizer or RoundToNearest()
    if fmt == FORMAT_DYNAMIC:
        return _write_dynamic(g, consumer, weight_kn, lp, clip, base, quantizer, layer or base, smoothing)
    qw = quantizer(layer or base, weight_kn, lp.bits, lp.block_size, lp.symmetric, clip)
    if fmt == FORMAT_NBITS:
        qw = _write_matmul_nbits(g, consumer, qw, base)
        return qw.nbytes(), _mse(qw, weight_kn), qw.block_size
    q_name = g.add_initializer(_int_tensor(g.unique(f"{base}.weight_q{lp.bits}"), qw.q, lp.bits, qw.symmetric))
    s_name, scale, scale_bytes = _float_scales(g, qw.scale, f"{base}.weight_scale")
    qw = dataclasses.replace(qw, scale=scale, scale_bytes=scale_bytes)
    inputs = [q_name, s_name]
    if not qw.symmetric:
        inputs.append(g.add_initializer(_int_tensor(g.unique(f"{base}.weight_zp"), qw.zero_point, lp.bits, False)))
    dq_out = g.unique(f"{base}.weight_dq")
    g.prelude.append(helper.make_node("DequantizeLinear", inputs, [dq_out], name=g.unique(f"{base}.DequantizeLinear"),
                                      axis=0, block_size=lp.block_size))
    consumer.input[1] = dq_out
    return qw.nbytes(), _mse(qw, weight_kn), qw.block_size


def _fp16_scales_fit(scale: np.ndarray) -> bool:
    half = scale.astype(np.float16)
    return bool(np.all(np.isfinite(half)) and np.all((half != 0) | (scale == 0)))


def _float_scales(g: _Graph, values: np.ndarray, name: str) -> tuple[str, np.ndarray, int]:
    """Float32 factors for a kernel (block scales, or the dynamic format's block ratios), stored as FP16
    where they fit: a `Cast` that ORT folds at session start (before its QDQ fusions) restores float32,
    so the kernel is unchanged and the scales take half the bytes (1 bit per weight at blocks of 32 ->
    0.5). Returns the float32 tensor's name, the values as stored (what the model computes with) and
    the bytes per value on disk."""
    if not _fp16_scales_fit(values):
        return g.add_initializer(numpy_helper.from_array(values, g.unique(name))), values, 4
    half = values.astype(np.float16)
    h_name = g.add_initializer(numpy_helper.from_array(half, g.unique(f"{name}_fp16")))
    return _Prelude(g, name).add("Cast", [h_name], to=TensorProto.FLOAT), half.astype(np.float32), 2


def _write_dynamic(g: _Graph, matmul: onnx.NodeProto, weight_kn: np.ndarray, lp: LayerPlan, clip: str, base: str,
                   quantizer, layer: str, smoothing: np.ndarray | None = None) -> tuple[int, float, int]:
    """MatMul(A, W) -> DynamicQuantizeMatMul(A, W_int8, column scales[, bias]).

    8 bits: symmetric int8 per output column (one block of K), what ORT's quantize_dynamic writes.
    4 bits: the planned blocked codes stay on disk; the int8 per-column weight is computed from them
    with Cast/Sub/Mul/Round/Cast/Reshape, which ORT constant-folds at session start (it does not fold
    DequantizeLinear, hence plain ops). The effective weight is the 4-bit one rounded once more to
    the column's int8 grid; its error is what `mse` reports.
    `smoothing` s [K] (SmoothQuant-style): X W = (X / s)(s W). Channels with s > 1 peak far above the
    rest; scaled down, they no longer set the one activation scale the kernel uses per call, at the
    price of one Mul and coarser weight rows for those channels.
    """
    k, n = weight_kn.shape
    source = weight_kn if smoothing is None else weight_kn * smoothing[:, None]
    if lp.bits == 8:
        qw = quantizer(layer, source, 8, k, True, clip)
        q_name = g.add_initializer(_int_tensor(g.unique(f"{base}.weight_q8"), qw.q, 8, True))
        column_scale, effective = qw.scale.reshape(n), qw.dequantize()
        nbytes = qw.nbytes()
    else:
        qw = quantizer(layer, source, lp.bits, lp.block_size, lp.symmetric, clip, input_scale=smoothing)
        q_name, column_scale, effective, ratio_bytes = _int8_from_blocks(g, qw, base)
        nbytes = dataclasses.replace(qw, scale_bytes=ratio_bytes).nbytes() + column_scale.nbytes
    s_name = g.add_initializer(numpy_helper.from_array(column_scale, g.unique(f"{base}.weight_scale")))
    node = helper.make_node(KERNEL_DYNAMIC, [matmul.input[0], q_name, s_name], list(matmul.output),
                            name=g.unique(matmul.name + "DynamicQuantize"), domain=MS_DOMAIN)
    index = list(g.graph.node).index(matmul)
    g.graph.node.remove(matmul)
    g.graph.node.insert(index, node)
    _absorb_bias(g, g.node(node.name), n)
    if smoothing is not None:
        nbytes += _smooth_input(g, g.node(node.name), smoothing, base)
        effective = effective / smoothing[:, None]
    return nbytes, float(np.mean((effective - weight_kn) ** 2)), qw.block_size


def _smooth_input(g: _Graph, node: onnx.NodeProto, smoothing: np.ndarray, base: str) -> int:
    """Insert Mul(X, 1 / s) before the kernel; returns the bytes added."""
    inverse = (1 / smoothing).astype(np.float32)
    name = g.add_initializer(numpy_helper.from_array(inverse, g.unique(f"{base}.input_smoothing")), owned=False)
    scaled = g.unique(f"{base}.input_smoothed")
    mul = helper.make_node("Mul", [node.input[0], name], [scaled], name=g.unique(f"{base}.SmoothInput"))
    node.input[0] = scaled
    g.graph.node.insert(list(g.graph.node).index(node), mul)
    return inverse.nbytes


def _int8_from_blocks(g: _Graph, qw: QuantizedWeight, base: str) -> tuple[str, np.ndarray, np.ndarray, int]:
    """Write blocked low-bit codes and the prelude that expands them to an int8 [K, N] per-column weight.

    int8 = Round((q - zp) * ratio), ratio = block scale / column scale, column scale = max|W_q| / 127.
    Returns the int8 tensor's name, the column scales, the effective float weight and the bytes of one
    stored block ratio (2: FP16, restored by a Cast that ORT folds with the rest).
    """
    k, n = qw.q.shape
    blocks = k // qw.block_size
    column_scale = np.abs(qw.dequantize()).max(axis=0) / np.float32(127)
    column_scale = np.where(column_scale > 0, column_scale, 1).astype(np.float32)
    ratio = (qw.scale / column_scale).astype(np.float32)  # [K/B, N], in (0, 1]: FP16 keeps it to 2^-11
    codes = qw.q.reshape(blocks, qw.block_size, n)
    q_name = g.add_initializer(_int_tensor(g.unique(f"{base}.weight_q{qw.bits}"), codes, qw.bits, qw.symmetric))
    r_name, ratio, ratio_bytes = _float_scales(g, ratio.reshape(blocks, 1, n), f"{base}.weight_ratio")
    ratio = ratio.reshape(blocks, n)
    prelude = _Prelude(g, f"{base}.weight_int8")
    values = prelude.add("Cast", [q_name], to=TensorProto.FLOAT)
    expected = codes.astype(np.float32)
    if not qw.symmetric:
        zp = qw.zero_point.reshape(blocks, 1, n)
        zp_name = g.add_initializer(_int_tensor(g.unique(f"{base}.weight_zp"), zp, qw.bits, False))
        values = prelude.add("Sub", [values, prelude.add("Cast", [zp_name], to=TensorProto.FLOAT)])
        expected = expected - zp.astype(np.float32)
    values = prelude.add("Mul", [values, r_name])
    values = prelude.add("Cast", [prelude.add("Round", [values])], to=TensorProto.INT8)
    values = prelude.add("Reshape", [values, g.shape((k, n))])
    int8 = np.rint(expected * ratio[:, None, :]).reshape(k, n)  # what ORT computes, in the same float32 steps
    return values, column_scale, int8 * column_scale, ratio_bytes


class _Prelude:
    """Appends initializer-only nodes to the graph's prelude; their outputs are the layer's derived tensors."""

    def __init__(self, g: _Graph, base: str):
        self.g, self.base = g, base

    def add(self, op: str, inputs: list[str], **attrs) -> str:
        out = self.g.unique(self.base)
        self.g.prelude.append(helper.make_node(op, inputs, [out], name=self.g.unique(f"{self.base}.{op}"), **attrs))
        self.g.derived.append(out)
        return out


def _absorb_bias(g: _Graph, node: onnx.NodeProto, n: int) -> None:
    """Move a following `Add(bias[N])` into the kernel's bias input, as ORT's own fusion does."""
    out = node.output[0]
    consumers = g.consumers(out)
    if len(consumers) != 1 or consumers[0].op_type != "Add" or out in {o.name for o in g.graph.output}:
        return
    add = consumers[0]
    bias = [_through_identity(g, i) for i in add.input if i != out]
    if len(bias) != 1 or bias[0] not in g.initializers:
        return
    if list(g.initializers[bias[0]].dims) != [n] or g.initializers[bias[0]].data_type != TensorProto.FLOAT:
        return
    node.input.extend(["", bias[0]])  # no zero point: symmetric weights
    node.output[0] = add.output[0]
    g.graph.node.remove(add)


def _through_identity(g: _Graph, tensor: str) -> str:
    """The initializer behind an `Identity` (the exporter deduplicates equal biases that way), else `tensor`."""
    producer = next((n for n in g.graph.node if tensor in n.output), None)
    if producer is not None and producer.op_type == "Identity" and producer.input[0] in g.initializers:
        return producer.input[0]
    return tensor


def _write_matmul_nbits(g: _Graph, matmul: onnx.NodeProto, qw: QuantizedWeight, base: str) -> QuantizedWeight:
    """Replace MatMul(A, W) by MatMulNBits: codes per output column, blocks along K, packed low nibble first.
    Returns the weight as stored (FP16-rounded scales where they fit)."""
    k, n = qw.q.shape
    blocks = k // qw.block_size
    codes = (qw.q.astype(np.int16) + 2 ** (qw.bits - 1)).astype(np.uint8) if qw.symmetric else qw.q.astype(np.uint8)
    codes = np.ascontiguousarray(codes.T).reshape(n, blocks, qw.block_size)
    if qw.bits == 4:
        codes = pack_uint4_last_axis(codes)
    q_name = g.add_initializer(numpy_helper.from_array(codes, g.unique(f"{base}.weight_q{qw.bits}")))
    # The kernel reads scales as [N * blocks].
    s_name, flat, scale_bytes = _float_scales(g, np.ascontiguousarray(qw.scale.T).reshape(-1), f"{base}.weight_scale")
    qw = dataclasses.replace(qw, scale=flat.reshape(n, blocks).T.copy(), scale_bytes=scale_bytes)
    inputs = [matmul.input[0], q_name, s_name]
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
    return qw


def _quantize_gather(g: _Graph, use: WeightUse, lp: LayerPlan, clip: str, base: str) -> tuple[int, float, int]:
    """An embedding Gather becomes GatherBlockQuantized: (bytes written, weight MSE, low-bit lookups).

    With hot rows (a 4-bit table), those rows go to an 8-bit table of their own and a slot table
    sends each token id to its row in one table or the other: two lookups and a Where.
    """
    gather = g.node(use.node)
    axis = next((a.i for a in gather.attribute if a.name == "axis"), 0)
    if axis != 0:
        raise CptqError(f"node {gather.name}: embedding Gather on axis {axis} is not supported")
    table = _weight_seen_by_consumer(g, use)  # [rows, hidden]
    ids = gather.input[1]
    hot = np.asarray(lp.hot_rows if lp.bits == 4 and lp.hot_rows else [], dtype=np.int64)
    if not hot.size or hot.size == table.shape[0]:  # every row hot (a hand-written plan): an 8-bit table
        bits, symmetric = (lp.bits, lp.symmetric) if not hot.size else (HOT_ROW_BITS, True)
        node, half_rows, nbytes, sq_error = _block_quantized_lookup(g, table, ids, bits, lp.block_size,
                                                                   symmetric, clip, base, gather.name)
        nodes, hot = [node], hot[:0]
    else:
        nodes, half_rows, nbytes, sq_error = _hot_row_lookup(g, table, ids, hot, lp, clip, base, gather.name)
    # The lookups return FP16 rows (the scales are FP16); one Cast of the gathered [batch, seq, hidden]
    # restores float32.
    cast = helper.make_node("Cast", [half_rows], list(gather.output), name=g.unique(gather.name + "Cast"),
                            to=TensorProto.FLOAT)
    index = list(g.graph.node).index(gather)
    g.graph.node.remove(gather)
    for node in reversed(nodes + [cast]):
        g.graph.node.insert(index, node)
    return nbytes, sq_error / table.size, 1 if not hot.size else 2


def _block_quantized_lookup(g: _Graph, table: np.ndarray, ids: str, bits: int, block_size: int, symmetric: bool,
                            clip: str, base: str, name: str) -> tuple[onnx.NodeProto, str, int, float]:
    """A GatherBlockQuantized node over `table` [rows, hidden] (not yet in the graph): (node, its FP16
    output, bytes written, summed squared error of the weights as stored)."""
    qw = quantize_blocked(table.T, bits, block_size, symmetric, clip)  # blocks along hidden
    q = qw.q.T  # [rows, hidden]
    scale = np.ascontiguousarray(qw.scale.T)  # [rows, hidden / block]
    offset = 2 ** (bits - 1)
    # uint8 storage; with no zero point the kernel assumes 2^(bits-1), i.e. symmetric.
    data = (q.astype(np.int16) + offset).astype(np.uint8) if qw.symmetric else q.astype(np.uint8)
    if bits == 4:
        data = pack_uint4_last_axis(data)
    # FP16 scales: a table's scales are 1/8 of its 4-bit bytes in float32 (0.7 MB of MiniLM's 7.5 MB).
    inputs = [
        g.add_initializer(numpy_helper.from_array(data, g.unique(f"{base}.weight_q{bits}"))),
        ids,
        g.add_initializer(numpy_helper.from_array(scale.astype(np.float16), g.unique(f"{base}.weight_scale_fp16"))),
    ]
    if not qw.symmetric:
        zp = np.ascontiguousarray(qw.zero_point.T)
        if bits == 4:
            zp = pack_uint4_last_axis(zp)
        inputs.append(g.add_initializer(numpy_helper.from_array(zp, g.unique(f"{base}.weight_zp"))))
    half_rows = g.unique(f"{base}.gathered_fp16")
    node = helper.make_node(KERNEL_GATHER_BQ, inputs, [half_rows], name=g.unique(name + "BlockQuantized"),
                            domain=MS_DOMAIN, gather_axis=0, quantize_axis=1, block_size=block_size, bits=bits)
    stored = dataclasses.replace(qw, scale=qw.scale.astype(np.float16).astype(np.float32))  # what the file holds
    sq_error = float(np.sum((stored.dequantize() - table.T.astype(np.float32)) ** 2))
    return node, half_rows, dataclasses.replace(qw, scale_bytes=2).nbytes(), sq_error


def _hot_row_lookup(g: _Graph, table: np.ndarray, ids: str, hot: np.ndarray, lp: LayerPlan, clip: str, base: str,
                    name: str) -> tuple[list[onnx.NodeProto], str, int, float]:
    """Hot rows at 8 bits, the others at the plan's 4: slot[id] is the row in the cold table (>= 0) or
    -1 - the row in the hot table. Both tables are looked up for every token (clamped indices) and a
    Where keeps the right one: a few integer ops on [batch, seq] and one select on the output."""
    rows = table.shape[0]
    is_hot = np.zeros(rows, dtype=bool)
    is_hot[hot] = True
    cold = np.flatnonzero(~is_hot)
    slot = np.empty(rows, dtype=hot_slot_dtype(rows))
    slot[cold] = np.arange(cold.size)
    slot[hot] = -1 - np.arange(hot.size)
    # Index tables are not weights: unowned, so the graph check does not expect a low-bit kernel on them.
    slot_name = g.add_initializer(numpy_helper.from_array(slot, g.unique(f"{base}.hot_slot")), owned=False)
    zero = g.add_initializer(numpy_helper.from_array(np.array(0, np.int32), g.unique(f"{base}.zero")), owned=False)
    minus_one = g.add_initializer(numpy_helper.from_array(np.array(-1, np.int32), g.unique(f"{base}.minus_one")),
                                  owned=False)
    last_axis = g.add_initializer(numpy_helper.from_array(np.array([-1], np.int64), g.unique(f"{base}.last_axis")),
                                  owned=False)
    out = {k: g.unique(f"{base}.{k}") for k in ("slot", "slot32", "is_hot", "hot_slot", "hot_index", "cold_index",
                                                "is_hot_3d", "rows_fp16")}
    nodes = [
        helper.make_node("Gather", [slot_name, ids], [out["slot"]], name=g.unique(f"{name}HotSlot"), axis=0),
        helper.make_node("Cast", [out["slot"]], [out["slot32"]], name=g.unique(f"{name}HotSlotCast"),
                         to=TensorProto.INT32),
        helper.make_node("Less", [out["slot32"], zero], [out["is_hot"]], name=g.unique(f"{name}IsHot")),
        helper.make_node("Sub", [minus_one, out["slot32"]], [out["hot_slot"]], name=g.unique(f"{name}HotRow")),
        helper.make_node("Max", [out["hot_slot"], zero], [out["hot_index"]], name=g.unique(f"{name}HotIndex")),
        helper.make_node("Max", [out["slot32"], zero], [out["cold_index"]], name=g.unique(f"{name}ColdIndex")),
    ]
    hot_node, hot_rows_fp16, hot_bytes, hot_error = _block_quantized_lookup(
        g, table[hot], out["hot_index"], HOT_ROW_BITS, lp.block_size, True, clip, f"{base}.hot", name + "Hot")
    cold_node, cold_rows_fp16, cold_bytes, cold_error = _block_quantized_lookup(
        g, table[cold], out["cold_index"], lp.bits, lp.block_size, lp.symmetric, clip, f"{base}.cold", name + "Cold")
    nodes += [
        hot_node, cold_node,
        helper.make_node("Unsqueeze", [out["is_hot"], last_axis], [out["is_hot_3d"]], name=g.unique(f"{name}IsHot3d")),
        helper.make_node("Where", [out["is_hot_3d"], hot_rows_fp16, cold_rows_fp16], [out["rows_fp16"]],
                         name=g.unique(f"{name}HotOrCold")),
    ]
    return nodes, out["rows_fp16"], hot_bytes + cold_bytes + slot.nbytes, hot_error + cold_error


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
                  nbits_layers: frozenset[str] = frozenset(), quantizer=None,
                  smoothing: dict[str, np.ndarray] | None = None) -> dict[str, RewrittenLayer]:
    """Apply `plan` to `model` in place; returns what was done to each layer.

    `fmt` chooses how 4/8-bit MatMul weights are written; layers in `nbits_layers` get MatMulNBits
    whatever `fmt` says (used where another ORT fusion would pre-empt DQ -> MatMul, see pipeline).
    `quantizer` turns MatMul weights into codes (round-to-nearest by default, or GPTQ); embedding
    tables are always round-to-nearest. `smoothing` (layer -> per-input-channel factors) scales
    outlier channels down before the int8 product of `--format dynamic` layers.
    """
    smoothing = smoothing or {}
    quantizer = quantizer or RoundToNearest()
    g = _Graph(model)
    done: dict[str, RewrittenLayer] = {}
    for name, mapping in layer_map.mapped.items():
        lp = plan.layers.get(name)
        if lp is None:
            continue
        record = RewrittenLayer(name, lp.bits, lp.block_size if lp.bits < 16 else None, [], 0, 0)
        first_created, first_derived = len(g.created), len(g.derived)
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
                nbytes, mse, lookups = _quantize_gather(g, use, lp, plan.clip, base)
                record.bytes_after += nbytes
                errors.append(mse)
                record.expected_kernels += [KERNEL_GATHER_BQ] * lookups
                record.hot_rows = len(lp.hot_rows) if lookups == 2 else 0
            else:
                layer_fmt = FORMAT_NBITS if name in nbits_layers else fmt
                factors = smoothing.get(name) if layer_fmt == FORMAT_DYNAMIC else None
                nbytes, mse, record.block_size = _quantize_matmul(g, use, lp, plan.clip, base, layer_fmt, quantizer,
                                                                  name, factors)
                record.outlier_channels = 0 if factors is None else int((factors > 1).sum())
                record.algorithm = quantizer.algorithm_for(name, lp.bits)
                record.bytes_after += nbytes
                errors.append(mse)
                record.expected_kernels.append(KERNEL_DYNAMIC if layer_fmt == FORMAT_DYNAMIC else KERNEL_MATMUL_NBITS)
        record.mse = float(np.mean(errors)) if errors else 0.0
        record.new_initializers = g.created[first_created:]
        record.derived_tensors = g.derived[first_derived:]
        done[name] = record
    g.finish()
    if any(node.domain == MS_DOMAIN for node in model.graph.node):
        if not any(op.domain == MS_DOMAIN for op in model.opset_import):
            model.opset_import.append(helper.make_opsetid(MS_DOMAIN, 1))
    return done
