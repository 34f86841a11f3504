"""Exports never clobber, never mix and never leave debris: concurrent runs, kills, forced re-exports."""

from __future__ import annotations

import hashlib
import json
import os
import select
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
from conftest import one_line_error
from typer.testing import CliRunner

from cptquant import output_folder
from cptquant.cli import app, export_app
from cptquant.errors import CptqError

runner = CliRunner()
EXPORT = [str(Path(sys.executable).with_name("cptq-export"))]
QUICK = ["--bits", "8", "--algorithm", "rtn", "--no-verify", "--no-progress"]


@pytest.fixture(scope="module")
def opt_folder(tmp_path_factory) -> Path:
    from cptquant.testing import tiny_opt

    folder = tmp_path_factory.mktemp("hub") / "tiny-opt"
    tiny_opt().save_pretrained(folder)
    return folder


def run_export(*args: str):
    return runner.invoke(export_app, [*map(str, args), "--no-progress"])


def snapshot(folder: Path) -> dict[str, str]:
    """Every file under `folder` with the sha256 of its bytes."""
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def debris(parent: Path) -> list[str]:
    return sorted(p.name for p in parent.rglob("*") if p.name.startswith(output_folder.STAGING_PREFIX)
                  or p.name.endswith(output_folder.LOCK_SUFFIX))


def start_paused(args: list[str], at: str) -> subprocess.Popen:
    """cptq-export in a subprocess, stopped (CPTQ_TEST_PAUSE_AT) at the named point; returns once it is there."""
    env = dict(os.environ, HF_HUB_OFFLINE="1", CPTQ_TEST_PAUSE_AT=at)
    proc = subprocess.Popen(EXPORT + args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    deadline, seen = time.monotonic() + 180, []
    while time.monotonic() < deadline:
        ready, _, _ = select.select([proc.stderr], [], [], 1.0)
        if ready:
            line = proc.stderr.readline()
            seen.append(line)
            if line.strip() == f"cptq-test: paused at {at}":
                return proc
            if not line and proc.poll() is not None:
                break
    proc.kill()
    raise AssertionError(f"never paused at {at}: rc {proc.poll()}, stderr {''.join(seen)[-2000:]}")


def stop(proc: subprocess.Popen, signum: int) -> tuple[int, str]:
    proc.send_signal(signum)
    _, err = proc.communicate(timeout=60)
    return proc.returncode, err


# ---------------------------------------------------------------- cases 3 and 5: one writer, kills leave nothing


@pytest.mark.parametrize("point", ["analysis", "quantize", "write", "install"])
def test_sigterm_at_any_point_leaves_the_previous_output_or_nothing(opt_folder, tmp_path, point):
    """An export stopped during analysis, quantization, writing, and in the middle of moving files into an
    existing folder: meanwhile a second export to the same output fails at once naming the first (case 3);
    after SIGTERM the folder is exactly as before (absent, or the previous export) and no staging folder or
    lock remains (case 5)."""
    out = tmp_path / "out"
    args = [str(opt_folder), "--method", "tdmpq", "--calib-samples", "8", "--seq-len", "32", "--algorithm", "rtn",
            "--no-verify", "--no-progress", "-o", str(out)]
    if point == "install":  # a previous export whose files the new one replaces (--force)
        out.mkdir()
        for name in ("model.onnx", "model.onnx_data", "config.json", "model.plan.json", "model.report.json"):
            (out / name).write_text(f"previous {name}")
        args.append("--force")
    before = snapshot(out) if out.exists() else None
    first = start_paused(args, point)
    try:
        started = time.monotonic()
        line = one_line_error(run_export(opt_folder, *QUICK, "-o", out, "--force"), f"pid {first.pid}")
        assert "is being written by another cptq run" in line and time.monotonic() - started < 10
    finally:
        code, err = stop(first, signal.SIGTERM)
    assert code == 143 and err.strip().splitlines()[-1] == "interrupted: nothing written", err
    assert "Traceback" not in err
    assert (snapshot(out) if out.exists() else None) == before
    assert debris(tmp_path) == []


def test_the_console_scripts_answer_signals_before_torch_loads():
    """The seconds of importing typer, torch and transformers come after the handlers are in place (a SIGTERM
    then once exited 143 silently, a SIGINT with a KeyboardInterrupt traceback)."""
    code = textwrap.dedent("""
        import json, signal, sys
        seen = {}
        def hook(event, args):
            if event == "import" and args[0] in ("typer", "torch") and args[0] not in seen:
                seen[args[0]] = [getattr(signal.getsignal(s), "__name__", str(signal.getsignal(s)))
                                 for s in (signal.SIGTERM, signal.SIGHUP, signal.SIGINT)]
        sys.addaudithook(hook)
        from cptquant import cli
        sys.argv = ["cptq-export", "--help"]
        try:
            cli.export_main()
        except SystemExit:
            pass
        print(json.dumps(seen))
    """)
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                          env=dict(os.environ, HF_HUB_OFFLINE="1"))
    seen = json.loads(done.stdout.strip().splitlines()[-1])
    assert seen == {name: ["_on_startup_signal"] * 3 for name in ("typer", "torch")}, (seen, done.stderr[-2000:])


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_a_signal_during_start_up_is_one_line(opt_folder, tmp_path, signum):
    out = tmp_path / "out"
    proc = start_paused([str(opt_folder), *QUICK, "-o", str(out)], "startup")
    code, err = stop(proc, signum)
    assert code == 128 + signum and err.strip().splitlines()[-1] == "interrupted: nothing written", err
    assert "Traceback" not in err and not out.exists() and debris(tmp_path) == []


def test_a_signal_after_the_commit_says_the_output_is_in_place(opt_folder, tmp_path):
    out = tmp_path / "out"
    proc = start_paused([str(opt_folder), *QUICK, "-o", str(out)], "committed")
    code, err = stop(proc, signal.SIGTERM)
    assert code == 143, err
    assert err.strip().splitlines()[-1] == "interrupted: the output was already complete and in place", err
    assert (out / "model.onnx").is_file() and (out / "model.report.json").is_file() and debris(tmp_path) == []


def test_debris_of_a_killed_run_is_removed_by_the_next_export(opt_folder, tmp_path):
    out = tmp_path / "out"
    killed = start_paused([str(opt_folder), *QUICK, "-o", str(out)], "write")
    killed.kill()  # SIGKILL: no clean-up runs
    killed.communicate(timeout=60)
    left = [p for p in tmp_path.iterdir() if p.name.startswith(output_folder.STAGING_PREFIX)]
    assert len(left) == 1 and (left[0] / output_folder.OWNER_LOCK).is_file()
    old_style = tmp_path / f"{output_folder.STAGING_PREFIX}from-an-older-cptquant"  # no owner lock, a day old
    (old_style / "fp32").mkdir(parents=True)
    os.utime(old_style, (time.time() - 86400,) * 2)
    result = run_export(opt_folder, *QUICK, "-o", out)
    assert result.exit_code == 0, result.output
    assert debris(tmp_path) == [] and (out / "model.onnx").is_file()


def test_a_run_killed_in_the_middle_of_a_commit_is_rolled_back_by_the_next(tmp_path):
    """SIGKILL between moving the old files aside and moving all new ones in: the next run restores the old."""
    folder = tmp_path / "out"
    folder.mkdir()
    for name in ("model.onnx", "config.json", "notes.txt"):
        (folder / name).write_text(f"old {name}")
    before = snapshot(folder)
    staging = output_folder.Staging(folder)
    for name in ("model.onnx", "config.json", "model.report.json"):
        (staging.out / name).write_text(f"new {name}")
    journal = {"target": str(folder), "new": ["config.json", "model.onnx", "model.report.json"],
               "old": ["config.json", "model.onnx"]}
    (staging.root / output_folder.JOURNAL).write_text(json.dumps(journal))
    (staging.root / output_folder.BACKUP).mkdir()
    for name in journal["old"]:  # what a commit does first
        os.rename(folder / name, staging.root / output_folder.BACKUP / name)
    os.rename(staging.out / "config.json", folder / "config.json")  # one new file moved in, then "killed"
    os.close(staging._fd)  # the owner's lock goes with its process
    staging._fd = None
    assert output_folder.remove_debris(folder) == [staging.root]
    assert snapshot(folder) == before and not staging.root.exists()


# ---------------------------------------------------------------- case 4: files an export would replace


def test_an_existing_folders_files_are_listed_and_kept_without_force(opt_folder, tmp_path):
    out = tmp_path / "deploy"
    out.mkdir()
    for name in ("config.json", "model.plan.json", "model.report.json", "tokenizer.json", "notes.txt"):
        (out / name).write_text(f"mine: {name}")
    before = snapshot(out)
    one_line_error(run_export(opt_folder, *QUICK, "-o", out),
                   f"output files already exist in {out}: config.json, model.plan.json, model.report.json, "
                   "tokenizer.json (use --force to replace them)")
    assert snapshot(out) == before
    result = run_export(opt_folder, *QUICK, "-o", out, "--force")
    assert result.exit_code == 0, result.output
    assert (out / "notes.txt").read_text() == "mine: notes.txt"  # not the export's: never touched
    assert json.loads((out / "model.report.json").read_text())["task"] == "text-generation-with-past"


def test_a_path_through_a_missing_folder_and_dotdot_is_the_folder_it_names(opt_folder, tmp_path):
    """`-o deploy/missing/..` is `deploy` to the writer (absolute paths, normalized), but the OS says it does not
    exist: the existing files were replaced without --force, and the source folder was written into with it."""
    out = tmp_path / "deploy"
    out.mkdir()
    (out / "config.json").write_text("mine")
    one_line_error(run_export(opt_folder, *QUICK, "-o", out / "missing" / ".."),
                   f"output files already exist in {out}: config.json")
    source = tmp_path / "src"
    source.mkdir()
    for path in opt_folder.iterdir():
        (source / path.name).write_bytes(path.read_bytes())
    before = snapshot(source)
    one_line_error(run_export(source, *QUICK, "-o", source / "missing" / ".." / "model.onnx", "--force"),
                   f"refusing to export into the source model's own folder {source}")
    assert snapshot(source) == before and (out / "config.json").read_text() == "mine"


def test_a_folder_where_a_side_file_goes_is_never_replaced(opt_folder, tmp_path):
    """A folder named config.json or model.plan.json is not an older export's file: with --force it was moved
    aside and deleted with everything in it."""
    out = tmp_path / "out"
    for name in ("config.json", "model.plan.json"):
        (out / name / "inside").mkdir(parents=True)
        (out / name / "inside" / "data.txt").write_text("keep")
    before = snapshot(out)
    one_line_error(run_export(opt_folder, *QUICK, "-o", out, "--force"),
                   f"{out} has folders where cptquant writes files: config.json, model.plan.json")
    (out / "scores.json").mkdir()
    one_line_error(runner.invoke(app, ["analyze", str(opt_folder), "-o", str(out), "--force", "--no-progress"]),
                   f"{out} has folders where cptquant writes files: scores.json")
    (out / "scores.json").rmdir()
    assert snapshot(out) == before and debris(tmp_path) == []


@pytest.mark.parametrize("name", [".cptq-tmp-mine", ".cptq-cache", ".out.cptq-lock"])
def test_names_cptquant_keeps_for_its_work_files_are_refused_as_outputs(opt_folder, tmp_path, name):
    """An export into `.cptq-tmp-mine` was later taken for a dead run's staging folder (no owner lock, an hour
    old) and deleted by the next export beside it."""
    one_line_error(run_export(opt_folder, *QUICK, "-o", tmp_path / name / "model.onnx"),
                   f"{name} is a name cptquant keeps for its own work files")
    one_line_error(runner.invoke(app, ["analyze", str(opt_folder), "-o", str(tmp_path / name / "x"), "--no-progress"]),
                   f"{name} is a name cptquant keeps for its own work files")
    assert list(tmp_path.iterdir()) == []


def test_the_source_models_own_folder_is_refused_even_with_force(opt_folder, tmp_path):
    source = tmp_path / "src"
    source.mkdir()
    for path in opt_folder.iterdir():
        (source / path.name).write_bytes(path.read_bytes())
    before = snapshot(source)
    for target in (source, source / "model.onnx"):
        one_line_error(run_export(source, *QUICK, "-o", target, "--force"),
                       f"refusing to export into the source model's own folder {source}")
    assert snapshot(source) == before


def test_a_forced_reexport_removes_only_the_older_exports_own_leftovers(opt_folder, tmp_path):
    out = tmp_path / "out"
    assert run_export(opt_folder, *QUICK, "-o", out).exit_code == 0
    (out / "model.onnx_data").write_text("external data of an older, larger export")
    report = json.loads((out / "model.report.json").read_text())
    report["files"].update({"vocab.txt": 1, "../outside.txt": 1, "notes.txt": 1})  # a report is data, not orders
    (out / "model.report.json").write_text(json.dumps(report))
    for name in ("vocab.txt", "notes.txt"):
        (out / name).write_text(name)
    (tmp_path / "outside.txt").write_text("outside")
    assert run_export(opt_folder, *QUICK, "-o", out, "--force").exit_code == 0
    names = {p.name for p in out.iterdir()}
    assert "model.onnx_data" not in names and "vocab.txt" not in names
    assert "notes.txt" in names and (tmp_path / "outside.txt").exists()


# ---------------------------------------------------------------- case 6: all or nothing


def test_a_folder_where_the_model_file_goes_is_one_line_and_nothing_moves(opt_folder, tmp_path):
    out = tmp_path / "d"
    (out / "m.onnx").mkdir(parents=True)
    (out / "m.onnx" / "keep.txt").write_text("keep")
    before = snapshot(out)
    one_line_error(run_export(opt_folder, *QUICK, "-o", out / "m.onnx", "--force"),
                   f"output {out / 'm.onnx'} is a folder, not a model file")
    assert snapshot(out) == before and debris(tmp_path) == []


def test_a_failure_at_any_file_of_the_commit_leaves_the_old_output_exactly_as_it_was(opt_folder, tmp_path,
                                                                                      monkeypatch):
    out = tmp_path / "out"
    assert run_export(opt_folder, *QUICK, "-o", out).exit_code == 0
    (out / "notes.txt").write_text("mine")
    before = snapshot(out)
    real_rename, moved_in = os.rename, []

    def flaky_rename(src, dst):  # the third new file moved into the folder fails
        if Path(dst).parent == out and Path(src).parent.name == output_folder.STAGED and len(moved_in) < 3:
            moved_in.append(dst)
            if len(moved_in) == 3:
                raise OSError(28, "No space left on device", str(dst))
        return real_rename(src, dst)

    monkeypatch.setattr(os, "rename", flaky_rename)
    one_line_error(run_export(opt_folder, "--bits", "4", "--algorithm", "rtn", "--no-verify", "-o", out, "--force"),
                   f"cannot move the output into {out}: No space left on device")
    monkeypatch.setattr(os, "rename", real_rename)
    assert len(moved_in) == 3 and snapshot(out) == before and debris(tmp_path) == []


# ---------------------------------------------------------------- the lock, in-process


def test_the_lock_is_reentrant_in_one_process_and_leaves_no_file(tmp_path):
    folder = tmp_path / "a" / "b" / "out"
    with output_folder.claim_output(folder):
        lock = output_folder.lock_path(folder)
        assert lock.read_text().strip() == str(os.getpid())
        with output_folder.claim_output(folder):
            pass
        assert lock.exists()
    assert not (tmp_path / "a").exists()  # the parents it created are gone again, with the lock file


def test_a_link_to_an_output_folder_takes_the_same_lock(tmp_path):
    """`-o current` (a link to `v3`) while another run writes `-o v3`: one output, so one lock (each had its
    own, and both wrote into v3 at once)."""
    (tmp_path / "v3").mkdir()
    (tmp_path / "current").symlink_to(tmp_path / "v3", target_is_directory=True)
    assert output_folder.lock_path(tmp_path / "current") == output_folder.lock_path(tmp_path / "v3")
    code = ("import sys; from pathlib import Path; from cptquant import output_folder\n"
            "with output_folder.claim_output(Path(sys.argv[1])): print('claimed')")
    with output_folder.claim_output(tmp_path / "v3"):
        done = subprocess.run([sys.executable, "-c", code, str(tmp_path / "current")], capture_output=True,
                              text=True, timeout=60)
    assert "is being written by another cptq run" in done.stderr and "claimed" not in done.stdout


def test_an_output_path_under_a_regular_file_says_so(tmp_path):
    (tmp_path / "afile").write_text("x")
    with pytest.raises(CptqError, match=r"afile is a file, not a folder"):
        output_folder.check_target(tmp_path / "afile" / "sub" / "dir", "model.onnx", False)
