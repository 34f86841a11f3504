"""Baseline caches never collide and are judged by content; the report's file hashes catch changed files."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from cptquant.cli import app
from cptquant.exporter.pipeline import export_quantized
from cptquant.model_loading import load_model
from cptquant.onnx_io.baselines import FINGERPRINT_FILE, baseline_dir
from cptquant.plan import uniform_plan

runner = CliRunner()


@pytest.fixture(scope="module")
def two_sources(tmp_path_factory) -> tuple[Path, Path]:
    """Two tiny BERTs of the same shape (same inputs and outputs) and different weights, saved as folders."""
    from cptquant.testing import tiny_bert

    root = tmp_path_factory.mktemp("sources")
    folders = []
    for name, scale in (("bert-a", 1.0), ("bert-b", -1.0)):
        model = tiny_bert()
        with torch.no_grad():
            for param in model.parameters():
                param.mul_(scale)
        model.save_pretrained(root / name)
        folders.append(root / name)
    return folders[0], folders[1]


def _export(source: Path, model_path: Path) -> Path:
    export_quantized(load_model(str(source)), lambda _l, graph: uniform_plan(graph, 8), model_path, progress=False)
    return model_path


def _verify(target: Path, *args):
    return runner.invoke(app, ["verify", str(target), "--quick", "--no-progress", "--ep", "cpu", "--min-cosine", "0",
                               "--min-speedup", "0", *map(str, args)])


def _cosine(folder: Path) -> float:
    return json.loads((folder / "verify" / "report.json").read_text())["eps"]["cpu"]["quality"]["vs_fp32"][
        "mean_cosine"]


def test_look_alike_output_paths_get_their_own_caches(two_sources, tmp_path):
    """`-o a/b.onnx` and `-o a.b/model.onnx` once shared `.cptq-cache/a.b`: the second export's baselines
    replaced the first's, and verify compared the first model with the other one (cosine far from 1)."""
    first = _export(two_sources[0], tmp_path / "a" / "b.onnx")
    second = _export(two_sources[1], tmp_path / "a.b" / "model.onnx")
    assert baseline_dir(first.parent, first.name) != baseline_dir(second.parent, second.name)
    for model in (first, second):
        result = _verify(model)
        assert result.exit_code == 0, result.output
        assert _cosine(model.parent) > 0.99


def test_a_cache_of_another_model_with_the_same_inputs_is_caught_by_its_fingerprint(two_sources, tmp_path):
    out_a = _export(two_sources[0], tmp_path / "a" / "model.onnx").parent
    out_b = _export(two_sources[1], tmp_path / "b" / "model.onnx").parent
    cache_a = baseline_dir(out_a)
    shutil.rmtree(cache_a)
    shutil.copytree(baseline_dir(out_b), cache_a)  # same input and output names: only the content differs
    result = _verify(out_a)
    assert result.exit_code == 0, result.output  # rebuilt from the report's source folder, not compared with B
    assert _cosine(out_a) > 0.99
    report = json.loads((out_a / "model.report.json").read_text())
    assert json.loads((cache_a / FINGERPRINT_FILE).read_text())["fingerprint"] == report["baseline_fingerprint"]


def test_a_source_that_changed_since_the_export_is_not_used_for_baselines(two_sources, tmp_path):
    out = _export(two_sources[0], tmp_path / "out" / "model.onnx").parent
    shutil.rmtree(baseline_dir(out))
    result = _verify(out, "--source", two_sources[1])  # another model: its baselines would mean nothing
    assert result.exit_code == 2, result.output
    line = result.stderr.strip()
    assert line.startswith("error: ") and "is not the model this export was made from" in line and "\n" not in line


# ---------------------------------------------------------------- the report's file hashes


@pytest.mark.parametrize("name", ["model.onnx", "config.json", "model.plan.json"])
def test_verify_names_a_file_that_changed_since_the_export(two_sources, tmp_path, name):
    import onnx

    out = _export(two_sources[0], tmp_path / "out" / "model.onnx").parent
    report = json.loads((out / "model.report.json").read_text())
    assert set(report["sha256"]) == {p.name for p in out.iterdir() if p.is_file()} - {"model.report.json"}
    if name == "model.onnx":  # still a valid model, of the same inputs: only its bytes tell
        model = onnx.load(str(out / name))
        model.doc_string = "swapped"
        onnx.save(model, str(out / name))
    else:
        (out / name).write_text((out / name).read_text() + " ")
    result = _verify(out)
    assert result.exit_code == 2, result.output
    assert result.stderr.strip() == (f"error: {out / name} changed since the export: its sha256 is not the one in "
                                     "model.report.json (re-export, or restore the file)")


def test_verify_names_a_described_file_that_is_missing(two_sources, tmp_path):
    out = _export(two_sources[0], tmp_path / "out" / "model.onnx").parent
    (out / "model.plan.json").unlink()
    result = _verify(out)
    assert result.exit_code == 2 and f"{out / 'model.plan.json'} is missing" in result.stderr


# ---------------------------------------------------------------- caches of the old naming


def _legacy_cache(folder: Path) -> Path:
    """A cache as cptquant wrote it before the path-keyed names: `.cptq-cache/<folder name>/fp32|fp16`."""
    for variant in ("fp32", "fp16"):
        (folder / variant).mkdir(parents=True)
        (folder / variant / "model.onnx").write_bytes(b"an FP32 copy of the model" * 100)
    return folder


def test_caches_of_the_old_naming_are_removed_by_the_next_export_and_verify(two_sources, tmp_path):
    """Before the collision-proof key, `-o out/model.onnx` kept its baselines in `.cptq-cache/out`; nothing reads
    that name now, so nothing deleted it. An export (and a verify) of that output removes it; another output's
    cache, a link and a current cache are left alone."""
    cache_root = tmp_path / ".cptq-cache"
    own = _legacy_cache(cache_root / "out")
    own_named = _legacy_cache(cache_root / "out.other")  # `-o out/other.onnx` of the old naming
    elsewhere = _legacy_cache(cache_root / "elsewhere")
    target = tmp_path / "outside"
    _legacy_cache(target)
    (cache_root / "out.linked").symlink_to(target, target_is_directory=True)
    out = _export(two_sources[0], tmp_path / "out" / "model.onnx").parent
    assert not own.exists() and own_named.exists() and elsewhere.exists()
    assert baseline_dir(out).is_dir()
    _legacy_cache(own)  # left again (an older cptquant run); verify removes it too
    result = _verify(out)
    assert result.exit_code == 0, result.output
    assert not own.exists() and baseline_dir(out).is_dir() and elsewhere.exists()
    export_quantized(load_model(str(two_sources[0])), lambda _l, graph: uniform_plan(graph, 8),
                     tmp_path / "out" / "other.onnx", force=True, progress=False)  # its config.json is replaced
    assert not own_named.exists()
    assert (cache_root / "out.linked").is_symlink() and (target / "fp32" / "model.onnx").is_file()
    linked_root = tmp_path / "linked"  # a `.cptq-cache` that is a link: nothing through it is deleted
    linked_root.mkdir()
    (linked_root / ".cptq-cache").symlink_to(tmp_path / "users-folder", target_is_directory=True)
    users = _legacy_cache(tmp_path / "users-folder" / "out")
    _export(two_sources[0], linked_root / "out" / "model.onnx")
    assert (users / "fp32" / "model.onnx").is_file()
