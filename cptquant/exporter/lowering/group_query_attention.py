"""optimum's decoder attention -> com.microsoft.GroupQueryAttention, one node per layer.

optimum exports a Llama-style layer's attention as ~150 small ops (Reshape/Transpose of q, k, v,
rotary as Slice/Neg/Concat/Mul, repeat_kv as Unsqueeze/Expand/Reshape, MatMul + Add(mask) + Softmax
+ MatMul, and the shape arithmetic for all of it). ORT runs each one; at one token per step they, not
the weights, are most of the time (docs/benchmarks.md, "Why the GenAI builder decodes faster").

The rewrite is structural: it does not match those ops. Per layer it takes the q/k/v projection
outputs (the layer map names their MatMuls; a bias Add after one is followed), the layer's
`past_key_values.{i}.key/value` inputs and `present.{i}.key/value` outputs and o_proj's MatMul, and
puts between them
    GroupQueryAttention(q, k, v, past_key, past_value, seqlens_k, total_sequence_length,
                        cos_cache, sin_cache, -, attention_bias; do_rotary=1)
        -> o_proj's input, present.{i}.key, present.{i}.value
then drops every node no output needs any more. What the layers share is computed once: the cos/sin
caches (from the model's own inverse frequencies, [max positions, head_dim / 2], constant inputs only:
ORT folds them at session start, so the file grows by a few hundred bytes), and from the attention mask
`total_sequence_length` (its length), `seqlens_k` (that length - 1 for every row) and an additive bias
(0 where the mask is 1, float32's lowest where it is 0). Where the fused-kernel pass later joins q/k/v
into one MatMulNBits, GroupQueryAttention reads that packed output directly (fused_kernels.py).

Why a bias and not `seqlens_k = ReduceSum(mask) - 1` as the model builder writes: ORT's GQA reads
seqlens_k as "row b's keys are positions 0..seqlens_k[b]" (right padding). optimum's and transformers'
batches are left-padded; the bias masks exactly the keys the original graph masks, whatever the
padding. Rotary inside GQA then counts a row's positions from the left edge of the batch, where the
graph's `position_ids` count from the row's first real token: in a row with p pads every query and key
sits p positions later. Rotary attention depends only on the difference of the two positions, so the
logits are the same (proved below, over a left-padded prefill and decode steps); what differs is how
that row's keys are stored in `present.{i}.key` (rotated for their left-edge positions), a convention
the file's own later steps read consistently. The graph's `position_ids` input is kept (optimum and
onnxruntime-genai feed it) and not read: positions that are not the row's token count (packed
documents, a cache cropped in the middle) are not supported. The past and present buffers stay separate
(present = past + new, as optimum's graph), so genai_config.json keeps `past_present_share_buffer` false.
Measured in docs/benchmarks.md ("Rotary and packed q/k/v inside GroupQueryAttention"): the 60
RotaryEmbedding nodes and the q/k/v Split this saves per SmolLM2 step.

Exactness is not assumed: exporter/attention_fusion.py runs the rewritten graph against the original
on a prefill and decode steps and keeps the original when they differ.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import onnx_ir as ir
from onnx_ir.passes.common import RemoveUnusedNodesPass

from .context import MS_DOMAIN, AttrValue, Names

GQA = "GroupQueryAttention"
MASK, POSITIONS, TOKENS = "attention_mask", "position_ids", "input_ids"


@dataclass(frozen=True)
class AttentionLayer:
    """One decoder layer: the names of its projection MatMul nodes, as the layer map found them."""

    index: int  # i of past_key_values.{i}.key
    q: str
    k: str
    v: str
    o: str


@dataclass(frozen=True)
class AttentionSpec:
    """What the rewrite needs of the model: head counts, the rotary frequencies, the layers."""

    num_heads: int
    kv_num_heads: int
    head_dim: int
    inv_freq: np.ndarray  # float32 [head_dim / 2]: the model's own (rope scaling applied)
    rotary_scaling: float  # transformers' attention_scaling: cos and sin are multiplied by it
    max_positions: int  # rows of the cos/sin caches
    layers: tuple[AttentionLayer, ...]


class GroupQueryAttentionFusion(ir.passes.InPlacePass):
    """Rewrites each layer of `spec` into one GroupQueryAttention with rotary inside (module docstring)."""

    def __init__(self, spec: AttentionSpec):
        super().__init__()
        self.spec = spec

    # --- requires / ensures -------------------------------------------------------------------

    def requires(self, model: ir.Model) -> None:
        graph = model.graph
        inputs = {value.name for value in graph.inputs}
        outputs = {value.name for value in graph.outputs}
        for name in (MASK, POSITIONS, TOKENS):
            if name not in inputs:
                raise ir.passes.PreconditionError(f"the decoder has no {name} input")
        nodes = {node.name: node for node in graph}
        for layer in self.spec.layers:
            for kind in ("key", "value"):
                if f"past_key_values.{layer.index}.{kind}" not in inputs:
                    raise ir.passes.PreconditionError(f"layer {layer.index}: no past_key_values.{layer.index}.{kind}")
                if f"present.{layer.index}.{kind}" not in outputs:
                    raise ir.passes.PreconditionError(f"layer {layer.index}: no present.{layer.index}.{kind}")
            for name in (layer.q, layer.k, layer.v, layer.o):
                if nodes.get(name) is None or nodes[name].op_type != "MatMul":
                    raise ir.passes.PreconditionError(f"layer {layer.index}: {name} is not a MatMul of the graph")
            o_input = nodes[layer.o].inputs[0]
            if o_input is None or not _reaches(o_input, {_projection(nodes[layer.q])}):
                raise ir.passes.PreconditionError(f"layer {layer.index}: o_proj does not read q_proj's attention")
        if self.spec.num_heads % self.spec.kv_num_heads or 2 * len(self.spec.inv_freq) != self.spec.head_dim:
            raise ir.passes.PreconditionError("head counts or rotary frequencies do not fit the head size")

    def ensures(self, model: ir.Model) -> None:
        outputs = {value.name: value for value in model.graph.outputs}
        for layer in self.spec.layers:
            for kind in ("key", "value"):
                producer = outputs[f"present.{layer.index}.{kind}"].producer()
                if producer is None or producer.op_type != GQA:
                    raise ir.passes.PostconditionError(f"present.{layer.index}.{kind} does not come from {GQA}")
        if any(node.op_type == "Softmax" for node in model.graph):
            raise ir.passes.PostconditionError("an attention Softmax is left in the graph")

    # --- the rewrite --------------------------------------------------------------------------

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        graph, spec = model.graph, self.spec
        self.graph = graph
        self.names = Names(graph)
        self.names.taken |= {value.name for value in graph.inputs if value.name is not None}
        inputs = {value.name: value for value in graph.inputs if value.name is not None}
        outputs = {value.name: value for value in graph.outputs}
        nodes = {node.name: node for node in graph}
        shared = _Shared(self, inputs)
        for layer in spec.layers:
            q, k, v = (_projection(nodes[name]) for name in (layer.q, layer.k, layer.v))
            o_proj = nodes[layer.o]
            base = f"/model/layers.{layer.index}/self_attn"
            attention = self._node(
                GQA, [q, k, v, inputs[f"past_key_values.{layer.index}.key"],
                      inputs[f"past_key_values.{layer.index}.value"], shared.seqlens_k, shared.total_length,
                      shared.cos, shared.sin, None, shared.bias], f"{base}/{GQA}", domain=MS_DOMAIN, outputs=3,
                attributes={"num_heads": spec.num_heads, "kv_num_heads": spec.kv_num_heads, "do_rotary": 1})
            graph.insert_before(o_proj, [attention])
            o_proj.replace_input_with(0, attention.outputs[0])
            for kind, produced in (("key", attention.outputs[1]), ("value", attention.outputs[2])):
                old = outputs[f"present.{layer.index}.{kind}"]
                old.name, produced.name = None, f"present.{layer.index}.{kind}"
                produced.type, produced.shape = old.type, old.shape
                graph.outputs[graph.outputs.index(old)] = produced
        RemoveUnusedNodesPass()(model)  # the old attention, its masks and shape arithmetic
        if MS_DOMAIN not in model.opset_imports:
            model.opset_imports[MS_DOMAIN] = 1
        return ir.passes.PassResult(model, modified=True)

    def _node(self, op: str, inputs: Sequence[ir.Value | None], name: str, *, domain: str = "", outputs: int = 1,
              attributes: Mapping[str, AttrValue] | None = None) -> ir.Node:
        name = self.names.unique(name)
        attrs = [ir.convenience.convert_attribute(key, value) for key, value in sorted((attributes or {}).items())]
        outs = [ir.Value(name=self.names.unique(f"{name}_output_{i}")) for i in range(outputs)]
        return ir.Node(domain, op, list(inputs), attrs, outputs=outs, name=name)

    def _constant(self, name: str, array: np.ndarray) -> ir.Value:
        name = self.names.unique(name)
        value = ir.Value(name=name, const_value=ir.tensor(array, name=name))
        self.graph.register_initializer(value)
        return value


class _Shared:
    """The inputs every layer's GQA reads, computed once at the front of the graph."""

    def __init__(self, fusion: GroupQueryAttentionFusion, inputs: dict[str, ir.Value]):
        spec, node, constant = fusion.spec, fusion._node, fusion._constant
        base = "/model/attention_inputs"
        nodes: list[ir.Node] = []

        def add(op: str, args: Sequence[ir.Value | None], what: str, **attrs: AttrValue) -> ir.Value:
            nodes.append(node(op, args, f"{base}/{what}", attributes=attrs))
            return nodes[-1].outputs[0]

        # cos/sin [max positions, head_dim / 2] as transformers computes them (positions x inverse
        # frequencies in float32, then cos/sin); constant inputs only, folded by ORT at session start.
        positions = constant(f"{base}/positions", np.arange(spec.max_positions, dtype=np.float32)[:, None])
        inv_freq = constant(f"{base}/inv_freq", np.asarray(spec.inv_freq, np.float32)[None, :])
        angles = add("Mul", [positions, inv_freq], "angles")
        self.cos, self.sin = add("Cos", [angles], "cos_cache"), add("Sin", [angles], "sin_cache")
        if spec.rotary_scaling != 1.0:
            scaling = constant(f"{base}/rotary_scaling", np.array(spec.rotary_scaling, np.float32))
            self.cos = add("Mul", [self.cos, scaling], "cos_cache_scaled")
            self.sin = add("Mul", [self.sin, scaling], "sin_cache_scaled")
        # total_sequence_length = the mask's length; seqlens_k = that - 1 for every row (no right padding)
        mask_shape = add("Shape", [inputs[MASK]], "mask_shape")
        zero, one = constant(f"{base}/zero", np.array(0, np.int64)), constant(f"{base}/one", np.array(1, np.int64))
        length = add("Gather", [mask_shape, one], "mask_length", axis=0)
        self.total_length = add("Cast", [length], "total_sequence_length", to=ir.DataType.INT32)
        last = add("Sub", [length, one], "last_position")
        batch = add("Gather", [mask_shape, constant(f"{base}/zeros_1", np.array([0], np.int64))], "batch", axis=0)
        rows = add("Expand", [last, batch], "seqlens_k_int64")
        self.seqlens_k = add("Cast", [rows], "seqlens_k", to=ir.DataType.INT32)
        # attention_bias [batch, 1, new tokens, mask length]: 0 where the mask is 1, float32's lowest
        # where it is 0 (what transformers adds); GQA adds its own causal mask.
        keep = add("Cast", [inputs[MASK]], "mask_bool", to=ir.DataType.BOOL)
        lowest = constant(f"{base}/lowest", np.array(np.finfo(np.float32).min, np.float32))
        bias = add("Where", [keep, constant(f"{base}/zero_f", np.array(0, np.float32)), lowest], "mask_bias")
        bias = add("Unsqueeze", [bias, constant(f"{base}/axes_1_2", np.array([1, 2], np.int64))], "mask_bias_4d")
        tokens_shape = add("Shape", [inputs[TOKENS]], "tokens_shape")
        new_tokens = add("Gather", [tokens_shape, constant(f"{base}/ones_1", np.array([1], np.int64))], "new_tokens",
                         axis=0)
        length_1d = add("Unsqueeze", [length, zero], "mask_length_1d")
        shape = add("Concat", [batch, constant(f"{base}/one_1", np.array([1], np.int64)), new_tokens, length_1d],
                    "bias_shape", axis=0)
        self.bias = add("Expand", [bias, shape], "attention_bias")
        graph = fusion.graph
        if len(graph):
            graph.insert_before(graph[0], nodes)
        else:
            graph.extend(nodes)


def _projection(matmul: ir.Node) -> ir.Value:
    """A projection's output: its MatMul's, or the bias Add's that alone reads it (Qwen2's q/k/v)."""
    out = matmul.outputs[0]
    users = [node for node, _ in out.uses()]
    if len(users) == 1 and users[0].op_type == "Add" and not out.is_graph_output():
        other = [value for value in users[0].inputs if value is not out]
        if len(other) == 1 and other[0] is not None and other[0].const_value is not None:
            return users[0].outputs[0]
    return out


def _reaches(value: ir.Value, sources: set[ir.Value]) -> bool:
    """Whether `value` is computed from one of `sources` (a walk up its producers)."""
    seen: set[int] = set()
    stack = [value]
    while stack:
        current = stack.pop()
        if current in sources:
            return True
        producer = current.producer()
        if producer is None or id(producer) in seen:
            continue
        seen.add(id(producer))
        stack.extend(v for v in producer.inputs if v is not None)
    return False

