"""Check what ONNX Runtime really runs: every quantized weight must reach a low-bit kernel.

ORT writes the graph it will execute to `optimized_model_filepath`. A quantized weight that still
feeds a `DequantizeLinear` there is dequantized on every call (a slow path, docs/ort-kernels.md), as is a
4-bit weight whose expansion to int8 (`--format dynamic`) was not constant-folded: any node other
than the layer's low-bit kernel reading its tensors fails the export, naming the layer.
"""

from __future__ import annotations

import tempfile
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import onnx
import onnxruntime as ort

from ..errors import CptqError
from ..quant.storage import KERNEL_FP16, LOW_BIT_KERNELS
from .lowering import LoweredLayer


@dataclass
class GraphCheck:
    kernels: dict[str, int]  # e.g. {"MatMulNBits(bits=4)": 24, "GatherBlockQuantized(bits=8)": 1}
    per_layer: dict[str, list[str]]  # layer -> kernels that read its weight at run time
    unfused: list[str] = field(default_factory=list)  # quantized layers not run by a low-bit kernel
    fp16_casts_left: list[str] = field(default_factory=list)  # FP16 weights cast at run time (not folded)
    repaired: list[str] = field(default_factory=list)  # layers rewritten as MatMulNBits after a first check
    expected_kernels: dict[str, int] = field(default_factory=dict)  # kernel -> uses the rewrite planned for it

    def to_dict(self) -> dict[str, Any]:
        return {"kernels": self.kernels, "expected_kernels": self.expected_kernels, "unfused": self.unfused,
                "fp16_casts_left": self.fp16_casts_left, "written_as_matmulnbits_after_check": self.repaired}

    def raise_if_unfused(self) -> None:
        if self.unfused:
            raise CptqError(
                f"ONNX Runtime would not run {len(self.unfused)} quantized layer(s) as low-bit kernels "
                f"(weights dequantized on every call): {', '.join(self.unfused[:8])}"
            )


def _bits(node: onnx.NodeProto) -> int | None:
    return next((a.i for a in node.attribute if a.name == "bits"), None)


def optimized_graph(model_path: Path) -> onnx.ModelProto:
    """The graph the CPU EP executes, as written by ORT after all its optimizations."""
    with tempfile.TemporaryDirectory(prefix="cptq-opt-") as tmp:
        opt_path = Path(tmp) / "optimized.onnx"
        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        options.optimized_model_filepath = str(opt_path)
        options.log_severity_level = 3  # the "hardware specific optimizations" warning is expected
        options.add_session_config_entry("session.optimized_model_external_initializers_file_name",
                                         "optimized.onnx.data")
        options.add_session_config_entry("session.optimized_model_external_initializers_min_size_in_bytes", "1048576")
        # the session never runs: no prepacked weight copies (ORT prepacks after it has written the graph, which
        # is the same either way; 0.95 GB instead of 1.32 GB for the 640 M OPT's 382 MB output)
        options.add_session_config_entry("session.disable_prepacking", "1")
        ort.InferenceSession(str(model_path), options, providers=["CPUExecutionProvider"])
        return onnx.load(str(opt_path), load_external_data=False)


def check_kernels(model_path: Path, rewritten: dict[str, LoweredLayer]) -> GraphCheck:
    graph = optimized_graph(model_path).graph
    owners: dict[str, list[str]] = {}  # a tensor computed from several layers' weights (a fused kernel's) has each
    for record in rewritten.values():
        for init in record.new_initializers + record.derived_tensors:
            owners.setdefault(init, []).append(record.name)

    def layers_of(tensor: str) -> list[str]:
        # ORT renames the weights it repacks (`<name>_T`, ...): the longest of our own initializer names that
        # starts the tensor's name owns it (one dictionary lookup per prefix length, not a scan of every name).
        for end in range(len(tensor), 0, -1):
            if tensor[:end] in owners:
                return owners[tensor[:end]]
        return []

    kernels: Counter[str] = Counter()
    per_layer: dict[str, list[str]] = {name: [] for name in rewritten}
    slow, casts = [], []  # layers whose weight is still dequantized / expanded / cast at run time
    for node in graph.node:
        label = node.op_type if _bits(node) is None else f"{node.op_type}(bits={_bits(node)})"
        layers = {layer for tensor in node.input for layer in layers_of(tensor)}
        if node.op_type in LOW_BIT_KERNELS:
            kernels[label] += 1
        for layer in layers:
            per_layer[layer].append(node.op_type)
            if rewritten[layer].bits == 16:
                if node.op_type == "Cast":
                    casts.append(layer)
            elif node.op_type not in LOW_BIT_KERNELS:
                slow.append(layer)  # DequantizeLinear, or an int4 -> int8 expansion that was not folded
    missing = [name for name, record in rewritten.items()
               if sorted(k for k in record.expected_kernels if k != KERNEL_FP16)
               != sorted(k for k in per_layer[name] if k in LOW_BIT_KERNELS)]
    expected = Counter(k for record in rewritten.values() for k in record.expected_kernels)
    return GraphCheck(dict(sorted(kernels.items())), per_layer, sorted(set(slow) | set(missing)), sorted(set(casts)),
                      expected_kernels=dict(sorted(expected.items())))
