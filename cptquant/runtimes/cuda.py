"""The CUDA execution provider, driven through IO binding.

Inputs are copied to the GPU once per call and outputs stay there (`run_bound`), so a decode loop
passes the KV cache from one step to the next on the device. Feeds take the dtype the session
declares (`inputs.feeds_for`), so a model with FP16 inputs gets FP16 arrays; the exporter's FP16
baseline keeps FP32 inputs and outputs and converts inside the graph. Nodes the CUDA EP has no
kernel for fall back to the CPU EP, as ONNX Runtime does by default.
"""

from __future__ import annotations

import functools
import shutil
import subprocess
import warnings
from typing import Any

import numpy as np
import onnxruntime as ort
from onnx import TensorProto, helper

from ..errors import first_line
from .base import RuntimeAdapter

PROVIDER = "CUDAExecutionProvider"


@functools.cache
def _probe(device_id: int) -> tuple[bool, str]:
    """onnxruntime-gpu lists the CUDA EP even on a machine without a GPU; only a session tells."""
    if PROVIDER not in ort.get_available_providers():
        return False, ("this onnxruntime build has no CUDAExecutionProvider "
                       f"(installed: onnxruntime {ort.__version__}; install onnxruntime-gpu for CUDA)")
    node = helper.make_node("Identity", ["x"], ["y"])
    graph = helper.make_graph([node], "probe", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    options = ort.SessionOptions()
    options.log_severity_level = 4
    # Without a GPU or its libraries ORT logs "[E:onnxruntime:Default ...] Failed to create
    # CUDAExecutionProvider ..." on its default logger and warns from Python before falling back to the
    # CPU: the skip must be our one line, so both are silenced for the probe (then ORT's default, warnings).
    ort.set_default_logger_severity(4)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            session = ort.InferenceSession(model.SerializeToString(), sess_options=options,
                                           providers=[(PROVIDER, {"device_id": device_id})])
    except Exception as exc:  # a missing CUDA/cuDNN library raises here on some releases
        return False, f"onnxruntime-gpu could not start on GPU {device_id} ({first_line(exc, type(exc).__name__)})"
    finally:
        ort.set_default_logger_severity(2)
    if PROVIDER not in session.get_providers():
        return False, (f"onnxruntime-gpu is installed but GPU {device_id} is not usable "
                       "(no GPU, or CUDA/cuDNN libraries not found)")
    return True, ""


def _gpu_name(device_id: int) -> str:
    if shutil.which("nvidia-smi"):
        try:
            names = subprocess.run(["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"], capture_output=True,
                                   text=True, timeout=10).stdout.splitlines()
            if device_id < len(names):
                return names[device_id].strip()
        except (OSError, subprocess.SubprocessError):
            pass
    return f"GPU {device_id}"


class CudaAdapter(RuntimeAdapter):
    name = "cuda"
    provider = PROVIDER
    output_device = "cuda"

    def __init__(self, device_id: int = 0):
        self._device_id = device_id

    def device_id(self) -> int:
        return self._device_id

    def available(self) -> tuple[bool, str]:
        return _probe(self._device_id)

    def providers(self) -> list[str | tuple[str, dict[str, Any]]]:
        return [(PROVIDER, {"device_id": self._device_id}), "CPUExecutionProvider"]

    def to_device(self, array: np.ndarray) -> ort.OrtValue:
        return ort.OrtValue.ortvalue_from_numpy(np.ascontiguousarray(array), "cuda", self._device_id)

    def device_name(self) -> str:
        return f"{_gpu_name(self._device_id)}, CUDAExecutionProvider (onnxruntime {ort.__version__})"

