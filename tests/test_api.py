"""The Python API (cptquant.export / analyze / verify) and --override PATTERN=BITS."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from conftest import one_line_error
from typer.testing import CliRunner

import cptquant
from cptquant.cli import export_app
from cptquant.errors import CptqError
from cptquant.testing import tiny_llama, tiny_opt

runner = CliRunner()
FAST = dict(calib_samples=16, seq_len=32)


def test_readme_api_example_runs_as_written(tmp_path, monkeypatch, capsys):
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    section = readme.split("## Python API", 1)[1]
    code = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    monkeypatch.chdir(tmp_path)
    exec(compile(code, "README.md", "exec"), {})
    printed = capsys.readouterr().out
    assert "x smaller than FP16" in printed and "'classifier': 8" in printed
    assert (tmp_path / "api-demo" / "model.onnx").is_file()
    assert (tmp_path / "api-demo" / "model.plan.json").is_file()


@pytest.fixture(scope="module")
def opt_folder(tmp_path_factory):
    from cptquant.testing import save_tiny_model

    return save_tiny_model(tiny_opt(), tmp_path_factory.mktemp("models") / "tiny-opt")


def test_cli_is_the_api(opt_folder, tmp_path):
    """The same options through the CLI and the API give the byte-identical plan."""
    result = cptquant.export(opt_folder, tmp_path / "api", bits=4, overrides=["fc2=8"], verify=False, **FAST)
    assert result.paths.model == tmp_path / "api" / "model.onnx" and result.paths.model.is_file()
    assert result.report.task == "text-generation-with-past"
    cli = runner.invoke(export_app, [str(opt_folder), "--bits", "4", "--override", "fc2=8", "--no-verify",
                                     "--calib-samples", "16", "--seq-len", "32", "--no-progress",
                                     "-o", str(tmp_path / "cli")])
    assert cli.exit_code == 0, cli.output
    assert (tmp_path / "cli" / "model.plan.json").read_text() == result.plan.to_json()


def test_api_bad_input_raises_before_loading(tmp_path, monkeypatch):
    def refuse(*_args, **_kwargs):
        raise AssertionError("the model was loaded before the options were checked")

    monkeypatch.setattr("cptquant.model_loading.load_model", refuse)
    for kwargs, fragment in ((dict(bits=5), "--bits 5 is not supported"),
                             (dict(bits=4, overrides=["lm_head=3"]), "bits '3' not supported"),
                             (dict(bits=4, overrides=["(=8"]), "not a regular expression"),
                             (dict(bits=4, overrides=["lm_head"]), "is not PATTERN=BITS"),
                             (dict(method="nope"), "unknown method")):
        with pytest.raises(CptqError, match=re.escape(fragment)):
            cptquant.export("some/model", tmp_path / "out", **kwargs)
    assert not (tmp_path / "out").exists()


def test_override_pins_a_tied_head_with_its_embedding(tmp_path):
    """OPT's LM head shares the embedding's tensor: pinning the head pins both; the last match wins."""
    result = cptquant.export(tiny_opt(), tmp_path / "out", bits=4, verify=False,
                             overrides=["lm_head=8", r"layers\.1\..*=16", r"layers\.1\.fc1=8"], **FAST)
    bits = {name: lp.bits for name, lp in result.plan.layers.items()}
    assert bits["lm_head"] == bits["model.decoder.embed_tokens"] == 8
    assert bits["model.decoder.layers.1.fc1"] == 8 and bits["model.decoder.layers.1.fc2"] == 16
    assert bits["model.decoder.layers.0.fc1"] == 4
    assert result.report.layers["model.decoder.layers.1.fc2"].bits == 16
    assert result.plan.meta["overrides"]["lm_head"] == 8


@pytest.mark.parametrize("granularity", ["layer", "block"])
def test_override_is_counted_in_the_budget(tmp_path, granularity):
    """Pinned layers' cost comes out of --target-bits: the plan still meets it, with the pins as given. At block
    granularity a block's unpinned layers share one width, its pinned ones keep theirs."""
    pins = [".*down_proj=8", "lm_head=8"]
    result = cptquant.export(tiny_llama(), tmp_path / "out", method="tdmpq", target_bits=6, overrides=pins,
                             granularity=granularity, verify=False, **FAST)
    bits = {name: lp.bits for name, lp in result.plan.layers.items()}
    assert all(b == 8 for name, b in bits.items() if name.endswith("down_proj") or name == "lm_head")
    assert result.report.average_bits <= 6.0 + 1e-9
    assert 4 in bits.values()  # the rest paid for the pins
    if granularity == "block":
        for block in {name.split(".mlp.")[0].split(".self_attn.")[0] for name in bits if ".layers." in name}:
            widths = {b for name, b in bits.items() if name.startswith(block + ".") and not name.endswith("down_proj")}
            assert len(widths) == 1, (block, widths)


def test_override_budget_arithmetic():
    """What the pins leave to the other layers: bits per weight, or megabytes as the exporter writes them."""
    from cptquant.layer_graph import build_layer_graph
    from cptquant.options import AnalysisOptions
    from cptquant.overrides import budget_without_pinned, parse_overrides, pinned_bits

    graph = build_layer_graph(tiny_llama())
    total = sum(layer.num_params for layer in graph.layers)
    pinned = pinned_bits(parse_overrides(["lm_head=8"]), graph)
    assert pinned == {"lm_head": 8}  # untied: the embedding stays free
    head = graph["lm_head"].num_params
    sub_graph, options = budget_without_pinned(graph, pinned, AnalysisOptions.from_fields(target_bits=6), {})
    assert "lm_head" not in sub_graph and len(sub_graph.layers) == len(graph.layers) - 1
    assert options.allocation.target_bits == pytest.approx((6 * total - 8 * head) / (total - head))
    _, sized = budget_without_pinned(graph, pinned, AnalysisOptions.from_fields(max_size_mb=1.0), {})
    assert 1.0 - sized.allocation.max_size_mb == pytest.approx(head / 1e6, rel=0.1)  # 8 bits + scales ≈ 1 byte per weight
    with pytest.raises(CptqError, match="the --override pins leave .* below 4"):
        budget_without_pinned(graph, {name: 16 for name in graph.names()[:-3]}, AnalysisOptions.from_fields(target_bits=5), {})
    tied = build_layer_graph(tiny_llama(tied=True))  # the head reads the embedding: one tensor, counted once
    both = pinned_bits(parse_overrides(["lm_head=8"]), tied)
    assert both == {"lm_head": 8, "model.embed_tokens": 8}
    table = tied["model.embed_tokens"].num_params
    stored = sum(layer.num_params for layer in tied.layers if not layer.tied_to)
    _, left = budget_without_pinned(tied, both, AnalysisOptions.from_fields(target_bits=6), {})
    assert left.allocation.target_bits == pytest.approx((6 * stored - 8 * table) / (stored - table))
    with pytest.raises(CptqError, match="pins every layer"):
        budget_without_pinned(graph, pinned_bits(parse_overrides([".*=16"]), graph), AnalysisOptions.from_fields(target_bits=5), {})


def test_override_cli_errors(opt_folder, tmp_path):
    def run(*args):
        return runner.invoke(export_app, [str(opt_folder), "--bits", "4", "--no-verify", "--no-progress",
                                          "-o", str(tmp_path / "out"), *args])

    one_line_error(run("--override", "fc1=5"), "--override 'fc1=5': bits '5' not supported (use 16, 8 or 4)")
    one_line_error(run("--override", "[=8"), "--override '[=8': not a regular expression")
    line = one_line_error(run("--override", "down_proj=8"), "--override 'down_proj=8' matches no layer")
    assert "model.decoder.embed_tokens" in line
    assert not (tmp_path / "out").exists()


def test_analyze_returns_scores_and_plans():
    analysis = cptquant.analyze(tiny_opt(), methods=["tdmpq"], target_bits=6, **FAST)
    plan = analysis.plans["tdmpq"]
    assert set(plan.layers) == set(analysis.graph.names())
    assert set(analysis.result.scores["tdmpq"]) <= set(plan.layers)
    assert plan.meta["average_bits"] <= 6


def test_verify_gives_checks(tmp_path):
    from cptquant.testing import save_tiny_model

    folder = save_tiny_model(tiny_opt(), tmp_path / "model")
    cptquant.export(folder, tmp_path / "out", bits=8, verify=False, **FAST)
    result = cptquant.verify(tmp_path / "out", quick=True, min_speedup=0.0, max_ppl_increase=0.5)
    names = [check.line() for check in result.checks]
    assert any("perplexity increase vs fp32" in line for line in names), names
    assert result.passed, names
    json.dumps(result.report.to_dict())  # plain data, as `cptq verify` writes it
