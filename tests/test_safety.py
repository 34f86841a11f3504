"""Hostile folders: `cptq verify` never runs code, prompts or downloads because of what a folder says."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import one_line_error
from typer.testing import CliRunner

from cptquant.cli import app
from cptquant.exporter.pipeline import export_quantized
from cptquant.model_loading import load_model
from cptquant.onnx_io.baselines import baseline_dir
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
    line = one_line_error(_verify(out), "names custom code")
    assert f"--source {evil} --trust-remote-code" in line
    assert not marker.exists()
    # --source on the command line without --trust-remote-code: still refused, still nothing imported
    one_line_error(_verify(out, "--source", evil), "never runs unless the command line says --trust-remote-code")
    assert not marker.exists()


def test_a_hub_id_in_the_report_needs_source_on_the_command_line(bert_export, tmp_path):
    out = _copy(bert_export, tmp_path / "out")
    _edit_report(out, source="someone/some-model", trust_remote_code=True)
    line = one_line_error(_verify(out), "give --source MODEL")
    assert "'someone/some-model'" in line and "never downloads" in line


def test_verify_source_rebuilds_the_baselines_from_the_command_line(bert_export, tmp_path):
    out = _copy(bert_export, tmp_path / "out")
    report = _edit_report(out, source="someone/some-model")
    real_source = json.loads((bert_export / "model.report.json").read_text())["source"]
    assert report["source"] != real_source
    result = _verify(out, "--source", real_source)
    assert result.exit_code == 0, result.output
    assert (baseline_dir(out) / "fp16" / "model.onnx").is_file()


def test_paths_that_look_like_console_markup_are_printed_as_text(bert_export, tmp_path):
    """`[/x]` in a path closed no markup tag: rich raised MarkupError, a traceback and exit 1 after the export
    had been written (its summary table), and in verify's "rebuilding the baselines from …" line."""
    real_source = Path(json.loads((bert_export / "model.report.json").read_text())["source"])
    source = shutil.copytree(real_source, tmp_path / "src[/x]")
    out = tmp_path / "out[/y]"
    result = runner.invoke(app, ["export", str(source), "--bits", "8", "--algorithm", "rtn", "--no-verify",
                                 "--no-progress", "-o", str(out)])
    assert result.exit_code == 0 and "Traceback" not in result.output, result.output
    assert "[/y]" in result.stdout
    result = runner.invoke(app, ["analyze", str(source), "--method", "cmpq", "--calib-samples", "8", "--seq-len", "32",
                                 "--no-progress", "-o", str(tmp_path / "scores[/z]")])
    assert result.exit_code == 0 and "[/z]" in result.stdout, result.output
    shutil.rmtree(baseline_dir(out))
    result = runner.invoke(app, ["verify", str(out), "--quick", "--ep", "cpu", "--min-cosine", "0",
                                 "--min-speedup", "0", "--source", str(source)])  # with progress: the line shows
    assert result.exit_code == 0, result.output
    assert f"rebuilding the FP32/FP16 baselines from {source}" in " ".join(result.stderr.split())


def test_the_reports_local_folder_is_still_followed_when_it_runs_no_code(bert_export, tmp_path):
    out = _copy(bert_export, tmp_path / "out")
    result = _verify(out)
    assert result.exit_code == 0, result.output
    assert (baseline_dir(out) / "fp32" / "model.onnx").is_file()


# ---------------------------------------------------------------- case 2: custom code in the verified folder


def _with_custom_tokenizer(folder: Path, marker: Path) -> Path:
    """A tokenizer_config.json naming a custom tokenizer class whose file leaves `marker` on import."""
    (folder / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "EvilTokenizer",
        "auto_map": {"AutoTokenizer": ["tokenization_evil.EvilTokenizer", None]}}))
    (folder / "tokenization_evil.py").write_text(
        f"open({str(marker)!r}, 'w').write('ran')\n"
        "from transformers import PreTrainedTokenizerFast\nclass EvilTokenizer(PreTrainedTokenizerFast):\n    pass\n")
    return folder


def test_custom_tokenizer_code_on_a_terminal_is_one_line_exit_2_and_no_prompt(bert_export, tmp_path):
    """On a terminal transformers would ask "run the custom code? [y/N]": cptq verify must refuse first."""
    import pty

    marker = tmp_path / "code-ran"
    out = _with_custom_tokenizer(_copy(bert_export, tmp_path / "out"), marker)
    shutil.copytree(baseline_dir(bert_export), baseline_dir(out))
    primary, secondary = pty.openpty()
    try:
        proc = subprocess.run([str(Path(sys.executable).with_name("cptq")), "verify", str(out), "--quick",
                               "--no-progress", "--ep", "cpu"], stdin=secondary, capture_output=True, text=True,
                              timeout=120, env=dict(os.environ, HF_HUB_OFFLINE="1"))
    finally:
        os.close(primary)
        os.close(secondary)
    assert proc.returncode == 2, (proc.returncode, proc.stdout, proc.stderr)
    assert proc.stderr.strip().splitlines() == [
        f"error: {out}: tokenizer_config.json names custom code (tokenization_evil.EvilTokenizer), which cptquant "
        "never runs unless the command line says --trust-remote-code"]
    assert "[y/N]" not in proc.stdout + proc.stderr and "Traceback" not in proc.stderr
    assert not marker.exists()


def test_custom_model_code_in_the_verified_folders_config_is_refused(bert_export, tmp_path):
    marker = tmp_path / "code-ran"
    out = _copy(bert_export, tmp_path / "out")
    evil = _evil_model_folder(tmp_path, marker)
    for name in ("config.json", "configuration_evil.py", "modeling_evil.py"):
        shutil.copy(evil / name, out / name)
    one_line_error(_verify(out), "config.json names custom code (configuration_evil.EvilConfig, modeling_evil.EvilModel)")
    assert not marker.exists()


def test_the_text_encoder_never_prompts_for_tokenizer_code(tmp_path):
    from cptquant.errors import CptqError
    from cptquant.runtimes.quality import TextEncoder
    from cptquant.testing import tiny_bert

    marker = tmp_path / "code-ran"
    folder = _with_custom_tokenizer(tmp_path, marker)
    with pytest.raises(CptqError, match="names custom code"):
        TextEncoder(folder, tiny_bert().config)
    assert not marker.exists()


# ---------------------------------------------------------------- the verified folder's links are not followed


def test_verify_never_writes_through_links_the_verified_folder_holds(bert_export, tmp_path):
    """A folder's verify/report.json linking to a file of the user's (~/.bashrc, say) had verify overwrite that
    file with its JSON; a verify/ linking to another folder had it write there."""
    victim = tmp_path / "victim.txt"
    victim.write_text("the user's own file")
    out = _copy(bert_export, tmp_path / "out")
    shutil.copytree(baseline_dir(bert_export), baseline_dir(out))
    (out / "verify").mkdir()
    (out / "verify" / "report.json").symlink_to(victim)
    result = _verify(out)
    assert result.exit_code == 0, result.output
    assert victim.read_text() == "the user's own file"
    report = out / "verify" / "report.json"
    assert not report.is_symlink() and json.loads(report.read_text())["eps"]
    umask = os.umask(0)
    os.umask(umask)
    assert report.stat().st_mode & 0o777 == 0o666 & ~umask  # readable like any file the user writes
    shutil.rmtree(out / "verify")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (out / "verify").symlink_to(elsewhere, target_is_directory=True)
    one_line_error(_verify(out), f"{out / 'verify'} is a link; cptq verify writes its reports into the folder itself")
    assert list(elsewhere.iterdir()) == []
