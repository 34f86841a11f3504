"""Peak host memory of one variant, measured in a fresh process.

In one long-lived process the figure depends on what ran before: memory a previous session freed is
reused without growing the resident set, so whichever variant opens second looks cheaper. A fresh
Python process per variant imports onnxruntime, records its resident size, opens the session, runs
one forward pass (batch 1, the given length) and reports its resident high-water mark (`VmHWM`).

Reported: `peak_rss_bytes` (the whole process's peak, what a one-model deployment would see) and
`rss_growth_bytes` (that peak minus the size after imports: the model's own cost). Linux only; on
other systems both are None.

Run as `python -m cptquant.runtimes.memory EP MODEL_PATH VOCAB LENGTH` (EP: cpu:THREADS or cuda:DEVICE).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from .base import RuntimeAdapter


def _status_kb(field: str) -> int | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except OSError:
        pass
    return None


def adapter_for(spec: str) -> RuntimeAdapter:
    from .cpu import CpuAdapter
    from .cuda import CudaAdapter

    name, _, arg = spec.partition(":")
    if name == "cpu":
        return CpuAdapter(threads=int(arg or 2))
    if name == "cuda":
        return CudaAdapter(device_id=int(arg or 0))
    raise ValueError(f"unknown adapter spec {spec!r}")


def adapter_spec(adapter: RuntimeAdapter) -> str:
    from .cpu import CpuAdapter

    return f"cpu:{adapter.threads}" if isinstance(adapter, CpuAdapter) else f"{adapter.name}:{adapter.device_id()}"


def measure_peak_rss(adapter: RuntimeAdapter, model_path: Path, vocab_size: int, length: int = 16,
                     timeout_s: float = 600) -> dict[str, int | None]:
    """{"peak_rss_bytes", "rss_growth_bytes"} from a fresh process; None values when not measurable."""
    package_root = str(Path(__file__).resolve().parents[2])  # this checkout's cptquant, not another install
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [package_root, os.environ.get("PYTHONPATH")]))}
    cmd = [sys.executable, "-m", "cptquant.runtimes.memory", adapter_spec(adapter), str(model_path), str(vocab_size),
           str(length)]
    done = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=timeout_s)
    if done.returncode != 0:
        last = (done.stderr.strip().splitlines() or ["no output"])[-1]
        raise RuntimeError(f"memory probe of {model_path} failed: {last}")
    figures: dict[str, int | None] = json.loads(done.stdout.strip().splitlines()[-1])  # _probe's
    return figures


def _probe(spec: str, model_path: str, vocab_size: int, length: int) -> dict[str, int | None]:
    import onnxruntime  # noqa: F401 - imported before the baseline reading, so its size is not billed

    from ..onnx_io.inputs import feeds_for

    adapter = adapter_for(spec)
    start_kb = _status_kb("VmRSS")
    session = adapter.session(Path(model_path))
    ids = np.random.default_rng(0).integers(4, vocab_size, size=(1, length), dtype=np.int64)
    adapter.run(session, feeds_for(session, ids))
    peak_kb = _status_kb("VmHWM")
    if start_kb is None or peak_kb is None:
        return {"peak_rss_bytes": None, "rss_growth_bytes": None}
    return {"peak_rss_bytes": peak_kb * 1024, "rss_growth_bytes": max(0, peak_kb - start_kb) * 1024}


if __name__ == "__main__":
    print(json.dumps(_probe(sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4]))))
