"""The runtime adapter interface and the measurement helpers every adapter shares.

An adapter owns one ONNX Runtime execution provider: whether it can run here, how to open a
session on it, and how to run one forward pass with the inputs and outputs where that provider
wants them (host memory for CPU, device memory through IO binding for CUDA).
Peak memory is measured in a fresh process per variant: see memory.py.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort


class RuntimeAdapter:
    """One execution provider. Subclasses set `name`/`provider` and may override `run`."""

    name = "base"
    provider = ""
    output_device = "cpu"

    def available(self) -> tuple[bool, str]:
        """(True, "") when this provider can run here, else (False, why not in one line)."""
        raise NotImplementedError

    def session_options(self) -> ort.SessionOptions:
        options = ort.SessionOptions()
        options.log_severity_level = 3  # ORT's per-node placement warnings are not for our users
        return options

    def providers(self) -> list[str | tuple[str, dict[str, Any]]]:
        return [self.provider]

    def session(self, model_path: Path) -> ort.InferenceSession:
        return ort.InferenceSession(str(model_path), sess_options=self.session_options(),
                                    providers=self.providers())

    def device_name(self) -> str:
        return f"{self.name} (onnxruntime {ort.__version__})"

    def to_device(self, array: np.ndarray) -> ort.OrtValue:
        return ort.OrtValue.ortvalue_from_numpy(np.ascontiguousarray(array))

    def run_bound(self, session: ort.InferenceSession,
                  feeds: Mapping[str, np.ndarray | ort.OrtValue]) -> dict[str, ort.OrtValue]:
        """One forward pass with IO binding; outputs stay where the provider put them.

        `feeds` values may be numpy arrays (copied to the device here) or OrtValues already there,
        which is how a decode loop hands the KV cache back without a round trip through the host.
        """
        binding = session.io_binding()
        for name, value in feeds.items():
            binding.bind_ortvalue_input(name, value if isinstance(value, ort.OrtValue) else self.to_device(value))
        names = [o.name for o in session.get_outputs()]
        for name in names:
            binding.bind_output(name, self.output_device, self.device_id())
        session.run_with_iobinding(binding)
        binding.synchronize_outputs()  # a timed span must include the kernels, not just their launch
        return dict(zip(names, binding.get_outputs()))

    def device_id(self) -> int:
        return 0

    def run(self, session: ort.InferenceSession, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """One forward pass, outputs as host numpy arrays (what quality measurements read)."""
        return {name: value.numpy() for name, value in self.run_bound(session, feeds).items()}


@dataclass
class LatencyStats:
    p50_ms: float
    p90_ms: float
    runs: int

    def to_dict(self) -> dict[str, float | int]:
        return {"p50_ms": round(self.p50_ms, 4), "p90_ms": round(self.p90_ms, 4), "runs": self.runs}


def latency_stats(seconds: list[float]) -> LatencyStats:
    ms = np.asarray(seconds, dtype=np.float64) * 1e3
    p50, p90 = np.percentile(ms, [50, 90])
    return LatencyStats(float(p50), float(p90), len(ms))


def timed(fn: Callable[..., object]) -> float:  # a lambda n=n: ... too
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def model_bytes(model_path: Path) -> int:
    """Bytes on disk of the model: the .onnx file and the external data files its tensors name."""
    import onnx
    from onnx.external_data_helper import ExternalDataInfo, uses_external_data

    model_path = Path(model_path)
    model = onnx.load(str(model_path), load_external_data=False)
    tensors = [t for t in model.graph.initializer if uses_external_data(t)]
    locations = {ExternalDataInfo(t).location for t in tensors}
    return model_path.stat().st_size + sum((model_path.parent / loc).stat().st_size for loc in sorted(locations)
                                           if (model_path.parent / loc).is_file())
