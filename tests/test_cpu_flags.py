"""runtimes/cpu.u8s8_gemm_saturates: which CPUs' int8 GEMM saturates full-range int8 weights (AVX2 without VNNI)."""

from __future__ import annotations

import builtins
import io

import pytest

from cptquant.runtimes import cpu


@pytest.mark.parametrize("text, saturates", [
    ("processor\t: 0\nflags\t\t: fpu sse2 avx avx2 fma\n", True),
    ("flags\t\t: avx2 avx512f avx512bw\n", True),  # AVX-512 without VNNI sums in int16 too
    ("flags\t\t: avx2 avx512f avx512_vnni\n", False),
    ("flags\t\t: avx2 avx_vnni\n", False),
    ("flags\t\t: avx2 avx512f amx_int8 amx_tile\n", False),
    ("Features\t: fp asimd crc32 atomics\n", False),  # ARM: no x86 flags line
    ("flags\t\t: sse2 sse4_2\n", False),  # no AVX2: another kernel, not this one's saturation
])
def test_the_flags_decide(monkeypatch, text, saturates):
    real_open = builtins.open
    monkeypatch.setattr(builtins, "open", lambda path, *a, **k: io.StringIO(text) if path == "/proc/cpuinfo"
                        else real_open(path, *a, **k))
    assert cpu.u8s8_gemm_saturates() is saturates


def test_no_cpuinfo_means_no_claim(monkeypatch):
    def missing(path, *args, **kwargs):
        raise OSError(path)

    monkeypatch.setattr(builtins, "open", missing)
    assert cpu.u8s8_gemm_saturates() is False
