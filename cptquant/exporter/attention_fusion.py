"""Whether a causal LM's attention is written as GroupQueryAttention, proved on the export itself.

`choose_attention` decides it for one export: the architecture must be one where the rewrite
(lowering/group_query_attention.py) computes what transformers computes — Llama, Mistral or Qwen2
style (standard rotary on the whole head, inverse frequencies fixed at load time, no sliding window,
no q/k norm; a q/k/v bias is followed) — and then the rewritten FP32 graph must give the original's
logits, under ONNX Runtime on CPU, on a left-padded batch of two: the prefill and a few decode steps, each
step reading the cache the step before wrote; and the original's presents, but for the keys of the
left-padded row (stored rotated for positions counted from the batch's left edge: the lowering's docstring).
Otherwise the export keeps optimum's attention, and the report says why in one line.
"""

from __future__ import annotations

import re
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort

from ..errors import first_line
from ..model_loading import TASK_CAUSAL_LM, LoadedModel
from ..quant.storage import FORMAT_NBITS, FORMAT_QDQ
from .layer_map import WeightUse
from .lowering import attention_passes
from .lowering.group_query_attention import GQA, AttentionLayer, AttentionSpec
from .lowering.skip_rms_norm import SKIP_RMS_NORM

ATTENTION_GQA, ATTENTION_OPTIMUM = "gqa", "optimum"
ATTENTION_CHOICES = (ATTENTION_GQA, ATTENTION_OPTIMUM)
MODEL_TYPES = ("llama", "mistral", "qwen2")
# transformers' rope types whose inverse frequencies do not change with the sequence length
STATIC_ROPE = ("default", "linear", "llama3", "yarn")
# |rewritten - original| / max(1, max |original|), on logits of real tokens and on presents: float32 sums in
# another order differ by ~1e-6 of the scale; a wrong mask or rotary by whole units.
TOLERANCE = 1e-4
_LAYER = re.compile(r"^(?:.*\.)?layers\.(\d+)\.self_attn\.([qkvo])_proj$")


@dataclass
class AttentionChoice:
    spec: AttentionSpec | None  # None: optimum's attention is kept
    note: dict[str, Any]  # for the report: the kernel, layers and measured difference, or why not
    # bytes the rewrite adds to the file (negative: it drops optimum's ~2,700 shape Constants), so that a
    # size budget is priced on the graph that is written, not on optimum's
    graph_bytes_change: int = 0

    @property
    def fused(self) -> bool:
        return self.spec is not None

    def weight_format(self, fmt: str) -> str:
        """The format the file's layers are written in: a rewritten file needs com.microsoft ops anyway, so
        its qdq layers are written as the MatMulNBits ORT would fuse them into (and the report says so)."""
        return FORMAT_NBITS if self.fused and fmt == FORMAT_QDQ else fmt


def kept(why: str) -> AttentionChoice:
    return AttentionChoice(None, {"kernel": "optimum", "why": why})


def attention_for_export(choice: str, loaded: LoadedModel, model: onnx.ModelProto, model_path: Path,
                         uses: Mapping[str, Sequence[WeightUse]], base_dir: Path | None = None,
                         scratch: Path | None = None) -> AttentionChoice:
    """`--attention`: gqa tries the rewrite (choose_attention); optimum keeps optimum's graph."""
    if choice == ATTENTION_OPTIMUM:
        return kept("--attention optimum")
    return choose_attention(loaded, model, model_path, uses, base_dir, scratch)


def attention_spec(loaded: LoadedModel, uses: Mapping[str, Sequence[WeightUse]]) -> AttentionSpec | str:
    """The rewrite's spec for this model, or why the rewrite does not apply (one line)."""
    config = loaded.model.config
    model_type = getattr(config, "model_type", None)
    if loaded.task != TASK_CAUSAL_LM or model_type not in MODEL_TYPES:
        return f"GroupQueryAttention is written for {', '.join(MODEL_TYPES)} decoders, not {model_type}"
    if getattr(config, "sliding_window", None) and (model_type != "qwen2" or getattr(config, "use_sliding_window", False)):
        return "sliding-window attention is not rewritten"
    rotary = getattr(getattr(loaded.model, "model", None), "rotary_emb", None)
    rope_type = getattr(rotary, "rope_type", None)
    if rotary is None or not hasattr(rotary, "inv_freq") or rope_type not in STATIC_ROPE:
        return f"rotary embedding of type {rope_type} (GroupQueryAttention needs fixed frequencies)"
    heads = int(config.num_attention_heads)
    kv_heads = int(getattr(config, "num_key_value_heads", None) or heads)
    head_dim = int(getattr(config, "head_dim", None) or config.hidden_size // heads)
    inv_freq = rotary.inv_freq.detach().float().cpu().numpy()
    if 2 * inv_freq.size != head_dim or getattr(config, "partial_rotary_factor", 1.0) != 1.0:
        return "partial rotary embedding is not rewritten"
    nodes: dict[int, dict[str, str]] = {}
    for layer, layer_uses in uses.items():
        match = _LAYER.match(layer)
        matmuls = [use.node for use in layer_uses if use.op_type == "MatMul"]
        if match and len(matmuls) == 1:
            nodes.setdefault(int(match.group(1)), {})[match.group(2)] = matmuls[0]
    layers = config.num_hidden_layers
    if sorted(nodes) != list(range(layers)) or any(len(found) != 4 for found in nodes.values()):
        return "the layer map did not find every layer's q/k/v/o projection MatMul"
    return AttentionSpec(heads, kv_heads, head_dim, inv_freq, float(getattr(rotary, "attention_scaling", 1.0)),
                         int(config.max_position_embeddings),
                         tuple(AttentionLayer(i, n["q"], n["k"], n["v"], n["o"]) for i, n in sorted(nodes.items())))


def fuse(model: onnx.ModelProto, spec: AttentionSpec, base_dir: Path | None = None) -> ir.Model:
    """The rewritten model (onnx-ir; `model` is left as it was): the lowering's attention passes, the same
    ones the written file gets."""
    ir_model = ir.serde.deserialize_model(model)
    if base_dir is not None:
        ir.external_data.set_base_dir(ir_model.graph, base_dir)
    ir.passes.PassManager(attention_passes(spec))(ir_model)
    return ir_model


def choose_attention(loaded: LoadedModel, model: onnx.ModelProto, model_path: Path,
                     uses: Mapping[str, Sequence[WeightUse]], base_dir: Path | None = None,
                     scratch: Path | None = None) -> AttentionChoice:
    """Rewrite the FP32 export `model` (saved at `model_path`) and prove the rewrite against it."""
    spec = attention_spec(loaded, uses)
    if isinstance(spec, str):
        return kept(spec)
    try:
        rewritten = fuse(model, spec, base_dir)
    except ir.passes.PassError as exc:
        cause: BaseException = exc
        while cause.__cause__ is not None:  # the pass manager wraps the pass's own error twice
            cause = cause.__cause__
        return kept(f"the rewrite did not apply: {first_line(cause, 'no message')}")
    fused_norms = sum(node.op_type == SKIP_RMS_NORM for node in rewritten.graph)
    change = graph_bytes_change(model, rewritten)
    try:
        with tempfile.TemporaryDirectory(dir=scratch) as folder:
            path = Path(folder) / "attention.onnx"
            ir.save(rewritten, path, external_data="attention.onnx.data")
            del rewritten
            difference = compare(model_path, path, spec, int(loaded.model.config.vocab_size))
    except Exception as exc:  # an ORT that cannot run it, memory: the export goes on with optimum's graph
        return kept(f"the GroupQueryAttention graph could not be run: {type(exc).__name__}: {first_line(exc, 'no message')}")
    if difference > TOLERANCE:
        return kept(f"the GroupQueryAttention graph differed from optimum's by {difference:.2e} "
                    f"(relative, > {TOLERANCE:g}) on a left-padded prefill and decode steps")
    return AttentionChoice(spec, {"kernel": GQA, "layers": len(spec.layers), "skip_rms_norms": fused_norms,
                                  "max_relative_difference": difference}, change)


def graph_bytes_change(original: onnx.ModelProto, rewritten: ir.Model) -> int:
    """Serialized bytes of `rewritten`'s nodes and of the initializers only it has, minus the same of
    `original`: the weights both read are the same tensors and cancel out (without being read)."""
    before = {init.name: init for init in original.graph.initializer}
    after = {name: value.const_value for name, value in rewritten.graph.initializers.items()
             if value.const_value is not None}
    nodes = (sum(int(ir.serde.serialize_node(node).ByteSize()) for node in rewritten.graph)
             - sum(int(node.ByteSize()) for node in original.graph.node))
    added = sum(int(tensor.nbytes) for name, tensor in after.items() if name not in before)
    removed = sum(int(np.prod(init.dims)) * int(onnx.helper.tensor_dtype_to_np_dtype(init.data_type).itemsize)
                  for name, init in before.items() if name not in after)
    return nodes + added - removed


def compare(original: Path, rewritten: Path, spec: AttentionSpec, vocab: int, decode_steps: int = 3,
            seed: int = 0) -> float:
    """The largest relative difference of logits (real tokens) and presents between the two decoders, on a
    batch of two prompts (7 tokens, and 4 left-padded to 7: optimum's and transformers' padding), then
    `decode_steps` greedy steps (the original's tokens fed to both, each with its own cache). The rewrite stores
    the padded row's keys rotated for positions counted from the batch's left edge, p (its padding) positions
    later than optimum's: those are compared with optimum's keys rotated by p more, over the row's real tokens."""
    options = ort.SessionOptions()
    options.intra_op_num_threads, options.inter_op_num_threads = 2, 1
    sessions = [ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
                for path in (original, rewritten)]
    rng = np.random.default_rng(seed)
    ids = rng.integers(0, vocab, size=(2, 7)).astype(np.int64)
    mask = np.ones((2, 7), np.int64)
    unpadded, pads = slice(0, 1), 3
    mask[1, :pads] = 0
    pasts = [_empty_past(session, spec) for session in sessions]
    worst = 0.0
    for _ in range(decode_steps + 1):
        positions = np.cumsum(mask, axis=1) - 1
        positions = np.where(mask == 0, 1, positions)[:, -ids.shape[1]:]
        feeds = {"input_ids": ids, "attention_mask": mask, "position_ids": positions}
        results = []
        for session, past in zip(sessions, pasts):
            names = [o.name for o in session.get_outputs()]
            results.append(dict(zip(names, session.run(names, {**feeds, **past}))))
        expected, got = results
        real = mask[:, -ids.shape[1]:].astype(bool)
        worst = max(worst, _relative(expected["logits"][real], got["logits"][real]))
        for name in expected:
            if name.startswith("present.") and name.endswith(".key"):
                worst = max(worst, _relative(expected[name][unpadded], got[name][unpadded]))
                later = _rotated(expected[name][1:, :, pads:], pads, spec.inv_freq)
                worst = max(worst, _relative(later, got[name][1:, :, pads:]))
            elif name.startswith("present."):
                worst = max(worst, _relative(expected[name], got[name]))
        pasts = [{name.replace("present.", "past_key_values."): value for name, value in result.items()
                  if name.startswith("present.")} for result in results]
        ids = expected["logits"][:, -1].argmax(-1)[:, None].astype(np.int64)
        mask = np.concatenate([mask, np.ones((2, 1), np.int64)], axis=1)
    return worst


def _rotated(keys: np.ndarray, positions: int, inv_freq: np.ndarray) -> np.ndarray:
    """Rotary keys [..., head_dim] turned `positions` further (half-split pairs, as the model and GQA rotate):
    R(a) R(b) = R(a + b), so optimum's key at position t - p becomes the rewrite's at t (the scaling is already in)."""
    angle = positions * np.asarray(inv_freq, np.float64)
    cos, sin = np.cos(angle), np.sin(angle)
    half = keys.shape[-1] // 2
    first, second = keys[..., :half].astype(np.float64), keys[..., half:].astype(np.float64)
    return np.concatenate([first * cos - second * sin, second * cos + first * sin], axis=-1).astype(np.float32)


def _empty_past(session: ort.InferenceSession, spec: AttentionSpec) -> dict[str, np.ndarray]:
    return {i.name: np.zeros((2, spec.kv_num_heads, 0, spec.head_dim), np.float32) for i in session.get_inputs()
            if i.name.startswith("past_key_values.")}


def _relative(expected: np.ndarray, got: np.ndarray) -> float:
    if expected.shape != got.shape:
        return float("inf")
    if not np.isfinite(got).all():
        return float("inf")
    return float(np.abs(got - expected).max() / max(1.0, float(np.abs(expected).max())))
