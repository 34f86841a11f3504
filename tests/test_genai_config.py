"""A causal-LM export also runs under onnxruntime-genai (exporter/genai_config.py)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from cptquant.exporter.genai_config import GENAI_CONFIG, build_genai_config
from cptquant.exporter.pipeline import export_quantized
from cptquant.model_loading import load_model
from cptquant.plan import uniform_plan
from cptquant.testing import save_tiny_model, tiny_bert, tiny_llama

NEW_TOKENS = 12


@pytest.fixture(scope="module")
def llama_export(tmp_path_factory):
    root = tmp_path_factory.mktemp("genai")
    llama = load_model(str(save_tiny_model(tiny_llama(), root / "llama")))
    result = export_quantized(llama, lambda _l, graph: uniform_plan(graph, 8), root / "out", progress=False)
    return result


def test_a_decoder_export_writes_the_genai_config_from_its_graph(llama_export):
    folder = llama_export.paths.folder
    written = json.loads((folder / GENAI_CONFIG).read_text())
    config = json.loads((folder / "config.json").read_text())
    decoder = written["model"]["decoder"]
    assert written["model"]["type"] == "llama"
    assert decoder["filename"] == "model.onnx"
    assert decoder["num_hidden_layers"] == config["num_hidden_layers"]
    assert decoder["num_key_value_heads"] == config["num_key_value_heads"]
    assert decoder["head_size"] == config["hidden_size"] // config["num_attention_heads"]
    assert decoder["inputs"] == {"input_ids": "input_ids", "attention_mask": "attention_mask",
                                 "position_ids": "position_ids", "past_key_names": "past_key_values.%d.key",
                                 "past_value_names": "past_key_values.%d.value"}
    assert written["model"]["eos_token_id"] == config["eos_token_id"]
    assert written["search"]["past_present_share_buffer"] is False  # optimum's KV cache grows by concatenation
    assert llama_export.report.genai_config == GENAI_CONFIG
    assert GENAI_CONFIG in llama_export.report.files


def test_an_encoder_export_has_no_genai_config(tmp_path):
    bert = load_model(str(save_tiny_model(tiny_bert(), tmp_path / "bert")))
    result = export_quantized(bert, lambda _l, graph: uniform_plan(graph, 8), tmp_path / "out", progress=False)
    assert not (result.paths.folder / GENAI_CONFIG).exists()
    assert "genai_config" not in result.report.to_dict()


def test_a_graph_without_a_kv_cache_is_refused(tmp_path):
    import onnx
    from onnx import TensorProto, helper

    x = helper.make_tensor_value_info("input_ids", TensorProto.INT64, [1, 4])
    y = helper.make_tensor_value_info("logits", TensorProto.INT64, [1, 4])
    onnx.save(helper.make_model(helper.make_graph([helper.make_node("Identity", ["input_ids"], ["logits"])], "g",
                                                  [x], [y])), tmp_path / "model.onnx")
    with pytest.raises(ValueError, match="not a decoder with a KV cache"):
        build_genai_config(tmp_path / "model.onnx", {"num_attention_heads": 4, "hidden_size": 64, "vocab_size": 10})


def test_a_gpt2_export_reads_gpt2s_config_names(tmp_path):
    from cptquant.testing import tiny_gpt2

    gpt2 = load_model(str(save_tiny_model(tiny_gpt2(), tmp_path / "gpt2")))
    result = export_quantized(gpt2, lambda _l, graph: uniform_plan(graph, 8), tmp_path / "out", progress=False)
    config = json.loads((result.paths.folder / "config.json").read_text())
    decoder = json.loads((result.paths.folder / GENAI_CONFIG).read_text())["model"]["decoder"]
    assert (decoder["num_attention_heads"], decoder["hidden_size"]) == (config["n_head"], config["n_embd"])
    assert decoder["head_size"] == config["n_embd"] // config["n_head"]


def test_genai_generates_the_tokens_optimum_generates(llama_export):
    og = pytest.importorskip("onnxruntime_genai", reason="onnxruntime-genai is not installed (pip install "
                                                         "onnxruntime-genai)")
    from optimum.onnxruntime import ORTModelForCausalLM

    folder = llama_export.paths.folder
    prompt = [1, 5, 9, 42, 7]
    expected = ORTModelForCausalLM.from_pretrained(folder).generate(
        torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
        max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS, do_sample=False)[0, len(prompt):].tolist()

    model = og.Model(str(folder))
    params = og.GeneratorParams(model)
    params.set_search_options(max_length=len(prompt) + NEW_TOKENS, min_length=len(prompt) + NEW_TOKENS,
                              do_sample=False)
    generator = og.Generator(model, params)
    generator.append_tokens(np.asarray(prompt, dtype=np.int32))
    generated = []
    while not generator.is_done():
        generator.generate_next_token()
        generated.append(int(generator.get_next_tokens()[0]))
    assert len(set(expected)) > 2, expected  # a real sequence, not one token repeated
    assert generated == expected
