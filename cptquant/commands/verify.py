"""`cptq verify OUT_DIR`: quality and speed of an export against its FP32/FP16 baselines, as a CI gate.

Exit 0 when every threshold holds, 1 when one fails (each failure named with its measured value),
2 on bad input (one line on stderr).
"""

from __future__ import annotations

from pathlib import Path

import typer

from ..errors import CptqError
from ..runtimes.gate import parse_fraction, parse_number
from ..runtimes.verify import REPORT_DIR
from ..runtimes.verify_reports import write_junit, write_reports
from . import user_errors


@user_errors
def verify(
    out_dir: Path = typer.Argument(..., help="Output folder of cptq-export (model.onnx, model.report.json, …), "
                                             "or the .onnx file of an export in it."),
    baseline: str = typer.Option("fp32", "--baseline", help="Baseline the thresholds compare with: fp32 or fp16."),
    ep: str = typer.Option("auto", "--ep", help="Execution providers: auto (all available), cpu, cuda or cpu,cuda."),
    max_ppl_increase: str = typer.Option("2%", "--max-ppl-increase", help="Causal LM: largest relative perplexity rise."),
    max_accuracy_drop: str = typer.Option("1%", "--max-accuracy-drop",
                                          help="Classification / masked LM: largest accuracy drop (points)."),
    max_kl: str | None = typer.Option(None, "--max-kl",
                                      help="Causal LM: largest mean KL divergence of the next-token distribution "
                                           "from the baseline's (reported always; gated only when given)."),
    min_cosine: str = typer.Option("0.99", "--min-cosine", help="Feature extraction: smallest mean cosine."),
    min_speedup: str = typer.Option("1.0", "--min-speedup", help="Smallest geometric-mean speed-up. Fails only when its whole "
                                        "95% interval (interleaved pairs, repeated while it straddles) is below it; "
                                        "INCONCLUSIVE otherwise."),
    eval_file: Path | None = typer.Option(None, "--eval", help="Evaluation text: .txt lines or .jsonl {text, label}."),
    junit: Path | None = typer.Option(None, "--junit", help="Write a JUnit XML file of the checks here."),
    report_dir: Path | None = typer.Option(None, "--report-dir", help="Where report.json/.md go (OUT_DIR/verify)."),
    quick: bool = typer.Option(False, "--quick", help="Fewer texts, runs and shapes: a smoke test."),
    threads: int = typer.Option(2, "--threads", help="CPU EP intra-op threads."),
    progress: bool = typer.Option(True, "--progress/--no-progress", help="Progress bars on stderr."),
    source: str | None = typer.Option(
        None, "--source", help="Model (folder or hub id) to rebuild missing baselines from. Without it only the "
                               "report's source folder is used, and only when it runs no custom code."),
    trust_remote_code: bool = typer.Option(False, "--trust-remote-code",
                                           help="Allow the custom code the folder or --source names (never implied "
                                                "by the folder or its report)."),
) -> None:
    """Verify an exported model's quality and speed against its FP32/FP16 baselines."""
    from ..api import verify as verify_export

    folder = out_dir.parent if out_dir.suffix == ".onnx" and out_dir.is_file() else out_dir
    if report_dir is None and (folder / REPORT_DIR).is_symlink():  # the folder's own link: not the command line's
        raise CptqError(f"{folder / REPORT_DIR} is a link; cptq verify writes its reports into the folder itself "
                        "(remove the link, or give --report-dir)")
    _check_report_paths(report_dir, junit)  # before the run: a bad path found after it loses the run and its reports
    result = verify_export(
        out_dir, baseline=baseline, ep=ep,
        max_ppl_increase=parse_fraction(max_ppl_increase, "--max-ppl-increase"),
        max_accuracy_drop=parse_fraction(max_accuracy_drop, "--max-accuracy-drop", high=1.0),  # of 100 points
        min_cosine=parse_number(min_cosine, "--min-cosine", -1.0, 1.0),
        min_speedup=parse_number(min_speedup, "--min-speedup"),
        max_kl=parse_number(max_kl, "--max-kl") if max_kl is not None else None,
        eval_file=eval_file, quick=quick, threads=threads, progress=progress, source=source,
        trust_remote_code=trust_remote_code)
    try:
        json_path, md_path = write_reports(result, report_dir or folder / REPORT_DIR)
        if junit is not None:
            write_junit(result, junit)
    except OSError as exc:
        raise CptqError(f"cannot write the reports: {exc.strerror or exc} ({exc.filename})") from None
    for check in result.checks:
        print(check.line())
    print(f"reports: {json_path}, {md_path}" + (f", {junit}" if junit else ""))
    if not result.passed:
        raise typer.Exit(1)


def _check_report_paths(report_dir: Path | None, junit: Path | None) -> None:
    """--report-dir must be (or become) a folder and --junit a file, each under a folder, not under a file."""
    for path, flag, want_dir in ((report_dir, "--report-dir", True), (junit, "--junit", False)):
        if path is None:
            continue
        if path.exists() and path.is_dir() != want_dir:
            raise CptqError(f"{flag} {path} is a {'file' if want_dir else 'folder'}; give a "
                            f"{'folder' if want_dir else 'file'}")
        above = path.parent
        while not above.exists() and above != above.parent:
            above = above.parent
        if above.exists() and not above.is_dir():
            raise CptqError(f"{flag} {path}: {above} is a file, not a folder")
