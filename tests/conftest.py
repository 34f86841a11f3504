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

# Tiers (`make test-unit` runs the first in seconds; `make test` runs both). A unit test builds no ONNX export
# and runs no CLI command: the quantizer maths, GPTQ, the lowering passes on a tiny graph, the import graph.
UNIT_FILES = {"test_import_graph.py", "test_options.py", "test_quantize.py", "test_gptq.py", "test_lowering.py", "test_rule.py",
              "test_tied_uses.py", "test_cpu_flags.py"}
NOT_UNIT = {  # slow tests in those files (seconds each): a CLI export, Hessians of a whole tiny model
    "test_rule.py::test_cli_exports_the_rule_and_refuses_a_budget_with_it",
    "test_gptq.py::test_hessians_are_symmetric_psd_for_every_linear_and_skip_embeddings",
}


def pytest_ignore_collect(collection_path, config):
    """With `-m unit`, do not even import the other test files (their imports alone take most of a minute)."""
    if config.getoption("markexpr") == "unit" and collection_path.name.startswith("test_"):
        return collection_path.suffix == ".py" and collection_path.name not in UNIT_FILES
    return None


def pytest_collection_modifyitems(items):
    for item in items:
        file_and_name = f"{item.path.name}::{item.originalname}"
        unit = item.path.name in UNIT_FILES and file_and_name not in NOT_UNIT
        item.add_marker(pytest.mark.unit if unit else pytest.mark.integration)


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
