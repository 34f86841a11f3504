"""Parity of the exported model against torch: the check built into every export."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch

from ..corpus import sentences
from ..model_loading import TASK_CAUSAL_LM, LoadedModel
from ..onnx_io.inputs import feeds_for
from ..seq2seq_inputs import shifted_right


@dataclass
class Parity:
    n_inputs: int
    max_abs_diff: float
    mean_cosine: float
    min_cosine: float

    def to_dict(self) -> dict[str, float | int]:
        return {"n_inputs": self.n_inputs, "max_abs_diff": self.max_abs_diff, "mean_cosine": self.mean_cosine,
                "min_cosine": self.min_cosine}


def sample_inputs(loaded: LoadedModel, n: int = 4, max_length: int = 32, seed: int = 0) -> list[np.ndarray]:
    """A few [1, length] token-id arrays: real sentences when there is a tokenizer, random ids otherwise."""
    if loaded.tokenizer is not None:
        texts = sentences()[:n]
        return [np.asarray(loaded.tokenizer(t, truncation=True, max_length=max_length)["input_ids"])[None, :]
                for t in texts]
    rng = np.random.default_rng(seed)
    vocab = loaded.config.vocab_size
    return [rng.integers(0, vocab, size=(1, 8 + 5 * i)) for i in range(n)]


def torch_outputs(loaded: LoadedModel, input_ids: np.ndarray, token_types: bool = False) -> np.ndarray:
    """The torch model's logits (or hidden states) for `input_ids`; with `token_types`, given the zero
    token_type_ids the ONNX file is fed (feeds_for, and optimum's ORTModel when a tokenizer gives none):
    the same as none for BERT, not for XLM and FlauBERT, which then add embedding row 0 to every token."""
    with torch.no_grad():
        ids = torch.from_numpy(input_ids.astype(np.int64))
        kwargs: dict[str, object] = {"use_cache": False} if loaded.task == TASK_CAUSAL_LM else {}
        if token_types:
            kwargs["token_type_ids"] = torch.zeros_like(ids)
        out = loaded.model(input_ids=ids, attention_mask=torch.ones_like(ids), **kwargs)
    first: torch.Tensor = out.logits if hasattr(out, "logits") else out.last_hidden_state
    return first.float().numpy()


def _cosine(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a.ravel().astype(np.float64), b.ravel().astype(np.float64)
    return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b) + 1e-30))


def measure_parity(loaded: LoadedModel, model_path: Path, n: int = 4) -> Parity:
    session = ort.InferenceSession(str(model_path), providers=["CPUExecutionProvider"])
    diffs, cosines = [], []
    token_types = any(arg.name == "token_type_ids" for arg in session.get_inputs())
    for ids in sample_inputs(loaded, n):
        expected = torch_outputs(loaded, ids, token_types)
        got = session.run(None, feeds_for(session, ids))[0]
        diffs.append(float(np.abs(got - expected).max()))
        cosines.append(_cosine(got, expected))
    return Parity(len(diffs), max(diffs), float(np.mean(cosines)), min(cosines))


def seq2seq_torch_logits(loaded: LoadedModel, input_ids: np.ndarray, decoder_ids: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        ids = torch.from_numpy(input_ids.astype(np.int64))
        out = loaded.model(input_ids=ids, attention_mask=torch.ones_like(ids),
                           decoder_input_ids=torch.from_numpy(decoder_ids.astype(np.int64)), use_cache=False)
    logits: torch.Tensor = out.logits
    return logits.float().numpy()


def measure_seq2seq_parity(loaded: LoadedModel, folder: Path, n: int = 4) -> Parity:
    """An encoder-decoder export's logits against torch's: the encoder file, then the decoder file (no past)
    decoding the input shifted right. The with-past decoder holds the same weights, lowered alike; the
    architecture matrix checks it through generate (tests/test_architectures.py)."""
    encoder = ort.InferenceSession(str(folder / "encoder_model.onnx"), providers=["CPUExecutionProvider"])
    decoder = ort.InferenceSession(str(folder / "decoder_model.onnx"), providers=["CPUExecutionProvider"])
    diffs, cosines = [], []
    for ids in sample_inputs(loaded, n):
        ids = ids.astype(np.int64)
        decoder_ids = shifted_right(loaded.model, torch.from_numpy(ids)).numpy()
        mask = np.ones_like(ids)
        hidden = encoder.run(None, {"input_ids": ids, "attention_mask": mask})[0]
        got = decoder.run(["logits"], {"input_ids": decoder_ids, "encoder_attention_mask": mask,
                                       "encoder_hidden_states": hidden})[0]
        expected = seq2seq_torch_logits(loaded, ids, decoder_ids)
        diffs.append(float(np.abs(got - expected).max()))
        cosines.append(_cosine(got, expected))
    return Parity(len(diffs), max(diffs), float(np.mean(cosines)), min(cosines))
