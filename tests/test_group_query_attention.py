"""A decoder's attention as GroupQueryAttention (lowering/group_query_attention.py, exporter/attention_fusion.py).

Tiny random Llama / Mistral / Qwen2 models (cptquant.tiny_families): the FP32 export rewritten generates what
torch generates, through optimum (batch 1, and a left-padded batch of 2); an export writes it and says so; a
rewrite that is not exact is caught by the proof and the original kept.
"""

from __future__ import annotations

import collections
import dataclasses
import shutil
import types

import numpy as np
import onnx_ir as ir
import pytest
import torch

from cptquant.exporter.attention_fusion import TOLERANCE, attention_spec, choose_attention, compare, fuse
from cptquant.exporter.pipeline import export_quantized, exported_layer_graph
from cptquant.model_loading import load_model, wrap_model
from cptquant.onnx_io.onnx_export import MODEL_FILE, export_onnx, load_onnx
from cptquant.plan import uniform_plan
from cptquant.testing import save_tiny_model
from cptquant.tiny_families import FAMILIES

FAMILY_NAMES = ("llama", "mistral", "qwen2")
NEW_TOKENS = 8


@pytest.fixture(scope="module", params=FAMILY_NAMES)
def fp32_export(request, tmp_path_factory):
    """(loaded model, FP32 export folder, its proto, its layer uses) of one tiny family."""
    root = tmp_path_factory.mktemp(request.param)
    loaded = load_model(str(save_tiny_model(FAMILIES[request.param].build(), root / "src", tokenizer=False)))
    export_onnx(loaded, root / "fp32")
    proto = load_onnx(root / "fp32" / MODEL_FILE)
    _, layer_map = exported_layer_graph(loaded, root / "fp32", proto)
    return loaded, root / "fp32", proto, layer_map.uses()


def _greedy_torch(model, ids: torch.Tensor, mask: torch.Tensor) -> np.ndarray:
    with torch.no_grad():
        out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=NEW_TOKENS, do_sample=False,
                             min_new_tokens=NEW_TOKENS, pad_token_id=model.config.pad_token_id)
    return out.numpy()


def test_the_rewritten_file_generates_what_torch_generates(fp32_export, tmp_path):
    from optimum.onnxruntime import ORTModelForCausalLM

    loaded, fp32_dir, proto, uses = fp32_export
    choice = choose_attention(loaded, proto, fp32_dir / MODEL_FILE, uses)
    assert choice.fused, choice.note
    assert choice.note["max_relative_difference"] <= TOLERANCE
    folder = tmp_path / "gqa"
    shutil.copytree(fp32_dir, folder)
    assert choice.spec is not None
    rewritten = fuse(proto, choice.spec)
    ops = collections.Counter(node.op_type for node in rewritten.graph)
    layers = loaded.model.config.num_hidden_layers
    assert ops["GroupQueryAttention"] == layers and ops["RotaryEmbedding"] == 0
    assert ops["Softmax"] == 0 and ops["Constant"] < 30  # the old attention and its shape arithmetic are gone
    # every residual Add + RMSNorm fused (skip_rms_norm.py); the first layer's input norm reads no Add
    assert ops["SkipSimplifiedLayerNormalization"] == 2 * layers and ops["ReduceMean"] == 1
    ir.save(rewritten, folder / MODEL_FILE)

    ort_model = ORTModelForCausalLM.from_pretrained(folder)
    rng = np.random.default_rng(1)
    vocab = loaded.model.config.vocab_size
    ids = torch.from_numpy(rng.integers(4, vocab, size=(1, 9)))  # batch 1
    mask = torch.ones_like(ids)
    got = ort_model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=NEW_TOKENS, do_sample=False,
                             min_new_tokens=NEW_TOKENS, pad_token_id=loaded.model.config.pad_token_id)
    np.testing.assert_array_equal(got.numpy(), _greedy_torch(loaded.model, ids, mask))
    ids = torch.from_numpy(rng.integers(4, vocab, size=(2, 9)))  # a left-padded batch of two
    mask = torch.ones_like(ids)
    mask[1, :4] = 0
    ids[1, :4] = loaded.model.config.pad_token_id
    got = ort_model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=NEW_TOKENS, do_sample=False,
                             min_new_tokens=NEW_TOKENS, pad_token_id=loaded.model.config.pad_token_id)
    np.testing.assert_array_equal(got.numpy(), _greedy_torch(loaded.model, ids, mask))


def test_a_rewrite_that_is_not_exact_is_caught(fp32_export, tmp_path):
    """Rotary frequencies off by 1 %: the proof measures the difference, far above the tolerance."""
    loaded, fp32_dir, proto, uses = fp32_export
    spec = attention_spec(loaded, uses)
    assert not isinstance(spec, str), spec
    wrong = dataclasses.replace(spec, inv_freq=spec.inv_freq * 1.01)
    ir.save(fuse(proto, wrong), tmp_path / "wrong.onnx")
    assert compare(fp32_dir / MODEL_FILE, tmp_path / "wrong.onnx", wrong, loaded.model.config.vocab_size) > 100 * TOLERANCE


def test_a_rewrite_that_cannot_apply_or_run_keeps_optimums_graph_and_says_why(fp32_export, tmp_path, monkeypatch):
    """The report's one line names the pass's own reason (not the pass manager's wrapping), and a proof that
    cannot run (here: ORT refusing the file) falls back instead of failing the export."""
    import cptquant.exporter.attention_fusion as fusion

    loaded, fp32_dir, proto, uses = fp32_export
    spec = attention_spec(loaded, uses)
    assert not isinstance(spec, str), spec
    extra = dataclasses.replace(spec.layers[0], index=99)
    monkeypatch.setattr(fusion, "attention_spec", lambda *_: dataclasses.replace(spec, layers=(*spec.layers, extra)))
    choice = choose_attention(loaded, proto, fp32_dir / MODEL_FILE, uses)
    assert choice.spec is None and choice.note["why"].startswith("the rewrite did not apply: layer 99: no "), choice.note
    monkeypatch.setattr(fusion, "attention_spec", lambda *_: spec)

    def refuse(*_args: object, **_kwargs: object) -> float:
        raise RuntimeError("no kernel for GroupQueryAttention\nmore detail")

    monkeypatch.setattr(fusion, "compare", refuse)
    choice = choose_attention(loaded, proto, fp32_dir / MODEL_FILE, uses, scratch=tmp_path)
    assert choice.spec is None
    assert choice.note["why"] == ("the GroupQueryAttention graph could not be run: RuntimeError: no kernel for "
                                  "GroupQueryAttention")
    assert list(tmp_path.iterdir()) == []  # its scratch copy removed


def test_an_export_writes_it_and_says_so(tmp_path):
    import onnx

    loaded = load_model(str(save_tiny_model(FAMILIES["llama"].build(), tmp_path / "src", tokenizer=False)))
    plan = lambda _l, graph: uniform_plan(graph, 8)  # noqa: E731
    fused = export_quantized(loaded, plan, tmp_path / "gqa", progress=False)
    kept = export_quantized(loaded, plan, tmp_path / "optimum", progress=False, attention="optimum")
    note = fused.report.attention
    assert note["kernel"] == "GroupQueryAttention" and note["layers"] == loaded.model.config.num_hidden_layers
    assert note["skip_rms_norms"] == 2 * loaded.model.config.num_hidden_layers
    assert kept.report.attention == {"kernel": "optimum", "why": "--attention optimum"}
    # the default qdq is written as MatMulNBits in a GroupQueryAttention file, and the report says what is written
    assert fused.report.weight_format == "nbits" and kept.report.weight_format == "qdq"
    ops = collections.Counter(n.op_type for n in onnx.load(str(fused.paths.model)).graph.node)
    layers = loaded.model.config.num_hidden_layers
    assert ops["GroupQueryAttention"] == layers and ops["SkipSimplifiedLayerNormalization"] == 2 * layers
    assert fused.report.graph_check["unfused"] == []
    assert fused.report.files["model.onnx"] < kept.report.files["model.onnx"]
    # q/k/v and gate/up read one input each: one MatMulNBits per group (fused_kernels.py), per layer 4 of 7
    kernels = fused.report.graph_check["kernels"]
    assert kernels["MatMulNBits(bits=8)"] == 4 * layers + 1  # + the LM head
    assert kept.report.graph_check["kernels"]["MatMulNBits(bits=8)"] == 7 * layers + 1
    # gate/up are split after their kernel; GQA reads the q/k/v kernel's packed output itself (no key, no value)
    assert ops["Split"] == layers and ops["RotaryEmbedding"] == 0
    attention = [n for n in onnx.load(str(fused.paths.model)).graph.node if n.op_type == "GroupQueryAttention"]
    assert all(n.input[1] == "" and n.input[2] == "" for n in attention)
    logits = [_logits(result.paths.model) for result in (fused, kept)]
    np.testing.assert_allclose(logits[0], logits[1], atol=1e-5 * max(1.0, float(np.abs(logits[1]).max())))
    # the written file (rotary inside GQA, packed q/k/v) against optimum's attention with the same 8-bit kernels:
    # a left-padded batch of two through prefill and decode steps, as the export's own proof runs the FP32 rewrite
    config = loaded.model.config
    shapes = types.SimpleNamespace(kv_num_heads=config.num_key_value_heads,
                                   head_dim=config.hidden_size // config.num_attention_heads,
                                   inv_freq=loaded.model.model.rotary_emb.inv_freq.numpy())
    assert compare(kept.paths.model, fused.paths.model, shapes, config.vocab_size) <= TOLERANCE
    # the padded row's keys are checked too (rotated by its padding): other frequencies would not match them
    wrong = types.SimpleNamespace(**{**vars(shapes), "inv_freq": shapes.inv_freq * 1.5})
    assert compare(kept.paths.model, fused.paths.model, wrong, config.vocab_size) > 100 * TOLERANCE


def test_a_norm_is_fused_only_where_the_match_is_exact(fp32_export):
    """An intermediate of one norm read elsewhere (here: a graph output) keeps that norm as it was."""
    from cptquant.exporter.lowering.skip_rms_norm import SKIP_RMS_NORM, SkipRmsNormFusion

    _, _, proto, _ = fp32_export
    model = ir.serde.deserialize_model(proto)
    sqrts = [node for node in model.graph if node.op_type == "Sqrt"]
    model.graph.outputs.append(sqrts[-1].outputs[0])  # the final norm's
    ir.passes.PassManager([SkipRmsNormFusion()])(model)
    ops = collections.Counter(node.op_type for node in model.graph)
    assert ops[SKIP_RMS_NORM] == len(sqrts) - 2 and ops["Sqrt"] == 2  # the first input norm and the final one


def _logits(path) -> np.ndarray:
    import onnxruntime as ort

    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    ids = np.arange(5, 17, dtype=np.int64)[None]
    feeds = {"input_ids": ids, "attention_mask": np.ones_like(ids), "position_ids": np.arange(12, dtype=np.int64)[None]}
    for value in session.get_inputs():
        if value.name.startswith("past_key_values."):
            feeds[value.name] = np.zeros((1, 2, 0, 16), np.float32)
    return session.run(["logits"], feeds)[0]


@pytest.mark.parametrize("name,why", [("qwen3", "not qwen3"), ("gemma2", "not gemma2")])
def test_other_architectures_keep_optimums_attention(name, why):
    loaded = wrap_model(FAMILIES[name].build())
    spec = attention_spec(loaded, {})
    assert isinstance(spec, str) and why in spec


def test_sliding_window_keeps_optimums_attention():
    import transformers

    family = FAMILIES["mistral"]
    config = transformers.MistralConfig(**{**family.config, "sliding_window": 8})
    loaded = wrap_model(transformers.MistralForCausalLM(config))
    spec = attention_spec(loaded, {})
    assert isinstance(spec, str) and "sliding-window" in spec
