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


@pytest.mark.parametrize("report, saturates, warned", [
    ({"weight_format": "dynamic"}, True, True),  # a report from before reduce_range: full range
    ({"weight_format": "dynamic", "reduce_range": False}, True, True),
    ({"weight_format": "dynamic", "reduce_range": True}, True, False),
    ({"weight_format": "dynamic", "reduce_range": False}, False, False),
    ({"weight_format": "qdq"}, True, False),
])
def test_verify_warns_when_the_export_s_int8_weights_saturate_here(monkeypatch, report, saturates, warned):
    from types import SimpleNamespace

    from cptquant.runtimes import verify

    monkeypatch.setattr(verify, "u8s8_gemm_saturates", lambda: saturates)
    line = verify._saturating_gemm(SimpleNamespace(report=report))
    assert (line is not None) is warned
    if warned:
        assert "--reduce-range" in line

