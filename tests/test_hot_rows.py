"""Hot rows: a 4-bit token embedding keeps the calibration text's tokens at 8 bits (passes/hot_rows.py)."""

from __future__ import annotations

from collections import Counter

import numpy as np
import onnxruntime as ort
import pytest
import torch

from cptquant.errors import CptqError
from cptquant.exporter.pipeline import export_quantized
from cptquant.layer_graph import build_layer_graph
from cptquant.model_loading import load_model
from cptquant.onnx_io.inputs import feeds_for
from cptquant.options import AnalysisOptions, CalibrationOptions
from cptquant.passes import plan_from_scores
from cptquant.passes.allocate import unit_bytes
from cptquant.passes.calibration import build_calibration
from cptquant.passes.common import quantized_weight, replaced_weights, weight_param
from cptquant.passes.hot_rows import MAX_HOT_FRACTION, hot_rows, input_embedding
from cptquant.plan import Plan, format_rows, parse_rows, uniform_plan
from cptquant.quant.storage import NODE_BYTES, WeightShape
from cptquant.testing import save_tiny_model, tiny_bert, tiny_opt

TABLE = "embeddings.word_embeddings"


@pytest.fixture(scope="module")
def bert(tmp_path_factory):
    return load_model(str(save_tiny_model(tiny_bert(), tmp_path_factory.mktemp("bert") / "model")))


@pytest.fixture(scope="module")
def calib(bert):
    return build_calibration(bert, samples=16, seq_len=32)


def test_rows_are_written_as_ranges_and_read_back():
    assert format_rows([9, 1, 2, 3, 5, 3]) == "1-3,5,9"
    assert parse_rows("1-3,5,9", "x") == [1, 2, 3, 5, 9]
    assert parse_rows([5, 1], "x") == [1, 5]
    for bad in ("1-x", 7, "-3"):
        with pytest.raises(CptqError):
            parse_rows(bad, "x")


def test_plan_json_round_trip_keeps_hot_rows_and_leaves_other_plans_unchanged(bert):
    graph = build_layer_graph(bert.model)
    plain = uniform_plan(graph, 4)
    assert "hot_rows" not in plain.to_json()
    plan = uniform_plan(graph, 4)
    plan.layers[TABLE].hot_rows = [0, 1, 2, 7]
    text = plan.to_json()
    assert '"hot_rows": "0-2,7"' in text
    assert Plan.from_json(text).layers[TABLE].hot_rows == [0, 1, 2, 7]


def test_hot_rows_are_the_most_frequent_calibration_tokens(bert, calib):
    graph = build_layer_graph(bert.model)
    rows = hot_rows(bert.model, graph, calib)
    assert list(rows) == [TABLE]
    counts = Counter()
    for batch in calib.batches:
        counts.update(batch["input_ids"][batch["attention_mask"].bool()].tolist())
    cap = int(graph[TABLE].out_features * MAX_HOT_FRACTION)
    hot = set(rows[TABLE])
    assert len(hot) == min(cap, len(counts)) and hot <= set(counts)
    assert min(counts[t] for t in hot) >= max((c for t, c in counts.items() if t not in hot), default=0)
    assert hot_rows(bert.model, graph, calib, tokenized=False) == {}


def test_a_tied_table_gets_the_calibration_tokens_then_the_lowest_ids_up_to_the_cap():
    """A table an LM head shares: every row is a logit on every token, so its hot rows fill the cap, with
    the calibration text's tokens first and then BPE's most frequent pieces (the lowest ids)."""
    model = tiny_opt()  # OPT ties the LM head to the token embedding
    graph = build_layer_graph(model)
    name = input_embedding(model, graph)
    assert name == "model.decoder.embed_tokens"

    class Calibration:  # two short batches with a frequent token (7) and a rare high id (990)
        batches = [{"input_ids": torch.tensor([[7, 7, 990, 7]]), "attention_mask": torch.ones(1, 4)},
                   {"input_ids": torch.tensor([[7, 12, 12, 0]]), "attention_mask": torch.tensor([[1, 1, 1, 0]])}]

    rows = hot_rows(model, graph, Calibration())[name]
    cap = int(graph[name].out_features * MAX_HOT_FRACTION)
    filler = [i for i in range(cap) if i not in (7, 12, 990)][: cap - 3]
    assert rows == sorted([7, 12, 990] + filler) and len(rows) == cap


def test_plan_from_scores_gives_hot_rows_to_4_bit_tables_and_counts_their_bytes(bert):
    graph = build_layer_graph(bert.model)
    scores = {layer.name: 1.0 for layer in graph.layers}
    options = AnalysisOptions.from_fields(target_bits=4.0)
    plan = plan_from_scores(graph, scores, "tdmpq", options, "tiny", hot_rows={TABLE: [3, 4]})
    assert plan.layers[TABLE].bits == 4 and plan.layers[TABLE].hot_rows == [3, 4]
    eight = plan_from_scores(graph, scores, "tdmpq", AnalysisOptions.from_fields(target_bits=8.0), "tiny", hot_rows={TABLE: [3]})
    assert eight.layers[TABLE].hot_rows is None  # an 8-bit table has no use for them
    table = graph[TABLE]
    with_hot = unit_bytes([WeightShape(table.in_features, table.out_features, table=True, hot_rows=2)], 4, 32)
    without = unit_bytes([WeightShape(table.in_features, table.out_features, table=True)], 4, 32)
    assert with_hot > without


def test_export_stores_hot_rows_at_8_bits_as_the_passes_model_them(bert, calib, tmp_path):
    graph = build_layer_graph(bert.model)
    rows = hot_rows(bert.model, graph, calib)[TABLE]

    def plan_of(_loaded, g) -> Plan:
        plan = uniform_plan(g, 16)
        plan.layers[TABLE].bits = 4
        plan.layers[TABLE].hot_rows = rows  # symmetric: the passes' torch quantizer is symmetric too
        return plan

    result = export_quantized(bert, plan_of, tmp_path / "out", progress=False)
    entry = result.report.to_dict()["layers"][TABLE]
    assert entry["kernels"] == ["GatherBlockQuantized", "GatherBlockQuantized"] and entry["hot_rows"] == len(rows)
    assert result.report.graph_check["kernels"] == {"GatherBlockQuantized(bits=4)": 1,
                                                       "GatherBlockQuantized(bits=8)": 1}
    table = graph[TABLE]
    shape = WeightShape(table.in_features, table.out_features, table=True, hot_rows=len(rows))
    # The allocator's byte count is what the file holds (names and nodes aside).
    predicted = unit_bytes([shape], 4, 32, "never") - 5 * NODE_BYTES  # the unit's and the lookup's nodes
    assert entry["bytes_after"] == predicted

    session = ort.InferenceSession(str(result.paths.model), providers=["CPUExecutionProvider"])
    ids = np.array([rows[:12] + [r for r in range(1000) if r not in rows][:12]], dtype=np.int64)  # hot and cold
    onnx_out = session.run(["last_hidden_state"], feeds_for(session, ids))[0]
    layer = graph[TABLE]
    param = weight_param(bert.model, layer)
    torch_ids = {"input_ids": torch.from_numpy(ids), "attention_mask": torch.ones_like(torch.from_numpy(ids))}
    outputs = {}
    for name, hot_list in (("hot", rows), ("all 4-bit", None)):
        with torch.no_grad(), replaced_weights(bert.model, {param: quantized_weight(bert.model, layer, 4, 32,
                                                                                     "absmax", hot_list)}):
            outputs[name] = bert.model(**torch_ids).last_hidden_state.numpy()
    error_hot = np.abs(onnx_out - outputs["hot"]).max()
    error_all4 = np.abs(onnx_out - outputs["all 4-bit"]).max()
    assert error_hot < 1e-2 and error_hot < error_all4 / 10


def test_cli_uniform_4_bits_has_hot_rows_unless_turned_off(bert, tmp_path):
    from typer.testing import CliRunner

    from cptquant.cli import export_app

    folder = str(bert.source)
    plans = {}
    for flag in ("--hot-rows", "--no-hot-rows"):
        out = tmp_path / flag.strip("-")
        result = CliRunner().invoke(export_app, [folder, "--bits", "4", "--algorithm", "rtn", "--no-verify",
                                                 "--no-progress", flag, "-o", str(out)])
        assert result.exit_code == 0, result.output
        plans[flag] = Plan.load(out / "model.plan.json")
    assert plans["--hot-rows"].layers[TABLE].hot_rows  # the tiny tokenizer's calibration tokens
    assert all(lp.hot_rows is None for lp in plans["--no-hot-rows"].layers.values())


def test_untied_decoder_gets_hot_rows_and_still_generates_with_optimum(tmp_path):
    from optimum.onnxruntime import ORTModelForCausalLM

    from cptquant.passes.hot_rows import calibration_hot_rows, with_hot_rows
    from cptquant.testing import tiny_llama

    llama = load_model(str(save_tiny_model(tiny_llama(), tmp_path / "llama")))
    options = CalibrationOptions(calib_samples=16, seq_len=32)

    def plan_of(loaded, graph) -> Plan:
        return with_hot_rows(uniform_plan(graph, 4), calibration_hot_rows(loaded, graph, options))

    result = export_quantized(llama, plan_of, tmp_path / "out", progress=False)
    assert result.report.to_dict()["layers"]["model.embed_tokens"]["hot_rows"] > 0
    assert result.report.graph_check["kernels"]["GatherBlockQuantized(bits=8)"] == 1
    prompt = torch.tensor([[1, 5, 9]])
    generated = ORTModelForCausalLM.from_pretrained(tmp_path / "out").generate(prompt, max_new_tokens=4,
                                                                               min_new_tokens=4, do_sample=False)
    assert generated.shape == (1, 7)


def test_a_table_whose_every_row_is_hot_is_an_8_bit_table(bert, tmp_path):
    def plan_of(_loaded, g) -> Plan:
        plan = uniform_plan(g, 16)
        plan.layers[TABLE].bits = 4
        plan.layers[TABLE].hot_rows = list(range(g[TABLE].out_features))
        return plan

    result = export_quantized(bert, plan_of, tmp_path / "out", progress=False)
    assert result.report.graph_check["kernels"] == {"GatherBlockQuantized(bits=8)": 1}
