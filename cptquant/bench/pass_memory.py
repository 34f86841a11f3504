"""Peak host memory of one sensitivity pass, measured in a fresh process (issue goal: ≤ 2x the
FP32 model plus one batch of activations).

The process loads the model and the calibration set, then:
1. resets the kernel's resident high-water mark (`/proc/self/clear_refs`, 5) and records the
   resident size: the model is in it once;
2. measures one batch of activations: the growth of the resident size over one forward pass of
   the first calibration batch with autograd recording (what a backward pass would read), freed after;
3. resets the high-water mark again, runs the pass through `passes.analyze`, and reads `VmHWM`.

Reported: the model's weight bytes, the activation bytes, and the pass's peak above the loaded
state; the goal holds when that peak ≤ model + activations (the model itself is the first 1x).
Linux only. Run as `python -m cptquant.bench.pass_memory SOURCE METHOD GRANULARITY SAMPLES SEQ_LEN [CALIB]`
(SOURCE "-" for the embedded MiniLM, CALIB a text file); prints one JSON line.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

KIB = 1024


def _status_bytes(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * KIB
    raise RuntimeError(f"/proc/self/status has no {field}")


def _reset_peak() -> None:
    Path("/proc/self/clear_refs").write_text("5")


def measure_in_this_process(source: str | None, method: str, granularity: str, samples: int, seq_len: int,
                            calib: str | None = None) -> dict[str, Any]:
    import torch

    from ..layer_graph import build_layer_graph
    from ..model_loading import load_model
    from ..options import AnalysisOptions
    from ..passes import analyze
    from ..passes.calibration import build_calibration

    torch.set_num_threads(2)
    loaded = load_model(source)
    model = loaded.model.eval()
    graph = build_layer_graph(model)
    options = AnalysisOptions.from_fields(calib=calib, calib_samples=samples, seq_len=seq_len, granularity=granularity)
    batch = build_calibration(loaded, calib, samples=samples, seq_len=seq_len).batches[0]
    model_bytes = sum(p.numel() * p.element_size() for p in model.parameters())

    _reset_peak()
    loaded_rss = _status_bytes("VmRSS")
    output = model(**batch)  # parameters require grad: autograd keeps this batch's activations
    activation_bytes = max(_status_bytes("VmRSS") - loaded_rss, 0)
    del output

    _reset_peak()
    rss = _status_bytes("VmRSS")
    analyze(loaded, graph, (method,), options, progress=False)
    peak_bytes = _status_bytes("VmHWM") - rss
    return {"method": method, "granularity": granularity, "model_bytes": model_bytes,
            "activation_bytes": activation_bytes, "peak_bytes": peak_bytes,
            "peak_over_model": peak_bytes / model_bytes,
            "within_goal": peak_bytes <= model_bytes + activation_bytes}


def measure(source: str | None, method: str, granularity: str, samples: int, seq_len: int,
            calib: str | None = None, timeout: float = 1800) -> dict[str, Any] | None:
    """`measure_in_this_process` in a fresh Python process; None where /proc is missing (not Linux)."""
    if not Path("/proc/self/clear_refs").exists():
        return None
    args = [sys.executable, "-m", "cptquant.bench.pass_memory", source or "-", method, granularity,
            str(samples), str(seq_len)] + ([calib] if calib else [])
    done = subprocess.run(args, capture_output=True, text=True, timeout=timeout, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"pass memory probe failed ({method}): {done.stderr.strip()[-500:]}")
    figures: dict[str, Any] = json.loads(done.stdout.strip().splitlines()[-1])  # measure_in_this_process's
    return figures


if __name__ == "__main__":
    src, meth, gran, n, length = sys.argv[1:6]
    result = measure_in_this_process(None if src == "-" else src, meth, gran, int(n), int(length),
                                     sys.argv[6] if len(sys.argv) > 6 else None)
    print(json.dumps(result))
