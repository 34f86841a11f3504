"""The SmolLM2 section of the bench: its quality loop, its kernel census, its goals and its build records
(bench/llm_quality.py, kernels.py, llm_report.py, llm_builds.py)."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from cptquant.bench.clock import Clock
from cptquant.bench.genai_speed import GenaiSpeedSettings
from cptquant.bench.kernels import kernel_census, slow_paths
from cptquant.bench.llm_builds import BuildRecords, Made, VariantBuilder
from cptquant.bench.llm_peers import build_ort_nbits
from cptquant.bench.llm_quality import score_against_reference
from cptquant.bench.llm_report import goals
from cptquant.bench.llm_types import BUILDER_INT4, FP32, RULE, LlmResult, LlmVariant, RunSettings
from cptquant.model_loading import load_model
from cptquant.onnx_io.onnx_export import MODEL_FILE, export_onnx
from cptquant.runtimes.cpu import CpuAdapter
from cptquant.testing import save_tiny_model, tiny_llama


@pytest.fixture(scope="module")
def llama_onnx(tmp_path_factory):
    root = tmp_path_factory.mktemp("llm")
    loaded = load_model(str(save_tiny_model(tiny_llama(), root / "hf")))
    export_onnx(loaded, root / "fp32")
    int4 = build_ort_nbits(root / "fp32", root / "int4", "default", [])
    return root / "fp32" / MODEL_FILE, int4.path


def test_every_variant_is_scored_against_the_reference_on_the_same_windows(llama_onnx):
    fp32, int4 = llama_onnx
    adapter = CpuAdapter(threads=2)
    sessions = {FP32: adapter.session(fp32), "copy": adapter.session(fp32), "int4": adapter.session(int4)}
    ids = np.random.default_rng(0).integers(4, 1000, size=300)
    scores = score_against_reference(adapter, sessions, FP32, ids, window=64, stride=32, head_size=16, log=lambda m: None)
    assert scores["copy"]["kl_divergence"] == pytest.approx(0.0, abs=1e-9)
    assert scores["copy"]["top1_agreement"] == 1.0
    assert scores["copy"]["perplexity"] == pytest.approx(scores[FP32]["perplexity"])
    assert scores["int4"]["kl_divergence"] > 0
    assert scores["int4"]["tokens"] == scores[FP32]["tokens"] == 299  # every token but the first, once


def test_the_census_counts_ort_s_int4_layers_and_the_float_embedding(llama_onnx):
    fp32, int4 = llama_onnx
    assert set(kernel_census(fp32)) == {"MatMul FP32", "Gather FP32"}
    census = kernel_census(int4)
    assert census["MatMulNBits(4)"] == 15  # 2 layers x 7 projections + the LM head
    assert census["Gather FP32"] == 1  # ORT's quantizer leaves the embedding alone
    assert slow_paths(census) == 0


def test_the_census_names_a_weight_dequantized_on_every_call(tmp_path: Path):
    table = numpy_helper.from_array(np.ones((128, 64), dtype=np.int8), "table")
    scale = numpy_helper.from_array(np.ones((128,), dtype=np.float32), "scale")
    nodes = [helper.make_node("DequantizeLinear", ["table", "scale"], ["w"], axis=0),
             helper.make_node("Gather", ["w", "ids"], ["out"])]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("ids", TensorProto.INT64, [4])],
                              [helper.make_tensor_value_info("out", TensorProto.FLOAT, [4, 64])], [table, scale])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)]), tmp_path / "m.onnx")
    census = kernel_census(tmp_path / "m.onnx")
    assert census == {"DequantizeLinear(int8) -> Gather": 1}
    assert slow_paths(census) == 1


def _v(name, family, mb, kl, bits=None, dppl=0.1, decode=None, prefill=None) -> LlmVariant:
    speed = {k: v for k, v in (("decode_ms", decode), ("prefill_ms", prefill)) if v is not None}
    return LlmVariant(name, family, Path(name), int(mb * 1e6), bits,
                      quality={"perplexity": 10.0, "ppl_increase": dppl, "kl_divergence": kl, "top1_agreement": 0.9},
                      speed=speed)


def _run_settings() -> RunSettings:
    return {"tokens": 1000, "window": 512, "stride": 448, "calibration_samples": 32, "seq_len": 128,
            "ort_gptq_samples": 16, "speed": GenaiSpeedSettings(prefill_tokens=256), "eval_text": "test"}


def test_goals_name_the_peer_points_no_cptq_point_dominates():
    result = LlmResult([
        _v(FP32, FP32, 540, 0.0, decode=40.0, prefill=300.0),
        _v("cptq a", "cptq", 100, 0.10, bits=4.5, dppl=0.06, decode=15.0, prefill=310.0),
        _v(RULE, "cptq", 105, 0.20, bits=4.6),
        _v("peer dominated", "NNCF", 120, 0.30),
        _v("peer smaller", "ORT MatMulNBits", 90, 0.40),
        _v(BUILDER_INT4, "GenAI builder", 86, 0.25, decode=14.0)], {}, {}, {}, _run_settings())
    lines = "\n".join(goals(result))
    assert "Pareto (for every peer point (MB, KL) a cptq point with ≤ MB and ≤ KL): **not met** — 2 of 4" in lines
    assert "peer smaller (90.0 MB" in lines and "GenAI builder int4 (86.0 MB" in lines
    assert "cptq KL ≤ 0.7× the rule's (0.200): **met** — cptq a: 100.0 MB, KL 0.100 (0.50×)" in lines
    assert "≤ 4.5 average bits, Δ perplexity ≤ +7 % and KL ≤ 0.10: **met**" in lines
    assert "no cptq variant as small" in lines  # 100 MB > the builder's 86 MB: not met, whatever the speed
    assert "prefill (256 tokens, onnxruntime-genai) no slower than FP32: **not met** — cptq a 0.97×" in lines


def test_a_failed_build_is_kept_as_a_finding_and_reused_with_its_record(tmp_path: Path):
    model = tmp_path / "fp32" / MODEL_FILE
    model.parent.mkdir()
    model.write_bytes(b"onnx")

    def fails() -> Made:
        raise RuntimeError("no kernel for this\nsecond line")

    def never() -> Made:
        raise AssertionError("a recorded variant is not built again")

    first = VariantBuilder(BuildRecords(tmp_path, reuse=False), Clock(lambda m: None, "[test]"), model.parent,
                           log=lambda m: None)
    first.build(FP32, FP32, lambda: Made(model, {"ratio": 0.8}, 4.5))
    first.build("broken", "cptq", fails)
    assert [v.error for v in first.variants] == ["", "RuntimeError: no kernel for this"]
    assert set(json.loads((tmp_path / "builds.json").read_text())) == {FP32, "broken"}

    again = VariantBuilder(BuildRecords(tmp_path, reuse=True), Clock(lambda m: None, "[test]"), model.parent,
                           log=lambda m: None)
    again.build(FP32, FP32, never)
    again.build("broken", "cptq", never)
    fp32, broken = again.variants
    assert (fp32.path, fp32.average_bits) == (model, 4.5)
    assert fp32.settings == {"ratio": 0.8, "built": "in an earlier run (--reuse)"}
    assert broken.error == "RuntimeError: no kernel for this" and not broken.ok


def test_our_export_is_reused_only_with_the_same_options(tmp_path: Path):
    model = tmp_path / "fp32" / MODEL_FILE
    model.parent.mkdir()
    model.write_bytes(b"onnx")
    old, new = {"cptq-export": "--bits 4 --clip mse"}, {"cptq-export": "--bits 4"}
    built: list[str] = []

    def make(settings: dict[str, str]) -> Callable[[], Made]:
        return lambda: built.append(settings["cptq-export"]) or Made(model, settings, 4.0)

    first = VariantBuilder(BuildRecords(tmp_path, reuse=False), Clock(lambda m: None, "[test]"), model.parent,
                           log=lambda m: None)
    first.build("cptq --bits 4", "cptq", make(old), old)
    same = VariantBuilder(BuildRecords(tmp_path, reuse=True), Clock(lambda m: None, "[test]"), model.parent,
                          log=lambda m: None)
    same.build("cptq --bits 4", "cptq", make(old), old)
    changed = VariantBuilder(BuildRecords(tmp_path, reuse=True), Clock(lambda m: None, "[test]"), model.parent,
                             log=lambda m: None)
    changed.build("cptq --bits 4", "cptq", make(new), new)
    assert built == ["--bits 4 --clip mse", "--bits 4"]
    assert same.variants[0].settings["built"] == "in an earlier run (--reuse)"
    assert changed.variants[0].settings == new


def test_an_unmeasured_variant_is_written_with_empty_figures():
    written = LlmVariant("x", "cptq", Path("x/model.onnx"), error="not built").to_dict()
    assert (written["path"], written["quality"], written["speed"]) == ("x/model.onnx", {}, {})
