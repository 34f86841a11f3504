"""What ONNX Runtime really runs for each weight of a model, whoever quantized it.

The graph ORT executes (written after all its CPU optimizations) is read, and every large weight
(a 2-D initializer, or a MatMulNBits/GatherBlockQuantized blob) is assigned the op that reads it:
a low-bit kernel (MatMulNBits, GatherBlockQuantized, DynamicQuantizeMatMul, MatMulInteger), a
`DequantizeLinear` feeding a float op (the weight is dequantized on every call: a slow path), or a
float op on a float weight. Used for the peers in the SmolLM2 benchmark, where nothing checked
their layers the way our exporter's graph_check checks ours.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
import onnx

from ..exporter.graph_check import optimized_graph

LOW_BIT = ("MatMulNBits", "GatherBlockQuantized", "DynamicQuantizeMatMul", "MatMulInteger")
MIN_WEIGHT_ELEMENTS = 256  # smaller 2-D initializers are not layers (norms and biases are 1-D)
# Ops that read a layer's weight; other large initializers (a rotary cos/sin cache) are not layers.
WEIGHT_OPS = LOW_BIT + ("DequantizeLinear", "Cast", "MatMul", "Gemm", "FusedMatMul", "FusedGemm", "Gather")
_DTYPES = {onnx.TensorProto.FLOAT: "FP32", onnx.TensorProto.FLOAT16: "FP16", onnx.TensorProto.INT8: "int8",
           onnx.TensorProto.UINT8: "uint8", onnx.TensorProto.INT4: "int4", onnx.TensorProto.UINT4: "uint4"}


def _attr(node: onnx.NodeProto, name: str) -> Any:  # an attribute's value: int, float, str, tensor...
    return next((onnx.helper.get_attribute_value(a) for a in node.attribute if a.name == name), None)


def kernel_census(model_path: Path) -> dict[str, int]:
    """{"MatMulNBits(4)": 180, "DequantizeLinear(uint8) -> Gather": 1, "MatMul FP32": 1, ...}: how many
    weights each kind of op reads in the graph ORT's CPU EP runs."""
    graph = optimized_graph(Path(model_path)).graph
    initializers = {t.name: t for t in graph.initializer}
    weights = {name: t for name, t in initializers.items()
               if len(t.dims) >= 2 and int(np.prod(t.dims)) >= MIN_WEIGHT_ELEMENTS}
    consumers: dict[str, list[onnx.NodeProto]] = {}
    for node in graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node)
    census: Counter[str] = Counter()
    for node in graph.node:
        if node.op_type in LOW_BIT:  # its packed weight may be small (a tiny test model's): always a layer
            if not any(name in initializers for name in node.input):
                continue
            bits = _attr(node, "bits")
            census[f"{node.op_type}({bits})" if bits else node.op_type] += 1
            continue
        read = [name for name in node.input if name in weights]
        if not read or node.op_type not in WEIGHT_OPS:
            continue
        if node.op_type == "DequantizeLinear":
            dtype = _DTYPES.get(weights[read[0]].data_type, "?")
            users = sorted({user.op_type for user in consumers.get(node.output[0], [])}) or ["(output)"]
            census[f"DequantizeLinear({dtype}) -> {'/'.join(users)}"] += 1
        elif node.op_type == "Cast":
            users = sorted({user.op_type for user in consumers.get(node.output[0], [])}) or ["(output)"]
            census[f"Cast({_DTYPES.get(weights[read[0]].data_type, '?')}) -> {'/'.join(users)}"] += 1
        else:
            census[f"{node.op_type} {_DTYPES.get(weights[read[0]].data_type, '?')}"] += 1
    return dict(sorted(census.items(), key=lambda item: (-item[1], item[0])))


def slow_paths(census: dict[str, int]) -> int:
    """Weights dequantized at run time instead of read by a low-bit kernel."""
    return sum(count for kind, count in census.items() if kind.startswith("DequantizeLinear"))


def describe(census: dict[str, int]) -> str:
    return ", ".join(f"{kind} ×{count}" for kind, count in census.items())
