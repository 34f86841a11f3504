"""End-to-end export: real MiniLM weights, tiny OPT/GPT-2/BERT, checked with plain onnxruntime and optimum."""

from __future__ import annotations

import json

import numpy as np
import onnxruntime as ort
import pytest
import torch
from conftest import tiny_bert_classifier, tiny_gpt2, tiny_opt

from cptquant.corpus import sentences
from cptquant.exporter.graph_check import optimized_graph
from cptquant.exporter.pipeline import export_quantized
from cptquant.layer_graph import build_layer_graph, weight_in_out
from cptquant.model_loading import wrap_model
from cptquant.onnx_io.inputs import feeds_for
from cptquant.plan import Plan, uniform_plan
from cptquant.quant.quantize import fake_quantize


def mean_pool(hidden: np.ndarray, mask: np.ndarray) -> np.ndarray:
    mask = mask[..., None].astype(np.float32)
    return (hidden * mask).sum(axis=1) / mask.sum(axis=1)


def cosine_rows(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return (a * b).sum(-1) / (np.linalg.norm(a, axis=-1) * np.linalg.norm(b, axis=-1))


@pytest.fixture(scope="module")
def minilm_int8(minilm, tmp_path_factory):
    out = tmp_path_factory.mktemp("minilm") / "out" / "model.onnx"
    result = export_quantized(minilm, lambda loaded, graph: uniform_plan(graph, 8), out, progress=False)
    return result


def test_minilm_uniform_int8_keeps_embeddings(minilm, minilm_int8):
    texts = sentences()[:64]
    batch = minilm.tokenizer(texts, padding=True, truncation=True, max_length=64, return_tensors="np")
    with torch.no_grad():
        ref = minilm.model(**{k: torch.from_numpy(v) for k, v in batch.items()}).last_hidden_state.numpy()
    session = ort.InferenceSession(str(minilm_int8.paths.model), providers=["CPUExecutionProvider"])
    got = session.run(None, feeds_for(session, batch["input_ids"], batch["attention_mask"]))[0]
    cos = cosine_rows(mean_pool(got, batch["attention_mask"]), mean_pool(ref, batch["attention_mask"]))
    assert len(cos) >= 50
    assert cos.min() >= 0.999, f"mean-pooled cosine min {cos.min():.5f}"


def test_minilm_report_matches_files_on_disk(minilm_int8):
    folder = minilm_int8.paths.folder
    report = json.loads(minilm_int8.paths.report.read_text())
    on_disk = {p.name: p.stat().st_size for p in folder.iterdir() if p.is_file()}
    assert report["files"] == on_disk
    assert report["total_bytes"] == sum(on_disk.values())
    # The word-embedding table (half of MiniLM) is quantized too: 8 bits is well under half of FP16.
    assert report["layers"]["embeddings.word_embeddings"]["kernels"] == ["GatherBlockQuantized"]
    assert report["ratio_vs_fp16"] > 1.6
    assert report["layers_not_in_onnx"] == ["pooler.dense"]
    plan = Plan.load(minilm_int8.paths.plan)
    assert set(plan.layers) == set(report["layers"])


def _mixed_plan(loaded, graph) -> Plan:
    """4, 8 and 16 bits in turn; the tied embedding and LM head get the same bits (one torch parameter)."""
    plan = uniform_plan(graph, 8)
    cycle = (4, 8, 16)
    for i, layer in enumerate(x for x in graph.layers if x.block is not None):
        plan.layers[layer.name].bits = cycle[i % 3]
    plan.layers["lm_head"].bits = plan.layers["model.decoder.embed_tokens"].bits = 4
    return plan


@pytest.fixture(scope="module")
def opt_mixed(tmp_path_factory):
    loaded = wrap_model(tiny_opt())
    out = tmp_path_factory.mktemp("opt") / "model.onnx"
    return loaded, export_quantized(loaded, _mixed_plan, out, progress=False)


def test_opt_mixed_plan_runs_as_low_bit_kernels(opt_mixed):
    _, result = opt_mixed
    ops = [(n.op_type, next((a.i for a in n.attribute if a.name == "bits"), None))
           for n in optimized_graph(result.paths.model).graph.node]
    assert ("MatMulNBits", 4) in ops and ("MatMulNBits", 8) in ops
    assert ("GatherBlockQuantized", 4) in ops
    assert not any(op == "DequantizeLinear" for op, _ in ops)
    assert result.report.graph_check["unfused"] == []
    bits = {name: entry["bits"] for name, entry in result.report.to_dict()["layers"].items()}
    assert bits["lm_head"] == 4 and sorted(set(bits.values())) == [4, 8, 16]


def _fake_quantized_copy(loaded, plan: Plan):
    import copy

    model = copy.deepcopy(loaded.model)
    graph = build_layer_graph(model)
    with torch.no_grad():
        for layer in graph.layers:
            lp = plan.layers[layer.name]
            if layer.tied_to:
                continue  # shares the parameter already quantized under its owner's name (same bits here)
            w = weight_in_out(model, layer).numpy()
            q = torch.from_numpy(fake_quantize(w, lp.bits, lp.block_size, lp.symmetric))
            module = model.get_submodule(layer.name)
            module.weight.copy_(q if layer.role == "conv1d" else q.t())
    return model


def test_opt_generation_through_optimum_matches_torch(opt_mixed):
    from optimum.onnxruntime import ORTModelForCausalLM

    loaded, result = opt_mixed
    ort_model = ORTModelForCausalLM.from_pretrained(result.paths.folder, use_cache=True)
    ids = torch.tensor([[2, 17, 99, 312, 45, 8, 600, 21]])
    generated = ort_model.generate(ids, max_new_tokens=6, do_sample=False, min_new_tokens=6)
    assert generated.shape == (1, 14)

    reference = _fake_quantized_copy(loaded, result.plan)
    with torch.no_grad():
        expected = reference(input_ids=ids).logits.numpy()
        fp32 = loaded.model(input_ids=ids).logits.numpy()
    got = ort_model(input_ids=ids, attention_mask=torch.ones_like(ids)).logits.detach().numpy()
    # Against torch running the same quantized weights, the gap is the kernel's int8 activation rounding:
    # much smaller than the quantization error itself (the gap to FP32).
    kernel_gap = np.abs(got - expected).max()
    quant_error = np.abs(fp32 - expected).max()
    assert kernel_gap < 0.5 * quant_error, (kernel_gap, quant_error)
    assert cosine_rows(got.reshape(-1, got.shape[-1]), expected.reshape(-1, got.shape[-1])).min() > 0.99


@pytest.mark.parametrize("build", [tiny_gpt2, tiny_bert_classifier], ids=["gpt2", "bert-cls"])
def test_other_architectures_export_at_4_bits(build, tmp_path):
    loaded = wrap_model(build())
    result = export_quantized(loaded, lambda _l, g: uniform_plan(g, 4), tmp_path / "model.onnx", progress=False)
    assert result.report.graph_check["unfused"] == []
    assert result.report.parity_vs_torch_fp32["mean_cosine"] > 0.9
    kernels = result.report.graph_check["kernels"]
    assert kernels.get("MatMulNBits(bits=4)", 0) >= 8 and kernels.get("GatherBlockQuantized(bits=4)", 0) >= 1


def test_gpt2_conv1d_layers_are_mapped_with_their_transposed_layout(tmp_path):
    loaded = wrap_model(tiny_gpt2())
    result = export_quantized(loaded, lambda _l, g: uniform_plan(g, 8), tmp_path / "m.onnx", progress=False)
    layers = result.report.to_dict()["layers"]
    assert layers["transformer.h.0.attn.c_attn"]["bytes_fp32"] == 64 * 192 * 4
    assert layers["transformer.h.0.mlp.c_proj"]["kernels"] == ["MatMulNBits"]


def test_parity_gives_torch_the_token_types_the_onnx_file_is_fed(tmp_path):
    """XLM adds embedding row token_type_ids to every token, so zeros (what feeds_for and optimum give the file)
    are not the same as none: parity compared the two and read 0.81 on an exact FP32 export."""
    from cptquant.exporter.parity import measure_parity
    from cptquant.onnx_io.onnx_export import export_onnx
    from cptquant.tiny_families import build

    loaded = wrap_model(build("xlm"), task="feature-extraction", name="tiny-xlm")
    parity = measure_parity(loaded, export_onnx(loaded, tmp_path / "fp32"))
    assert parity.min_cosine > 0.99999, parity
