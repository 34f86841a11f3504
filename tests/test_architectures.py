"""The architecture matrix: every family of cptquant/tiny_families.py exported and loaded back with optimum.

Each tiny random model (built in code, offline) goes through `cptquant.export` from memory, the folder
is loaded with optimum's ORTModelFor* for its task, and its outputs are compared with torch's. The
export itself fails if a quantized layer would not run as a low-bit kernel. `make test` runs every
family at --bits 4 and a representative few at all three settings; `pytest -m matrix` (make
test-matrix) runs the rest of the matrix: --bits 8 and --method tdmpq --target-bits 5 for all.
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest
import torch

import cptquant
from cptquant.tiny_families import (CAUSAL_LM, CLASSIFICATION, FAMILIES, FEATURES, MASKED_LM,
                                    TOKEN_CLASSIFICATION)

ORT_CLASSES = {FEATURES: "ORTModelForFeatureExtraction", CLASSIFICATION: "ORTModelForSequenceClassification",
               TOKEN_CLASSIFICATION: "ORTModelForTokenClassification", MASKED_LM: "ORTModelForMaskedLM",
               CAUSAL_LM: "ORTModelForCausalLM"}
SETTINGS = {"bits4": dict(bits=4), "bits8": dict(bits=8), "tdmpq5": dict(method="tdmpq", target_bits=5)}
# Random tiny models: 4-bit noise is large against their unstructured weights; 8 bits must be near exact.
MIN_COSINE = {"bits4": 0.9, "bits8": 0.995, "tdmpq5": 0.93}
REPRESENTATIVE = ("bert", "llama", "gpt_neox")  # an encoder, a grouped-query decoder, a fused-QKV decoder


def _cases():
    for name in FAMILIES:
        for setting in SETTINGS:
            slow = setting != "bits4" and name not in REPRESENTATIVE
            yield pytest.param(name, setting, marks=[pytest.mark.matrix] if slow else [], id=f"{name}-{setting}")


def _torch_output(model, task: str, ids: torch.Tensor, mask: torch.Tensor) -> np.ndarray:
    with torch.no_grad():
        out = model(input_ids=ids, attention_mask=mask, **({"use_cache": False} if task == CAUSAL_LM else {}))
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
    report = result.report
    quantized = [n for n, lp in result.plan.layers.items() if lp.bits < 16]
    assert quantized, "nothing was quantized"
    check = report["graph_check"]
    assert check["unfused"] == [] and sum(check["kernels"].values()) >= len(quantized), check
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
    expected = _torch_output(model, family.task, ids, mask)
    assert got.shape == expected.shape
    if got.ndim == 3:  # per token: padded positions carry no defined output
        keep = mask.numpy().astype(bool)
        got, expected = got[keep], expected[keep]
    assert _cosine(got, expected) >= MIN_COSINE[setting]


def test_readme_lists_the_tested_families():
    """The README's "tested on" list is the matrix: no family claimed that the matrix does not run."""
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    line = next(line for line in readme.splitlines() if line.startswith("Tested on"))
    listed = set(re.findall(r"`([\w-]+)`", line))
    assert listed == set(FAMILIES)


def test_every_layer_the_model_has_is_planned_or_named(tmp_path):
    """MPNet's relative-position table (32 buckets x 4 heads) fits no quantization block: it stays FP32 and the
    report says why; every other layer is in the plan."""
    model = FAMILIES["mpnet"].build()
    result = cptquant.export(model, tmp_path / "out", bits=8, verify=False)
    unquantized = result.report["layers_unquantized"]
    assert "not a multiple of the smallest quantization block" in unquantized["encoder.relative_attention_bias"]
    assert set(result.plan.layers) | set(unquantized) == {
        name for name, module in model.named_modules()
        if isinstance(module, (torch.nn.Linear, torch.nn.Embedding))}


def test_token_classification_is_verified(tmp_path):
    """Token classification end to end: the export's short verification scores per-token agreement."""
    from cptquant.testing import tiny_tokenizer

    result = cptquant.export(FAMILIES["bert-token"].build(), tmp_path / "out", tokenizer=tiny_tokenizer("bert"),
                             bits=8, calib_samples=16, seq_len=32)
    verification = result.report["verification"]
    assert "error" not in verification, verification
    quality = verification["quality"]
    assert quality["task"] == "token-classification" and quality["n_examples"] > 100
    assert quality["vs_fp32"]["agreement"] >= 0.9
