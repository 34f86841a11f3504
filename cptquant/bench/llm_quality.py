"""Quality of the SmolLM2 variants on ~16k tokens of other-domain text (`corpus.other_domain_paragraphs()`,
never the calibration docstrings): sliding windows as in runtimes/quality.py, all variants window by
window; perplexity, mean KL(FP32 || variant) of the next-token distribution, top-1 agreement with FP32."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import onnxruntime as ort

from ..onnx_io.inputs import feeds_for
from ..runtimes.base import RuntimeAdapter
from ..runtimes.cpu import CpuAdapter
from ..runtimes.quality import _log_softmax, kl_divergence, window_spans
from .llm_types import FP32, LlmVariant, Quality, first_line


def _feeds(session: ort.InferenceSession, chunk: np.ndarray, head_size: int) -> dict[str, np.ndarray]:
    """feeds_for, plus the head size of an empty KV cache whose last dimension is symbolic (the GenAI
    builder's graph names it `kv_cache_dim`; optimum's states 64)."""
    feeds = feeds_for(session, chunk)
    for name, value in feeds.items():
        if name.startswith("past_key_values") and value.ndim == 4 and value.shape[3] == 0:
            feeds[name] = np.zeros((*value.shape[:3], head_size), dtype=value.dtype)
    return feeds


def score_against_reference(adapter: RuntimeAdapter, sessions: dict[str, ort.InferenceSession], reference: str,
                            ids: np.ndarray, window: int, stride: int, head_size: int,
                            log: Callable[[str], object] = print) -> dict[str, Quality]:
    """Every session on the same windows, one window at a time (full next-token distributions of all
    tokens do not fit in memory): perplexity, mean KL(reference || variant), top-1 agreement with the
    reference, for every variant."""
    nll: dict[str, list[np.ndarray]] = {name: [] for name in sessions}
    kl: dict[str, list[np.ndarray]] = {name: [] for name in sessions}
    agree: dict[str, list[np.ndarray]] = {name: [] for name in sessions}
    spans = window_spans(len(ids), window, stride)
    order = [reference] + [name for name in sessions if name != reference]
    for i, (begin, end, first) in enumerate(spans):
        chunk = ids[begin:end][None, :]
        targets = ids[first:end]
        ref_logp = None
        for name in order:
            logits = adapter.run(sessions[name], _feeds(sessions[name], chunk, head_size))["logits"][0]
            logp = _log_softmax(logits[first - 1 - begin : end - 1 - begin])  # logits at j-1 predict token j
            nll[name].append(-logp[np.arange(len(targets)), targets])
            if ref_logp is None:
                ref_logp = logp
            kl[name].append(kl_divergence(ref_logp, logp))
            agree[name].append(logp.argmax(axis=-1) == ref_logp.argmax(axis=-1))
        if (i + 1) % 16 == 0 or i + 1 == len(spans):
            log(f"  quality: window {i + 1}/{len(spans)}")
    ref_ppl = float(np.exp(np.concatenate(nll[reference]).mean()))
    out: dict[str, Quality] = {}
    for name in sessions:
        ppl = float(np.exp(np.concatenate(nll[name]).mean()))
        out[name] = {"perplexity": ppl, "ppl_increase": ppl / ref_ppl - 1.0,
                     "kl_divergence": float(np.concatenate(kl[name]).mean()),
                     "top1_agreement": float(np.concatenate(agree[name]).mean()),
                     "tokens": int(sum(len(x) for x in nll[name]))}
    return out


def score_variants(variants: list[LlmVariant], ids: np.ndarray, window: int, stride: int, head_size: int,
                   log: Callable[[str], object]) -> dict[str, Quality]:
    """Each variant against FP32 (which must be among them). A variant ORT cannot run is not fatal: it
    gets its `error` and no figures."""
    adapter = CpuAdapter(threads=2)
    sessions = {}
    for v in variants:
        try:  # loaded and run once on a few tokens: a model ORT cannot run is reported, not fatal
            session = adapter.session(v.path)
            adapter.run(session, _feeds(session, ids[None, :8], head_size))
            sessions[v.name] = session
        except Exception as exc:
            v.error = f"ORT cannot run it: {first_line(exc)}"
    return score_against_reference(adapter, sessions, FP32, ids, window, stride, head_size, log)
