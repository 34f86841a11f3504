"""The architecture matrix: every family of cptquant/tiny_families.py exported and loaded back with optimum.

Each tiny random model (built in code, offline) goes through `cptquant.export` from memory, the folder
is loaded with optimum's ORTModelFor* for its task, and its outputs are compared with torch's. The
export itself fails if a quantized layer would not run as a low-bit kernel. `make test` runs every
family at --bits 4 and a representative few at all three settings; `pytest -m matrix` (make
test-matrix) runs the rest of the matrix: --bits 8 and --method tdmpq --target-bits 5 for all.
Encoder-decoder families (T5, BART) are loaded with ORTModelForSeq2SeqLM and greedy-decode torch's tokens.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import torch
from test_report_schemas import _errors

import cptquant
from cptquant.tiny_families import (
    CAUSAL_LM,
    CLASSIFICATION,
    EXTENDED,
    FAMILIES,
    FEATURES,
    MASKED_LM,
    SEQ2SEQ,
    TOKEN_CLASSIFICATION,
)

ORT_CLASSES = {FEATURES: "ORTModelForFeatureExtraction", CLASSIFICATION: "ORTModelForSequenceClassification",
               TOKEN_CLASSIFICATION: "ORTModelForTokenClassification", MASKED_LM: "ORTModelForMaskedLM",
               CAUSAL_LM: "ORTModelForCausalLM"}
SETTINGS = {"bits4": dict(bits=4), "bits8": dict(bits=8), "tdmpq5": dict(method="tdmpq", target_bits=5)}
# Random tiny models: 4-bit noise is large against their unstructured weights; 8 bits must be near exact.
MIN_COSINE = {"bits4": 0.9, "bits8": 0.995, "tdmpq5": 0.93}
REPRESENTATIVE = ("bert", "llama", "gpt_neox", "t5")  # an encoder, a grouped-query decoder, a fused-QKV decoder,
# an encoder-decoder


def _cases():
    for name in (name for name, family in FAMILIES.items() if family.task != SEQ2SEQ):
        for setting in SETTINGS:
            slow = name in EXTENDED or (setting != "bits4" and name not in REPRESENTATIVE)
            yield pytest.param(name, setting, marks=[pytest.mark.matrix] if slow else [], id=f"{name}-{setting}")


def _torch_output(model, task: str, ids: torch.Tensor, mask: torch.Tensor, token_types: bool) -> np.ndarray:
    """`token_types`: the ONNX file takes token_type_ids, which optimum's ORTModel fills with zeros; torch gets
    the same zeros (XLM adds their embedding row; GPT-2 accepts the input too, but its file does not take it)."""
    kwargs = {"use_cache": False} if task == CAUSAL_LM else {}
    if token_types:
        kwargs["token_type_ids"] = torch.zeros_like(ids)
    with torch.no_grad():
        out = model(input_ids=ids, attention_mask=mask, **kwargs)
    return (out.last_hidden_state if task == FEATURES else out.logits).float().numpy()


def _cosine(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a.ravel().astype(np.float64), b.ravel().astype(np.float64)
    return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))


@pytest.mark.parametrize("name,setting", list(_cases()))
def test_family_exports_and_loads_in_optimum(name, setting, tmp_path):
    import optimum.onnxruntime

    family = FAMILIES[name]
    model = family.build()
    result = cptquant.export(model, tmp_path / "out", task=family.task, verify=False, calib_samples=16, seq_len=32,
                             **SETTINGS[setting])
    report = result.report.to_dict()
    quantized = [n for n, lp in result.plan.layers.items() if lp.bits < 16]
    assert quantized, "nothing was quantized"
    check = report["graph_check"]
    # every quantized layer reaches its low-bit kernel(s); a decoder's q/k/v and gate/up may share one (fused)
    assert check["unfused"] == [] and sum(check["expected_kernels"].values()) >= len(quantized), check
    assert set(report["layers_unquantized"]) >= set(report["layers_not_in_onnx"])
    if setting == "tdmpq5":
        assert report["average_bits"] <= 5.0 + 1e-6

    ort_model = getattr(optimum.onnxruntime, ORT_CLASSES[family.task]).from_pretrained(result.paths.folder)
    rng = np.random.default_rng(0)
    ids = torch.from_numpy(rng.integers(4, family.config.get("vocab_size", 1000), size=(2, 12)))
    mask = torch.ones_like(ids)
    mask[1, 9:] = 0  # a padded row: masks must reach the kernels the same way
    got = ort_model(input_ids=ids, attention_mask=mask)
    got = (got.last_hidden_state if family.task == FEATURES else got.logits)
    got = got.numpy() if isinstance(got, torch.Tensor) else np.asarray(got)
    file_inputs = {arg.name for arg in ort.InferenceSession(str(result.paths.model)).get_inputs()}
    expected = _torch_output(model, family.task, ids, mask, "token_type_ids" in file_inputs)
    assert got.shape == expected.shape
    if got.ndim == 3:  # per token: padded positions carry no defined output
        keep = mask.numpy().astype(bool)
        got, expected = got[keep], expected[keep]
    assert _cosine(got, expected) >= MIN_COSINE[setting]


def test_readme_lists_the_tested_families():
    """The README's "tested on" list is the matrix: no family claimed that the matrix does not run."""
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    line = next(line for line in readme.splitlines() if line.startswith("Tested on"))
    default_tier, matrix_only = line.split("`make test-matrix` only")
    assert set(re.findall(r"`([\w-]+)`", default_tier)) == set(FAMILIES) - EXTENDED
    assert set(re.findall(r"`([\w-]+)`", matrix_only)) == EXTENDED


def test_every_layer_the_model_has_is_planned_or_named(tmp_path):
    """MPNet's relative-position table (32 buckets x 4 heads) fits no quantization block: it stays FP32 and the
    report says why; every other layer is in the plan."""
    model = FAMILIES["mpnet"].build()
    result = cptquant.export(model, tmp_path / "out", bits=8, verify=False)
    unquantized = result.report.layers_unquantized
    assert "not a multiple of the smallest quantization block" in unquantized["encoder.relative_attention_bias"]
    assert set(result.plan.layers) | set(unquantized) == {
        name for name, module in model.named_modules()
        if isinstance(module, (torch.nn.Linear, torch.nn.Embedding))}


def test_token_classification_is_verified(tmp_path):
    """Token classification end to end: the export's short verification scores per-token agreement."""
    from cptquant.testing import tiny_tokenizer

    result = cptquant.export(FAMILIES["bert-token"].build(), tmp_path / "out", tokenizer=tiny_tokenizer("bert"),
                             bits=8, calib_samples=16, seq_len=32)
    verification = result.report.verification
    assert "error" not in verification, verification
    quality = verification["quality"]
    assert quality["task"] == "token-classification" and quality["n_examples"] > 100
    assert quality["vs_fp32"]["agreement"] >= 0.9


SEQ2SEQ_FILES = ("encoder_model.onnx", "decoder_model.onnx", "decoder_with_past_model.onnx")
# Layers in more than one file, and the kernels each file runs them with (one per use): a decoder layer is in
# both decoders; the shared table in every file (T5), or through the encoder's and decoder's token embeddings.
_BART_DECODER = {"model.decoder.layers.0.self_attn.q_proj": 2, "lm_head": 2, "model.decoder.layers.0.encoder_attn.k_proj": 1}
_BART_TABLES = {"model.encoder.embed_tokens": 1, "model.decoder.embed_tokens": 2}
SEQ2SEQ_COPIES = {"t5": {"decoder.block.0.layer.0.SelfAttention.q": 2, "shared": 3, "lm_head": 2,
                         "decoder.block.0.layer.1.EncDecAttention.k": 1},
                  "bart": {**_BART_DECODER, **_BART_TABLES}, "m2m_100": {**_BART_DECODER, **_BART_TABLES},
                  "mbart": {**_BART_DECODER, **_BART_TABLES},
                  # one token table, model.shared, read by the encoder and both decoders
                  **{name: {**_BART_DECODER, "model.shared": 3} for name in ("marian", "pegasus", "blenderbot-small")}}


def _seq2seq_cases():
    for name in (name for name, family in FAMILIES.items() if family.task == SEQ2SEQ):
        for setting in SETTINGS:
            slow = name in EXTENDED or (setting != "bits4" and name not in REPRESENTATIVE)
            yield pytest.param(name, setting, marks=[pytest.mark.matrix] if slow else [], id=f"{name}-{setting}")


@pytest.mark.parametrize("name,setting", list(_seq2seq_cases()))
def test_encoder_decoder_generates_like_torch(name, setting, tmp_path):
    """T5 and BART: one plan over the encoder, decoder and decoder-with-past files, every quantized layer a
    low-bit kernel in each file that holds it; optimum's ORTModelForSeq2SeqLM greedy-decodes torch's tokens."""
    from optimum.onnxruntime import ORTModelForSeq2SeqLM

    family = FAMILIES[name]
    model = family.build()
    result = cptquant.export(model, tmp_path / "out", task=family.task, verify=False, calib_samples=16, seq_len=32,
                             **SETTINGS[setting])
    report = result.report.to_dict()
    assert set(SEQ2SEQ_FILES) <= set(report["files"]) and "model.onnx" not in report["files"]
    assert report["model_files"] == list(SEQ2SEQ_FILES)  # what model_bytes counts: every file's own copies
    assert report["model_bytes"] == sum(report["files"][f] for f in SEQ2SEQ_FILES)
    assert _errors("export-report.schema.json", report) == []
    check = report["graph_check"]
    quantized = [n for n, lp in result.plan.layers.items() if lp.bits < 16]
    assert quantized and check["unfused"] == []
    for layer, copies in SEQ2SEQ_COPIES[name].items():
        if result.plan.layers[layer].bits < 16:
            assert len(report["layers"][layer]["kernels"]) == copies, (layer, report["layers"][layer])
    if setting == "tdmpq5":
        assert report["average_bits"] <= 5.0 + 1e-6
    assert report["parity_vs_torch_fp32"]["min_cosine"] >= MIN_COSINE[setting]

    ort_model = ORTModelForSeq2SeqLM.from_pretrained(result.paths.folder)
    ids = torch.from_numpy(np.random.default_rng(0).integers(4, family.config["vocab_size"], size=(2, 10)))
    mask = torch.ones_like(ids)
    mask[1, 7:] = 0
    greedy = dict(max_new_tokens=6, min_new_tokens=6, do_sample=False, num_beams=1, output_scores=True,
                  return_dict_in_generate=True)  # min_new_tokens: a random model may end on its first step
    with torch.no_grad():
        expected = model.generate(input_ids=ids, attention_mask=mask, **greedy)
    got = ort_model.generate(input_ids=ids, attention_mask=mask, **greedy)
    assert torch.equal(got.sequences, expected.sequences)
    # Compared where torch scores a token: min_new_tokens sets the end token to -inf, BART's forced end token
    # every other token at the last step (a step with one candidate left has nothing to compare).
    finite = [torch.isfinite(e) for e in expected.scores]
    scores = [_cosine(g[f].numpy(), e[f].numpy())
              for g, e, f in zip(got.scores, expected.scores, finite) if int(f.sum()) > f.shape[0]]
    assert scores
    assert min(scores) >= MIN_COSINE[setting], scores  # the with-past decoder's steps too


def test_encoder_decoder_folder_through_the_command(tmp_path):
    """A saved T5 folder through cptq-export (its task detected from the config, --format auto keeping qdq, the
    short verification measured on its three files), then `cptq verify` on the folder: teacher-forced quality and
    generation agreement against FP32 and FP16, the encoder pass and the decode step timed, the report valid;
    with the baseline cache gone, verify rebuilds it from the local source folder."""
    import shutil

    from typer.testing import CliRunner

    from cptquant.cli import app, export_app
    from cptquant.onnx_io.baselines import baseline_dir

    folder = tmp_path / "tiny-t5"
    FAMILIES["t5"].build().save_pretrained(folder)
    runner = CliRunner()
    out = tmp_path / "out"
    result = runner.invoke(export_app, [str(folder), "--bits", "8", "-o", str(out), "--no-progress"])
    assert result.exit_code == 0, result.output
    report = json.loads((out / "model.report.json").read_text())
    assert report["task"] == SEQ2SEQ and report["format_choice"]["format"] == "qdq"
    assert set(SEQ2SEQ_FILES) <= {p.name for p in out.iterdir()}
    short = report["verification"]
    assert "error" not in short, short
    assert short["quality"]["task"] == SEQ2SEQ and short["quality"]["vs_fp32"]["top1_agreement"] >= 0.95
    assert short["speed"]["variants"]["quantized"]["bytes_on_disk"] == report["model_bytes"]
    assert _errors("export-report.schema.json", report) == []
    shutil.rmtree(baseline_dir(out))  # verify rebuilds the FP32/FP16 files from the report's local source
    verified = runner.invoke(app, ["verify", str(out), "--quick", "--min-speedup", "0", "--no-progress"])
    assert verified.exit_code == 0, verified.output
    assert "PASS [cpu] perplexity increase vs fp32" in verified.stdout
    written = json.loads((out / "verify" / "report.json").read_text())
    assert _errors("verify-report.schema.json", written) == []
    cpu = written["eps"]["cpu"]
    vs = cpu["quality"]["vs_fp32"]
    assert vs["kl_divergence"] < 0.01 and vs["top1_agreement"] >= 0.95 and vs["generation_exact_match"] >= 0.5
    assert {"encoder_b1_s16", "encoder_b1_s128", "decode_per_token"} <= set(cpu["speed"]["vs_fp32"]["latency_speedup"])
    assert written["variants"]["quantized"] == str(out.resolve())
    strict = runner.invoke(app, ["verify", str(out), "--quick", "--min-speedup", "0", "--max-ppl-increase", "0",
                                 "--max-kl", "0", "--no-progress"])
    assert strict.exit_code == 1 and "FAIL [cpu] mean KL divergence from fp32" in strict.stdout, strict.output
