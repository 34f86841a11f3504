"""`cptq verify`'s report files: report.json (VerifyReport, docs/schemas/verify-report.schema.json), report.md
and JUnit XML."""

from __future__ import annotations

import contextlib
import os
import secrets
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Any

from .verify import VerifyResult


def _markdown(report: dict[str, Any]) -> str:
    lines = [f"# cptq verify: {report['model']} ({report['task']})", "",
             f"Output `{report['output']}`, gate baseline **{report['baseline']}**, "
             f"{'quick' if report['quick'] else 'full'} run, cptquant {report['cptquant_version']}, "
             f"onnxruntime {report['onnxruntime_version']}. "
             f"Result: **{'PASS' if report['passed'] else 'FAIL'}**.", ""]
    for why in report["skipped_eps"].values():
        lines += [f"- {why}", ""]
    for line in report.get("warnings", []):
        lines += [f"- **warning**: {line}", ""]
    for ep, measured in report["eps"].items():
        quality, speed = measured["quality"], measured["speed"]
        lines += [f"## {ep}: {measured['device']}", "", "### Quality", ""]
        for name, figures in quality["variants"].items():
            if figures:
                lines.append(f"- {name}: " + ", ".join(f"{k} {v:.6g}" for k, v in figures.items()))
        for key, figures in quality.items():
            if key.startswith("vs_"):
                lines.append(f"- quantized {key.replace('_', ' ')}: " + ", ".join(f"{k} {v:.6g}" for k, v in figures.items()))
        lines += ["", "### Speed (p50 / p90 ms, speed-ups p50 / p90; variants interleaved)", ""]
        names = list(speed["variants"])
        keys = [k for k, v in speed["variants"][names[0]]["latency"].items() if isinstance(v, dict)]
        lines.append("| figure | " + " | ".join(names) + " | speed-up vs " + " | speed-up vs ".join(names[1:]) + " |")
        lines.append("|---" * (1 + 2 * len(names) - 1) + "|")
        for key in keys:
            cells = [f"{speed['variants'][n]['latency'][key]['p50_ms']:.3f} / {speed['variants'][n]['latency'][key]['p90_ms']:.3f}"
                     for n in names]
            ratios = [f"{speed[f'vs_{n}']['latency_speedup'][key]:.3f}× / {speed[f'vs_{n}']['p90_speedup'][key]:.3f}×"
                      for n in names[1:]]
            lines.append(f"| {key} | " + " | ".join(cells + ratios) + " |")
        lines.append("")
        for n in names:
            v = speed["variants"][n]
            rss = (f"peak RSS {v['peak_rss_bytes'] / 1e6:.1f} MB (+{v['rss_growth_bytes'] / 1e6:.1f} MB to open and run it)"
                   if v["peak_rss_bytes"] is not None else "peak RSS n/a")
            extra = f", {v['latency']['tokens_per_s']} tokens/s" if "tokens_per_s" in v["latency"] else ""
            lines.append(f"- {n}: {v['bytes_on_disk'] / 1e6:.2f} MB on disk, {rss}{extra}")
        for n in names[1:]:
            vs = speed[f"vs_{n}"]
            ratios = [f"{vs['smaller_on_disk_by']:.2f}× smaller on disk"]
            ratios += [f"{label} {vs[key]:.3f}×" for key, label in (("peak_rss_bytes_ratio", "peak RSS"),
                                                                   ("rss_growth_bytes_ratio", "RSS growth"),
                                                                   ("tokens_per_s_ratio", "tokens/s"))
                       if vs.get(key) is not None]
            lines.append(f"- quantized vs {n}: " + ", ".join(ratios))
            if vs.get("speedup_interval"):
                i = vs["speedup_interval"]
                lines.append(f"- speed-up vs {n}, paired rounds: {i['estimate']:.3f}× ({i['confidence']:.0%} interval "
                             f"{i['low']:.3f}–{i['high']:.3f}, {min(i['rounds'].values())}+ rounds per figure, "
                             f"{i['added_seconds']:.0f} s added; stopped: {i['stopped']})")
        lines.append("")
    lines += ["## Checks", ""] + [f"- {c['line']}" for c in report["checks"]] + [""]
    return "\n".join(lines)


def write_reports(result: VerifyResult, report_dir: Path) -> tuple[Path, Path]:
    report_dir.mkdir(parents=True, exist_ok=True)
    json_path, md_path = report_dir / "report.json", report_dir / "report.md"
    _replace_file(json_path, result.report.to_json())
    _replace_file(md_path, _markdown(result.report.to_dict()))
    return json_path, md_path


def _replace_file(path: Path, text: str) -> None:
    """Write `text` as `path` in one step: a reader never sees half a report, and a link at `path` (a verified
    folder is not trusted: its verify/report.json may point at any file of the user) is replaced, not followed."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)  # the umask's permissions, as write_text gave
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def write_junit(result: VerifyResult, path: Path) -> Path:
    """One testcase per check, one skipped testcase per EP that could not run."""
    failures = sum(not c.passed for c in result.checks)
    suite = ET.Element("testsuite", name="cptq verify", tests=str(len(result.checks) + len(result.skipped)),
                       failures=str(failures), errors="0", skipped=str(len(result.skipped)))
    for check in result.checks:
        case = ET.SubElement(suite, "testcase", classname=f"cptq.verify.{check.ep}", name=check.name)
        if not check.passed:
            ET.SubElement(case, "failure", message=check.line(), type="threshold").text = check.line()
        # The measured value in an element the JUnit schemas allow (an unknown testcase attribute is not).
        ET.SubElement(case, "system-out").text = check.line()
    for ep, why in result.skipped.items():
        case = ET.SubElement(suite, "testcase", classname=f"cptq.verify.{ep}", name=f"{ep} execution provider")
        ET.SubElement(case, "skipped", message=why)
    root = ET.Element("testsuites")
    root.append(suite)
    ET.indent(root)
    path.parent.mkdir(parents=True, exist_ok=True)
    ET.ElementTree(root).write(path, encoding="utf-8", xml_declaration=True)
    return path


