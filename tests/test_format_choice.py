"""`--format auto` (cptquant/format_choice.py): the format is measured for encoders, fixed for decoders,
and what was measured is in the report. Which format wins is the machine's answer, not asserted."""

from __future__ import annotations

import pytest

from cptquant import format_choice
from cptquant.exporter.pipeline import export_quantized
from cptquant.format_choice import CANDIDATES, SHAPES, format_chooser
from cptquant.model_loading import wrap_model
from cptquant.plan import uniform_plan
from cptquant.quant.storage import FORMAT_AUTO, FORMAT_QDQ
from cptquant.runtimes import cpu
from cptquant.runtimes.cpu import u8s8_gemm_saturates
from cptquant.testing import tiny_bert, tiny_opt


@pytest.fixture(autouse=True)
def _few_texts(monkeypatch):
    """The probes are scored on calibration text; building the offline corpus is not what these tests test."""
    monkeypatch.setattr(format_choice, "calibration_texts", lambda _calibration: [
        "a short sentence to encode", "another line of text for the probe", "numbers 1 2 3 and words"])


def _export(model, out, reduce_range=False):
    return export_quantized(wrap_model(model), lambda _l, graph: uniform_plan(graph, 8), out / "model.onnx",
                            progress=False, fmt=FORMAT_AUTO, outlier_ratio=0, reduce_range=reduce_range,
                            choose_format=format_chooser(reduce_range=reduce_range))  # no calibration pass


def test_an_encoder_gets_the_measured_fastest_format_and_the_report_says_why(tmp_path):
    result = _export(tiny_bert(), tmp_path / "bert")
    choice = result.report.format_choice
    assert choice["measured"] and choice["format"] in CANDIDATES
    assert result.report.weight_format == choice["format"]
    shapes = {f"b{b}_s{s}" for b, s in SHAPES}
    assert set(choice["p50_ms"]) == {"fp32", *CANDIDATES}
    assert all(set(by_shape) <= shapes and by_shape for by_shape in choice["p50_ms"].values())
    assert all(ms > 0 for by_shape in choice["p50_ms"].values() for ms in by_shape.values())
    fastest = max(choice["speedup_vs_fp32"], key=choice["speedup_vs_fp32"].get)
    saturates = u8s8_gemm_saturates()  # full-range int8 weights give wrong products on such a CPU: left out there
    eligible = [f for f in CANDIDATES if choice["probe_cosine"][f] >= 0.99 and not (saturates and f == "dynamic")]
    assert choice["format"] == (fastest if fastest in eligible else max(eligible, key=choice["speedup_vs_fp32"].get))
    assert choice["format"] in choice["reason"]
    kernels = result.report.graph_check["kernels"]
    wanted = "DynamicQuantizeMatMul" if choice["format"] == "dynamic" else "MatMulNBits"
    assert any(k.startswith(wanted) for k in kernels), kernels  # the export really runs the chosen kernel


def test_a_cpu_whose_int8_gemm_saturates_never_gets_full_range_dynamic_weights(tmp_path, monkeypatch):
    monkeypatch.setattr(cpu, "u8s8_gemm_saturates", lambda: True)
    choice = _export(tiny_bert(), tmp_path / "bert").report.format_choice
    assert choice["measured"] and choice["format"] == FORMAT_QDQ
    assert "dynamic left out: this CPU's int8 GEMM saturates" in choice["reason"]


def test_with_reduced_range_the_dynamic_probe_is_measured_as_the_export_writes_it(tmp_path, monkeypatch):
    """With ±63 weights (what `cptq-export` writes on such a CPU) dynamic is a candidate again, probed as written."""
    monkeypatch.setattr(cpu, "u8s8_gemm_saturates", lambda: True)
    result = _export(tiny_bert(), tmp_path / "bert", reduce_range=True)
    choice = result.report.format_choice
    assert choice["measured"] and "left out" not in choice["reason"]
    assert "dynamic measured with its int8 weights within ±63" in choice["reason"]
    assert result.report.reduce_range is (True if choice["format"] == "dynamic" else None)


def test_a_decoder_keeps_matmulnbits_without_measuring(tmp_path):
    result = _export(tiny_opt(), tmp_path / "opt")
    choice = result.report.format_choice
    assert choice["format"] == FORMAT_QDQ == result.report.weight_format
    assert not choice["measured"] and "decode" in choice["reason"]


def test_a_model_whose_positions_start_after_the_padding_id_is_probed_within_its_table(tmp_path):
    """RoBERTa-like position ids start at pad_token_id + 1: probing at max_position_embeddings tokens would
    read past the table (ORT: Gather index out of bounds)."""
    from cptquant.tiny_families import FAMILIES

    result = _export(FAMILIES["roberta"].build(), tmp_path / "roberta")
    choice = result.report.format_choice
    assert choice["measured"] and choice["format"] in CANDIDATES
    lengths = {int(key.split("_s")[1]) for key in choice["p50_ms"]["fp32"]}
    assert 16 in lengths and max(lengths) < 128, lengths  # 1x128 and 8x128 shortened to what the table serves


def test_an_encoder_over_2_gb_is_probed_from_its_external_weights(tmp_path, monkeypatch):
    """The large-model path (forced on a tiny model): the format probes are lowered from the FP32 export's
    external data (the export is not loaded whole), the same probes as from memory."""
    from test_streaming import _external_fp32_export

    in_memory = _export(tiny_bert(), tmp_path / "memory").report.format_choice
    _external_fp32_export(monkeypatch)
    streamed = _export(tiny_bert(), tmp_path / "streamed").report.format_choice
    assert streamed["measured"] and streamed["probe_cosine"] == in_memory["probe_cosine"]
