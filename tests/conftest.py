"""Shared fixtures: tiny models built from configs in code, and the embedded MiniLM."""

from __future__ import annotations

import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
torch.set_num_threads(2)


from cptquant.testing import tiny_gpt2, tiny_opt  # noqa: E402,F401  (re-exported for the test modules)


def tiny_bert_classifier():
    from cptquant.testing import tiny_bert

    return tiny_bert(task="text-classification")


@pytest.fixture(scope="session")
def minilm():
    from cptquant.model_loading import load_model

    return load_model(None)


def one_line_error(result, fragment: str) -> str:
    """A CLI result that is the house's bad-input answer: exit 2 and one line "error: …" holding `fragment`."""
    assert result.exit_code == 2, (result.exit_code, result.output)
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: ") and fragment in lines[0], result.stderr
    return lines[0]
