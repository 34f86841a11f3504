"""The CPU execution provider: a fixed thread count so timings compare across runs and machines."""

from __future__ import annotations

import platform

import onnxruntime as ort

from .base import RuntimeAdapter

OPT_LEVELS = {
    "disable": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
    "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
    "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
    "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
}


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def u8s8_gemm_saturates() -> bool:
    """Whether ORT's uint8 x int8 GEMM on this CPU sums pairs of products in int16 and saturates on full-range
    int8 weights: x86 with AVX2 but no VNNI (`vpmaddubsw`). DynamicQuantizeMatMul's products are then wrong by
    up to ~18 % of the output (docs/ort-kernels.md, "DynamicQuantizeMatMul on CPUs without VNNI"). Read from
    /proc/cpuinfo: elsewhere (not Linux) False."""
    try:
        with open("/proc/cpuinfo") as f:
            flags = next((line.split(":", 1)[1].split() for line in f if line.startswith("flags")), [])
    except OSError:
        return False
    return "avx2" in flags and not {"avx512_vnni", "avx_vnni", "amx_int8"} & set(flags)


class CpuAdapter(RuntimeAdapter):
    name = "cpu"
    provider = "CPUExecutionProvider"
    output_device = "cpu"

    def __init__(self, threads: int = 2, optimization: str = "all"):
        if optimization not in OPT_LEVELS:
            raise ValueError(f"optimization must be one of {', '.join(OPT_LEVELS)}")
        self.threads = threads
        self.optimization = optimization

    def available(self) -> tuple[bool, str]:
        if self.provider not in ort.get_available_providers():  # pragma: no cover - every ORT build has it
            return False, "this onnxruntime build has no CPUExecutionProvider"
        return True, ""

    def session_options(self) -> ort.SessionOptions:
        options = super().session_options()
        # Both pools fixed: ORT's default takes every core, which on a shared machine makes timings noise.
        options.intra_op_num_threads = self.threads
        options.inter_op_num_threads = 1
        options.graph_optimization_level = OPT_LEVELS[self.optimization]
        # Variants are timed interleaved, several sessions alive at once: a session whose idle threads
        # spin-wait steals the cores from the one being timed (seen: 2 ms vs 30 ms for equal models).
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        return options

    def device_name(self) -> str:
        return f"CPU {_cpu_model()}, {self.threads} threads, CPUExecutionProvider (onnxruntime {ort.__version__})"
