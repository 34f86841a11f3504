"""Bad input is refused early, in one line, exit code 2: plans, calibration text, options, messages, analyze -o."""

from __future__ import annotations

import json
import os
import random
import shlex
from pathlib import Path

import pytest
from conftest import one_line_error
from typer.testing import CliRunner

from cptquant.cli import app, export_app

runner = CliRunner()


@pytest.fixture(scope="module")
def opt_folder(tmp_path_factory) -> Path:
    from cptquant.testing import tiny_opt

    folder = tmp_path_factory.mktemp("hub") / "tiny-opt"
    tiny_opt().save_pretrained(folder)
    return folder


def run_export(*args):
    return runner.invoke(export_app, [*map(str, args), "--no-progress"])


@pytest.fixture
def no_model_loading(monkeypatch):
    """Fail the test if a command gets as far as loading the model."""
    def refuse(*_args, **_kwargs):
        raise AssertionError("the model was loaded before the options were checked")

    monkeypatch.setattr("cptquant.model_loading.load_model", refuse)


# ---------------------------------------------------------------- case 7: every plan is complete


def _plan(tmp_path: Path, layers: dict) -> Path:
    path = tmp_path / "plan.json"
    path.write_text(json.dumps({"version": 1, "layers": layers}))
    return path


def test_a_plan_that_omits_layers_is_refused_naming_them(opt_folder, tmp_path):
    plan = _plan(tmp_path, {"model.decoder.layers.0.fc1": {"bits": 4}})
    line = one_line_error(run_export(opt_folder, "--plan", plan, "--no-verify", "-o", tmp_path / "out"),
                          "the plan leaves out")
    assert "leaves out 14 of the 15 layers of the model: model.decoder.embed_tokens, " in line
    assert "(+" in line and "--default-bits" in line and "model.decoder.layers.0.fc1," not in line
    assert not (tmp_path / "out").exists()
    one_line_error(run_export(opt_folder, "--plan", _plan(tmp_path, {}), "--no-verify", "-o", tmp_path / "out"),
                   "the plan leaves out all")


def test_default_bits_fills_the_omitted_layers_explicitly(opt_folder, tmp_path):
    plan = _plan(tmp_path, {"model.decoder.layers.0.fc1": {"bits": 4}})
    out = tmp_path / "with space" / "out"
    result = run_export(opt_folder, "--plan", plan, "--default-bits", "8", "--algorithm", "rtn", "-o", out)
    assert result.exit_code == 0, result.output
    written = json.loads((out / "model.plan.json").read_text())["layers"]
    report = json.loads((out / "model.report.json").read_text())
    assert written["model.decoder.layers.0.fc1"]["bits"] == 4 and len(written) == len(report["layers"]) > 2
    assert {entry["bits"] for name, entry in written.items() if name != "model.decoder.layers.0.fc1"} == {8}
    assert 4 < report["average_bits"] < 8
    # case 11: the closing hint can be pasted into a shell as it is: quoted, and on one line however long (the
    # console wrapped it at 80 columns, inside the quotes, where a pasted newline is part of the path)
    hint = f"cptq verify {shlex.quote(str(out))}"
    assert any(hint in line for line in result.stdout.splitlines()), result.stdout


@pytest.mark.parametrize("content, fragment", [
    (bytes(range(256)), "is not a cptquant plan (not UTF-8 text)"),  # once a UnicodeDecodeError traceback, exit 1
    (b'{"version": 1, "layers": {"lm_head": {"bits": 8}, "lm_head": {"bits": 4}}}', "names 'lm_head' twice"),
    (None, "is a folder, not a JSON file"),
    # once accepted and failing with a traceback after calibration, or copied into the output's plan
    (b'{"version": 1, "clip": "weird", "layers": {"lm_head": {"bits": 8}}}', "clip 'weird' is not one of"),
    (b'{"version": 1, "layers": {"lm_head": {"bits": 8, "symmetric": "yes"}}}', "symmetric must be true or false"),
    (b'{"version": 1, "layers": {"lm_head": {"bits": 8, "score": "high"}}}', "score must be a number or null"),
])
def test_a_plan_file_that_is_not_one_plan_is_refused_before_the_model_loads(opt_folder, tmp_path, no_model_loading,
                                                                              content, fragment):
    plan = tmp_path / "plan.json"
    if content is None:
        plan.mkdir()
    else:
        plan.write_bytes(content)
    one_line_error(run_export(opt_folder, "--plan", plan, "--default-bits", "8", "-o", tmp_path / "out"), fragment)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("args, fragment", [
    (["--default-bits", "5"], "--default-bits 5 is not supported"),
    (["--bits", "8", "--default-bits", "8"], "--default-bits applies to --plan only"),
])
def test_default_bits_is_checked_first(opt_folder, tmp_path, no_model_loading, args, fragment):
    plan = _plan(tmp_path, {})
    extra = [] if "--bits" in args else ["--plan", plan]
    one_line_error(run_export(opt_folder, *extra, *args, "-o", tmp_path / "out"), fragment)


# ---------------------------------------------------------------- case 9: calibration text must be text


@pytest.mark.parametrize("kind", ["random", "nul"])
def test_calibration_bytes_that_are_not_text_are_refused(opt_folder, tmp_path, no_model_loading, kind):
    calib = tmp_path / "calib.txt"
    rng = random.Random(0)
    data = bytes(rng.randrange(128, 256) if kind == "random" else rng.randrange(256) for _ in range(4096))
    calib.write_bytes(data if kind == "random" else b"plain words\n" * 100 + b"\0" + data)
    fragment = "contains NUL bytes" if kind == "nul" else "is not UTF-8 text"
    one_line_error(run_export(opt_folder, "--bits", "4", "--calib", calib, "-o", tmp_path / "out"), fragment)


def test_latin1_text_with_a_few_undecodable_characters_is_still_text(tmp_path):
    from cptquant.passes.calibration import load_texts

    calib = tmp_path / "calib.txt"
    calib.write_bytes(("a café, naïve text line\n" * 50).encode("latin-1"))
    texts, _ = load_texts(str(calib))
    assert len(texts) == 50


# ---------------------------------------------------------------- case 10: checked before anything heavy


@pytest.mark.parametrize("args, fragment", [
    (["--method", "tdmpq", "--target-bits", "1"], "--target-bits 1 is outside [4, 16]"),
    (["--method", "tdmpq", "--target-bits", "17"], "--target-bits 17 is outside [4, 16]"),
    (["--method", "tdmpq", "--target-bits", "9", "--bit-widths", "8,4"], "--target-bits 9 is outside [4, 8]"),
    (["--method", "tdmpq", "--calib", "no-such-file.txt"], "calibration file not found: no-such-file.txt"),
    (["--bits", "4", "--calib", "no-such-file.txt"], "calibration file not found: no-such-file.txt"),
    (["--method", "tdmpq", "--seq-len", "4"], "--seq-len 4 is too short"),
    (["--bits", "4", "--task", "translation"], "unknown task 'translation'"),
    # not numbers a report or plan can hold (JSON has no NaN or Infinity); once accepted and written so
    (["--bits", "8", "--format", "dynamic", "--outlier-ratio", "nan"], "above 1 (and finite), not nan"),
    (["--bits", "8", "--outlier-ratio", "inf"], "--outlier-ratio must be 0 (off) or above 1 (and finite), not inf"),
    (["--method", "tdmpq", "--max-size-mb", "inf"], "maximum size inf MB must be a positive number"),
    # a budget that a fixed plan would silently ignore (exit 0, a file over it)
    (["--bits", "16", "--max-size-mb", "0.2"], "--bits 16 fixes every layer's bits; it takes no --target-bits"),
    (["--bits", "4", "--target-bits", "5"], "--bits 4 fixes every layer's bits"),
    (["--bits", "4", "--calib", ""], "--calib is empty"),
])
def test_options_are_checked_before_the_model_loads(opt_folder, tmp_path, no_model_loading, args, fragment):
    one_line_error(run_export(opt_folder, *args, "-o", tmp_path / "out"), fragment)


def test_analyze_checks_its_options_before_the_model_loads(tmp_path, no_model_loading):
    one_line_error(runner.invoke(app, ["analyze", "--target-bits", "17", "-o", str(tmp_path / "a"), "--no-progress"]),
                   "--target-bits 17 is outside [4, 16]")
    one_line_error(runner.invoke(app, ["analyze", "--calib", str(tmp_path / "none.txt"), "-o", str(tmp_path / "a")]),
                   "calibration file not found")


# ---------------------------------------------------------------- case 11: messages that say what is wrong


def test_a_malicious_pickle_is_refused_without_suggesting_tensorflow(opt_folder, tmp_path):
    import torch

    folder = tmp_path / "evil"
    folder.mkdir()
    (folder / "config.json").write_text((opt_folder / "config.json").read_text())
    marker = tmp_path / "pwned"

    class Payload:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    torch.save(Payload(), folder / "pytorch_model.bin")
    line = one_line_error(run_export(folder, "--bits", "8", "-o", tmp_path / "out"), "pytorch_model.bin")
    assert "from_tf" not in line and "TF 2.0" not in line and "never run" in line
    assert not marker.exists() and not (tmp_path / "out").exists()


def test_a_parent_that_is_a_file_is_named_not_permission_denied(opt_folder, tmp_path, no_model_loading):
    (tmp_path / "afile").write_text("x")
    line = one_line_error(run_export(opt_folder, "--bits", "8", "-o", tmp_path / "afile" / "sub" / "m.onnx"),
                          f"{tmp_path / 'afile'} is a file, not a folder")
    assert "permission denied" not in line


# ---------------------------------------------------------------- case 12: analyze -o keeps what is there


def test_analyze_into_an_existing_folder_needs_force(tmp_path, monkeypatch):
    out = tmp_path / "analysis"
    out.mkdir()
    (out / "scores.json").write_text("my scores")
    (out / "notes.txt").write_text("mine")
    args = ["analyze", "--method", "tdmpq", "--calib-samples", "8", "--seq-len", "32", "-o", str(out), "--no-progress"]
    monkeypatch.setattr("cptquant.model_loading.load_model", lambda *_a, **_k: pytest.fail("loaded the model"))
    one_line_error(runner.invoke(app, args), f"output files already exist in {out}: scores.json (use --force")
    assert (out / "scores.json").read_text() == "my scores"
    args[args.index("-o") + 1] = str(out / "missing" / "..")  # the same folder to the writer: refused the same
    one_line_error(runner.invoke(app, args), f"output files already exist in {out}: scores.json (use --force")
    assert (out / "scores.json").read_text() == "my scores"


def test_analyze_with_force_replaces_only_its_own_files(opt_folder, tmp_path):
    out = tmp_path / "analysis"
    out.mkdir()
    for name in ("scores.json", "plan-cmpq.json", "notes.txt"):
        (out / name).write_text(f"mine: {name}")
    result = runner.invoke(app, ["analyze", str(opt_folder), "--method", "tdmpq", "--calib-samples", "8",
                                 "--seq-len", "32", "-o", str(out), "--no-progress", "--force"])
    assert result.exit_code == 0, result.output
    assert json.loads((out / "scores.json").read_text())["scores"]["tdmpq"]
    assert sorted(p.name for p in out.iterdir()) == ["notes.txt", "plan-tdmpq.json", "scores.json", "scores.png"]
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".cptq")]



def test_an_empty_output_path_or_a_work_file_name_is_refused(opt_folder, tmp_path, no_model_loading, monkeypatch):
    """`-o ''` once exported into the current folder (and a cache beside it) with exit 0; a model file named like
    cptquant's own work files would be taken for a dead run's debris by the next run."""
    monkeypatch.chdir(tmp_path)
    one_line_error(run_export(opt_folder, "--bits", "8", "-o", ""), "the output path is empty")
    one_line_error(run_export(opt_folder, "--bits", "8", "-o", tmp_path / "x" / ".cptq-tmp-1.onnx"),
                   "names starting with .cptq-tmp- are cptquant's own work files")
    assert list(tmp_path.iterdir()) == []


def test_corrupt_weights_are_one_line(opt_folder, tmp_path):
    """A truncated or corrupt model.safetensors: once a 57-line safetensors traceback and exit 1."""
    import shutil

    broken = tmp_path / "broken"
    shutil.copytree(opt_folder, broken)
    (broken / "model.safetensors").write_bytes(b"\x00" * 1000)
    one_line_error(run_export(broken, "--bits", "8", "-o", tmp_path / "out"), "safetensors file is corrupt or truncated")
    assert not (tmp_path / "out").exists()


def test_a_tokenizer_that_does_not_load_is_said_once(opt_folder, tmp_path):
    import shutil

    folder = tmp_path / "badtok"
    shutil.copytree(opt_folder, folder)
    (folder / "tokenizer.json").write_text("{bad")
    result = run_export(folder, "--bits", "8", "--no-verify", "-o", tmp_path / "out")
    assert result.exit_code == 0, result.output
    assert [line for line in result.stderr.splitlines() if line.startswith("warning: the tokenizer")]
