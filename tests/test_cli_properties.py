"""Random plans, option values and output paths through the real `cptq-export` CLI: every outcome is a
finished export (exit 0) or one line and exit 2; never a traceback, a half-written folder or debris."""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

import pytest
from hypothesis import event, given, settings
from hypothesis import strategies as st
from typer.testing import CliRunner

from cptquant.cli import export_app
from cptquant.safety import check_file_hashes

runner = CliRunner()
LAYERS = ["model.decoder.embed_tokens", "model.decoder.embed_positions", "lm_head"] + [
    f"model.decoder.layers.{i}.{name}" for i in range(2)
    for name in ("self_attn.k_proj", "self_attn.v_proj", "self_attn.q_proj", "self_attn.out_proj", "fc1", "fc2")]


@pytest.fixture(scope="module")
def workspace(tmp_path_factory) -> tuple[Path, Path]:
    """One saved tiny OPT for every example, and a folder to make each example's own folder in."""
    from cptquant.testing import tiny_opt

    root = tmp_path_factory.mktemp("properties")
    tiny_opt().save_pretrained(root / "tiny-opt")
    return root / "tiny-opt", root


def _plan_json(layers) -> str:
    return json.dumps({"version": 1, "layers": layers})


bad_entry = st.fixed_dictionaries({"bits": st.sampled_from([3, "8", 8.0, None, True, 8, 4])},
                                  optional={"block_size": st.sampled_from([24, "32", 0, 16, 32])})
valid_entry = st.fixed_dictionaries({"bits": st.sampled_from([4, 8, 16])})
GOOD_PLANS = st.fixed_dictionaries({name: valid_entry for name in LAYERS}).map(_plan_json)
PARTIAL_PLANS = st.dictionaries(st.sampled_from(LAYERS), valid_entry, max_size=5).map(_plan_json)  # --default-bits
BAD_PLANS = st.one_of(
    st.sampled_from(["{nope", "[]", "null", '{"version": 1}', '{"version": 2, "layers": {}}',
                     '{"version": 1, "layers": []}', '{"version": 1, "layers": {}, "meta": 3}', "\x00\xff"]),
    st.dictionaries(st.sampled_from(LAYERS + ["no.such.layer"]), bad_entry, min_size=1, max_size=len(LAYERS))
      .map(_plan_json),
    PARTIAL_PLANS)  # without --default-bits
GOOD_OUTPUTS = ["new", "new nested/with space/deeper", "existing-empty", "existing-with-files", "brackets [/x]"]
# `existing-with-files/missing/..` is that folder (refused without --force); `.cptq-tmp-*` is a name of cptquant's
BAD_OUTPUTS = ["under-a-file/sub", "existing-dir-as-model", "existing-with-files/missing/..", ".cptq-tmp-mine/out"]
# Each example breaks at most two of these on purpose; the rest get values that work, so that about half
# the examples run a whole export (with a random plan, format, output path) and the others one refusal.
DIMENSIONS = ("plan", "bits", "block", "format", "target", "output")


@st.composite
def cli_cases(draw) -> dict:
    broken = draw(st.sets(st.sampled_from(DIMENSIONS), max_size=2))

    def pick(dimension: str, good, bad):
        return draw(bad if dimension in broken else good)

    mode = draw(st.sampled_from(["plan", "bits", "method"]))
    plan_kind = draw(st.sampled_from(["complete", "partial"]))
    return {
        "mode": mode,
        "plan_text": pick("plan", GOOD_PLANS if plan_kind == "complete" else PARTIAL_PLANS, BAD_PLANS),
        "default_bits": (pick("plan", st.sampled_from(["8", "4", "16"]), st.sampled_from([None, "5", "0"]))
                         if plan_kind == "partial" else None),
        "bits": pick("bits", st.sampled_from(["8", "4", "16"]), st.sampled_from(["5", "0", "-4"])),
        "block_size": pick("block", st.sampled_from([None, "16", "32"]), st.sampled_from(["48", "8", "128"])),
        "weight_format": pick("format", st.sampled_from([None, "qdq", "nbits", "dynamic"]), st.just("int3")),
        "target_bits": pick("target", st.sampled_from(["6", "4.5", "12"]), st.sampled_from(["1", "17", "nan", "inf"])),
        "layout": pick("output", st.sampled_from(GOOD_OUTPUTS), st.sampled_from(BAD_OUTPUTS)),
        "name": draw(st.sampled_from(["", "model.onnx", "my model.onnx"])),
        "force": draw(st.booleans()),
    }


def _prepare(case: Path, layout: str, name: str) -> Path:
    """The output path an example passes to -o, with what already exists around it."""
    given = case / layout
    layout = layout.removesuffix("/missing/..")
    folder = case / layout
    if layout.startswith("existing"):
        folder.mkdir(parents=True)
    if layout == "existing-with-files":
        (folder / "config.json").write_text("{}")
        (folder / "notes.txt").write_text("mine")
    if layout == "existing-dir-as-model":
        (folder / (name or "model.onnx")).mkdir()
    if layout.startswith("under-a-file"):
        (case / "under-a-file").write_text("a file, not a folder")
    return given / name if name else given


def _tree(case: Path) -> dict[str, bytes | None]:
    return {str(p.relative_to(case)): (p.read_bytes() if p.is_file() else None) for p in sorted(case.rglob("*"))}


@settings(max_examples=15, deadline=None, derandomize=True)  # derandomized: the same examples in every run
@given(case_args=cli_cases())
def test_every_cli_outcome_is_an_export_or_one_line(workspace, case_args):
    mode, plan_text, default_bits, bits, block_size, weight_format, target_bits, layout, name, force = (
        case_args[key] for key in ("mode", "plan_text", "default_bits", "bits", "block_size", "weight_format",
                                   "target_bits", "layout", "name", "force"))
    source, root = workspace
    case = Path(tempfile.mkdtemp(dir=root))
    out = _prepare(case, layout, name)
    (case / "plan.json").write_text(plan_text)
    args = [str(source), "-o", str(out), "--algorithm", "rtn", "--no-verify", "--no-progress"]
    if mode == "plan":
        args += ["--plan", str(case / "plan.json")] + (["--default-bits", default_bits] if default_bits else [])
    elif mode == "bits":
        args += ["--bits", bits]
    else:
        args += ["--method", "tdmpq", "--target-bits", target_bits, "--calib-samples", "8", "--seq-len", "32"]
    args += (["--block-size", block_size] if block_size else []) + (["--format", weight_format] if weight_format else [])
    args += ["--force"] if force else []
    before = _tree(case)

    result = runner.invoke(export_app, args)
    event(f"exit {result.exit_code}: " + (result.stderr.strip()[:60] if result.exit_code else "exported"))

    assert result.exit_code in (0, 2), (args, result.exit_code, result.output, result.exception)
    assert result.exception is None or isinstance(result.exception, SystemExit), (args, repr(result.exception))
    assert "Traceback" not in result.stdout + result.stderr, args
    leftovers = [p for p in root.rglob(".cptq-*") if p.name.startswith((".cptq-tmp-", ".cptq-lock"))
                 or p.name.endswith(".cptq-lock")]
    assert not leftovers, (args, leftovers)
    if not force:  # without --force nothing that was there is changed, however -o spells the folder
        after = _tree(case)
        assert all(after.get(path) == content for path, content in before.items()), args
    if result.exit_code == 2:
        lines = [line for line in result.stderr.splitlines() if line.strip()]
        assert len(lines) == 1 and lines[0].startswith("error: "), (args, result.stderr)
        assert _tree(case) == before, args  # nothing written, nothing half-written, nothing replaced
    else:
        out = Path(os.path.normpath(out))  # `a/missing/..` is `a`
        folder = out.parent if out.suffix == ".onnx" else out
        model = out if out.suffix == ".onnx" else out / "model.onnx"
        report_path = folder / (model.name[: -len(".onnx")] + ".report.json")
        report = json.loads(report_path.read_text())
        check_file_hashes(folder, report["sha256"], report_path)  # every described file whole and as reported
        assert model.is_file() and report["average_bits"] is not None
