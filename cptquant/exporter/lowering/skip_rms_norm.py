"""Residual Add + RMSNorm -> com.microsoft.SkipSimplifiedLayerNormalization, one node per norm.

A Llama-style layer adds each sublayer's output to the residual stream and normalises the sum:
    s = Add(a, b);  c = Cast(s, float)  (a no-op in FP32);  y = w * (c / sqrt(mean(c^2, -1) + eps))
optimum writes the norm as ~9 small ops. ORT fuses those into SimplifiedLayerNormalization, but not the
Add in front of it (its SkipLayerNormFusion knows LayerNormalization only), so every step runs the Add
and the norm as two kernels and reads the hidden state twice. The model builder writes the fused op;
we write it too: SkipSimplifiedLayerNormalization(a, b, w) gives y, and its 4th output the sum s that
the residual stream carries on (docs/benchmarks.md, "Why the GenAI builder decodes faster").

The match is exact or nothing: every op of the pattern, the reduced axis (-1), the exponent (2) and the
numerator (1) are checked, and every intermediate value must have no other reader; a norm that does
not match stays as it was (ORT still fuses its norm part). The first layer's input norm reads the
embedding, not an Add, and stays. Exactness is proved with the attention rewrite that comes with it
(exporter/attention_fusion.py runs both against optimum's graph before either is kept).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx_ir as ir

from .context import MS_DOMAIN

SKIP_RMS_NORM = "SkipSimplifiedLayerNormalization"


@dataclass
class _Norm:
    """One matched residual Add + RMSNorm: the nodes it replaces and what the fused op needs."""

    nodes: list[ir.Node]  # the residual Add first
    weight: ir.Value
    epsilon: float
    sums: list[ir.Value]  # the Add's output and its float Cast's: both become the fused op's sum
    output: ir.Value  # the norm's output


class SkipRmsNormFusion(ir.passes.InPlacePass):
    """Every residual Add + RMSNorm that matches exactly (module docstring) becomes one fused node; the
    pattern's Constants are left for the pass list's RemoveUnusedNodesPass (lowering.attention_passes)."""

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        graph = model.graph
        matches = [norm for node in list(graph) if node.op_type == "ReduceMean" and node.domain == ""
                   if (norm := _match(node)) is not None]
        for norm in matches:
            add = norm.nodes[0]
            name = f"{add.name}/{SKIP_RMS_NORM}"
            # the Add's inputs as they are now: an earlier fusion may have rewired them to its sum
            fused = ir.Node(MS_DOMAIN, SKIP_RMS_NORM, [add.inputs[0], add.inputs[1], norm.weight],
                            [ir.convenience.convert_attribute("epsilon", norm.epsilon)],
                            outputs=[ir.Value(name=f"{name}_output_0"), ir.Value(name=""), ir.Value(name=""),
                                     ir.Value(name=f"{name}_sum")], name=name)
            graph.insert_before(add, fused)
            norm.output.replace_all_uses_with(fused.outputs[0])
            for value in norm.sums:
                value.replace_all_uses_with(fused.outputs[3])
            graph.remove(norm.nodes, safe=True)
        if matches and MS_DOMAIN not in model.opset_imports:
            model.opset_imports[MS_DOMAIN] = 1
        return ir.passes.PassResult(model, modified=bool(matches))


def _match(reduce_mean: ir.Node) -> _Norm | None:
    """The residual Add + RMSNorm around this ReduceMean, or None where any part differs."""
    if not _reduces_last_axis(reduce_mean):
        return None
    pow_node = _producer(reduce_mean.inputs[0], "Pow")
    if pow_node is None or _scalar(pow_node.inputs[1]) != 2.0 or not _single_use(pow_node):
        return None
    normalised = pow_node.inputs[0]
    add_eps = _only_user(reduce_mean, "Add")
    epsilon = _scalar(_other_input(add_eps, reduce_mean.outputs[0])) if add_eps else None
    sqrt = _only_user(add_eps, "Sqrt") if add_eps else None
    inverse = _only_user(sqrt, "Div") if sqrt else None
    if add_eps is None or epsilon is None or sqrt is None or inverse is None \
            or inverse.inputs[1] is not sqrt.outputs[0] or _scalar(inverse.inputs[0]) != 1.0:
        return None
    scale = _only_user(inverse, "Mul")
    if scale is None or _other_input(scale, inverse.outputs[0]) is not normalised:
        return None
    nodes: list[ir.Node] = [pow_node, reduce_mean, add_eps, sqrt, inverse, scale]
    last = scale
    cast_back = _only_user(scale, "Cast")
    if cast_back is not None and _casts_float_to_float(cast_back):
        nodes.append(cast_back)
        last = cast_back
    weighted = _only_user(last, "Mul")
    weight = _initializer(_other_input(weighted, last.outputs[0])) if weighted else None
    if weighted is None or weight is None or weight.const_value is None or len(weight.const_value.shape) != 1:
        return None
    if normalised is None:
        return None
    front: list[ir.Node] = []
    sums: list[ir.Value] = [normalised]
    cast = normalised.producer()
    if cast is not None and cast.op_type == "Cast" and _casts_float_to_float(cast) and cast.inputs[0] is not None:
        front, sums = [cast], [cast.inputs[0], normalised]
    add = _producer(sums[0], "Add")
    if add is None or any(value is None or value.const_value is not None for value in add.inputs):
        return None
    if weighted.outputs[0].is_graph_output() or any(value.is_graph_output() for value in sums):
        return None
    return _Norm([add, *front, *nodes, weighted], weight, float(epsilon), sums, weighted.outputs[0])


def _producer(value: ir.Value | None, op_type: str) -> ir.Node | None:
    node = value.producer() if value is not None else None
    return node if node is not None and node.op_type == op_type and node.domain == "" else None


def _only_user(node: ir.Node, op_type: str) -> ir.Node | None:
    """The one node that reads `node`'s one output, if it is an `op_type`."""
    if len(node.outputs) != 1 or node.outputs[0].is_graph_output():
        return None
    users = {id(user): user for user, _ in node.outputs[0].uses()}
    if len(users) != 1:
        return None
    user = next(iter(users.values()))
    return user if user.op_type == op_type and user.domain == "" else None


def _initializer(value: ir.Value | None) -> ir.Value | None:
    """`value`, or the initializer an Identity passes on (torch's exporter writes equal norm weights once)."""
    node = value.producer() if value is not None else None
    if node is not None and node.op_type == "Identity" and node.domain == "":
        return node.inputs[0]
    return value


def _single_use(node: ir.Node) -> bool:
    return len(node.outputs) == 1 and len(node.outputs[0].uses()) == 1 and not node.outputs[0].is_graph_output()


def _other_input(node: ir.Node, value: ir.Value) -> ir.Value | None:
    others = [v for v in node.inputs if v is not value]
    return others[0] if len(node.inputs) == 2 and len(others) == 1 else None


def _constant(value: ir.Value | None) -> np.ndarray | None:
    """A value's constant: an initializer's, or a Constant node's. (Not ir.convenience.get_const_tensor: it
    names a Constant's tensor after the node's output as it reads it, which changes the bytes written.)"""
    if value is None:
        return None
    if value.const_value is not None:
        return value.const_value.numpy()
    node = value.producer()
    if node is not None and node.op_type == "Constant" and node.domain == "" and "value" in node.attributes:
        return node.attributes["value"].as_tensor().numpy()
    return None


def _scalar(value: ir.Value | None) -> float | None:
    array = _constant(value)
    return float(array.reshape(())) if array is not None and array.size == 1 else None


def _reduces_last_axis(node: ir.Node) -> bool:
    if "keepdims" in node.attributes and node.attributes["keepdims"].as_int() != 1:
        return False
    if "axes" in node.attributes:  # opset < 18
        axes = list(node.attributes["axes"].as_ints())
    else:
        array = _constant(node.inputs[1]) if len(node.inputs) > 1 else None
        axes = [] if array is None else [int(a) for a in array.reshape(-1)]
    return axes == [-1] and _single_use(node)


def _casts_float_to_float(cast: ir.Node) -> bool:
    source = cast.inputs[0]
    # an FP32 export: the Cast is a no-op (an untyped source is proved by the ORT comparison)
    return ("to" in cast.attributes and cast.attributes["to"].as_int() == ir.DataType.FLOAT
            and source is not None and source.dtype in (ir.DataType.FLOAT, None))

