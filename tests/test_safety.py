"""Hostile folders: `cptq verify` never runs code, prompts or downloads because of what a folder says."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from cptquant.cli import app
from cptquant.exporter.baselines import baseline_dir
from cptquant.exporter.pipeline import export_quantized
from cptquant.model_loading import load_model
from cptquant.plan import uniform_plan

runner = CliRunner()


@pytest.fixture(scope="module")
def bert_export(tmp_path_factory) -> Path:
    """A tiny BERT exported at 8 bits from a saved folder (so the report's source is a real folder)."""
    from cptquant.testing import tiny_bert

    root = tmp_path_factory.mktemp("safety")
    source = root / "tiny-bert"
    tiny_bert().save_pretrained(source)
    out = root / "bert8"
    export_quantized(load_model(str(source)), lambda _l, graph: uniform_plan(graph, 8), out / "model.onnx",
                     progress=False)
    return out


def _copy(folder: Path, dst: Path) -> Path:
    shutil.copytree(folder, dst)
    return dst


def _verify(*args) -> object:
    return runner.invoke(app, ["verify", *map(str, args), "--quick", "--no-progress", "--ep", "cpu",
                               "--min-cosine", "0", "--min-speedup", "0"])


def _one_line_error(result, fragment: str) -> str:
    assert result.exit_code == 2, (result.exit_code, result.output)
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: ") and fragment in lines[0], result.stderr
    return lines[0]


def _evil_model_folder(root: Path, marker: Path) -> Path:
    """A BERT folder whose config names custom configuration and modeling code that leaves `marker` on import."""
    from cptquant.testing import tiny_bert

    folder = root / "evil-model"
    tiny_bert().save_pretrained(folder)
    config = json.loads((folder / "config.json").read_text())
    config["auto_map"] = {"AutoConfig": "configuration_evil.EvilConfig", "AutoModel": "modeling_evil.EvilModel"}
    (folder / "config.json").write_text(json.dumps(config))
    payload = f"open({str(marker)!r}, 'w').write('ran')\n"
    (folder / "configuration_evil.py").write_text(
        payload + "from transformers import BertConfig\nclass EvilConfig(BertConfig):\n    model_type = 'bert'\n")
    (folder / "modeling_evil.py").write_text(
        payload + "from transformers import BertModel\nclass EvilModel(BertModel):\n    pass\n")
    return folder


def _edit_report(folder: Path, **changes) -> dict:
    path = folder / "model.report.json"
    report = json.loads(path.read_text())
    report.update(changes)
    path.write_text(json.dumps(report))
    return report


# ---------------------------------------------------------------- case 1: the report never turns code on


def test_an_edited_report_never_makes_verify_import_the_sources_code(bert_export, tmp_path):
    marker = tmp_path / "code-ran"
    evil = _evil_model_folder(tmp_path, marker)
    out = _copy(bert_export, tmp_path / "out")  # no baseline cache here: verify must rebuild it
    _edit_report(out, source=str(evil), trust_remote_code=True)
    line = _one_line_error(_verify(out), "names custom code")
    assert f"--source {evil} --trust-remote-code" in line
    assert not marker.exists()
    # --source on the command line without --trust-remote-code: still refused, still nothing imported
    _one_line_error(_verify(out, "--source", evil), "never runs unless the command line says --trust-remote-code")
    assert not marker.exists()


def test_a_hub_id_in_the_report_needs_source_on_the_command_line(bert_export, tmp_path):
    out = _copy(bert_export, tmp_path / "out")
    _edit_report(out, source="someone/some-model", trust_remote_code=True)
    line = _one_line_error(_verify(out), "give --source MODEL")
    assert "'someone/some-model'" in line and "never downloads" in line


def test_verify_source_rebuilds_the_baselines_from_the_command_line(bert_export, tmp_path):
    out = _copy(bert_export, tmp_path / "out")
    report = _edit_report(out, source="someone/some-model")
    real_source = json.loads((bert_export / "model.report.json").read_text())["source"]
    assert report["source"] != real_source
    result = _verify(out, "--source", real_source)
    assert result.exit_code == 0, result.output
    assert (baseline_dir(out) / "fp16" / "model.onnx").is_file()


def test_the_reports_local_folder_is_still_followed_when_it_runs_no_code(bert_export, tmp_path):
    out = _copy(bert_export, tmp_path / "out")
    result = _verify(out)
    assert result.exit_code == 0, result.output
    assert (baseline_dir(out) / "fp32" / "model.onnx").is_file()
