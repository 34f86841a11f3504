"""The loaders people deploy with read an export folder as it is written (no extra files, no renaming).

sentence-transformers (backend="onnx") and the transformers / optimum pipelines over an ORT model must give
what plain onnxruntime gives on the same folder. ORTModelForCausalLM.generate and onnxruntime-genai are
covered in test_export.py and test_genai_config.py.
"""

from __future__ import annotations

import numpy as np
import onnxruntime as ort
import pytest

import cptquant
from cptquant.testing import tiny_bert, tiny_tokenizer

TEXTS = ["hello world", "a longer sentence about the quantization of transformer models", "short"]


def _export(folder, task: str):
    cptquant.export(tiny_bert(task=task), folder, tokenizer=tiny_tokenizer("bert"), bits=4, verify=False,
                    calib_samples=16, seq_len=32)
    return folder


def _plain_ort(folder, texts):
    tokenizer = tiny_tokenizer("bert")
    session = ort.InferenceSession(str(folder / "model.onnx"), providers=["CPUExecutionProvider"])
    encoded = tokenizer(texts, padding=True, return_tensors="np")
    feeds = {arg.name: encoded[arg.name].astype(np.int64) for arg in session.get_inputs()}
    return session.run(None, feeds)[0], encoded["attention_mask"]


@pytest.fixture(scope="module")
def encoder_folder(tmp_path_factory):
    return _export(tmp_path_factory.mktemp("loaders") / "encoder", "feature-extraction")


@pytest.fixture(scope="module")
def classifier_folder(tmp_path_factory):
    return _export(tmp_path_factory.mktemp("loaders") / "classifier", "text-classification")


def test_sentence_transformers_onnx_backend(encoder_folder):
    from sentence_transformers import SentenceTransformer

    model = SentenceTransformer(str(encoder_folder), backend="onnx", device="cpu")
    embeddings = model.encode(TEXTS)
    hidden, mask = _plain_ort(encoder_folder, TEXTS)
    weights = mask[..., None].astype(np.float64)
    pooled = (hidden * weights).sum(axis=1) / weights.sum(axis=1)  # the mean pooling ST adds by default
    np.testing.assert_allclose(embeddings, pooled, atol=1e-5)
    named = SentenceTransformer(str(encoder_folder), backend="onnx", device="cpu",
                                model_kwargs={"file_name": "model.onnx"})  # the documented explicit form
    np.testing.assert_allclose(named.encode(TEXTS), embeddings, atol=1e-6)


def _softmax(logits: np.ndarray) -> np.ndarray:
    shifted = np.exp(logits - logits.max(-1, keepdims=True))
    return shifted / shifted.sum(-1, keepdims=True)


def test_classification_pipelines(classifier_folder):
    from optimum.onnxruntime import ORTModelForSequenceClassification
    from optimum.pipelines import pipeline as optimum_pipeline
    from transformers import AutoTokenizer, pipeline

    logits, _ = _plain_ort(classifier_folder, TEXTS)
    expected = _softmax(logits.astype(np.float64)).max(-1)
    model = ORTModelForSequenceClassification.from_pretrained(classifier_folder)
    with_transformers = pipeline("text-classification", model=model,
                                 tokenizer=AutoTokenizer.from_pretrained(classifier_folder))(TEXTS)
    with_optimum = optimum_pipeline("text-classification", model=str(classifier_folder), accelerator="ort")(TEXTS)
    for got in (with_transformers, with_optimum):
        assert [row["label"] for row in got] == [f"LABEL_{i}" for i in logits.argmax(-1)]
        np.testing.assert_allclose([row["score"] for row in got], expected, atol=1e-5)
