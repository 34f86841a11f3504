"""Sensitivity passes and bit allocation, on tiny randomly initialised models (offline, fast)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import typer
from transformers import BertConfig, BertModel, GPT2Config, GPT2LMHeadModel
from typer.testing import CliRunner

from cptquant.commands.analyze import analyze as analyze_command
from cptquant.errors import CptqError
from cptquant.layer_graph import build_layer_graph
from cptquant.model_loading import load_model, wrap_model
from cptquant.options import AnalysisOptions, CalibrationOptions
from cptquant.passes import analyze, plan_from_scores
from cptquant.passes.allocate import budget_bits, cluster_bits, khm_cluster, unit_bytes
from cptquant.passes.calibration import build_calibration
from cptquant.passes.cmpq import cmpq_scores
from cptquant.passes.common import allocation_units
from cptquant.passes.pmpq import pmpq_scores
from cptquant.passes.task_loss import TaskLoss
from cptquant.quant.storage import WeightShape

torch.set_num_threads(1)
FAST = dict(calib_samples=16, seq_len=32)


from cptquant.testing import tiny_opt  # noqa: E402


def tiny_bert():
    # Smaller vocabulary and positions than cptquant.testing's: the ranking tests below were set on these.
    torch.manual_seed(0)
    return BertModel(BertConfig(vocab_size=500, hidden_size=64, num_hidden_layers=2, intermediate_size=128,
                                num_attention_heads=4, max_position_embeddings=64))


def tiny_gpt2():
    torch.manual_seed(0)
    return GPT2LMHeadModel(GPT2Config(vocab_size=500, n_embd=64, n_layer=2, n_head=4, n_positions=64))


def rank_of(scores: dict[str, float], name: str) -> int:
    return sorted(scores, key=scores.get, reverse=True).index(name)


@pytest.mark.parametrize("make, layer", [(tiny_bert, "encoder.layer.1.output.dense"),
                                         (tiny_gpt2, "transformer.h.1.attn.c_proj")])
def test_layer_scaled_by_ten_becomes_more_sensitive(make, layer):
    ranks = {}
    for scale in (1, 10):
        model = make()
        with torch.no_grad():
            model.get_submodule(layer).weight.mul_(scale)
        result = analyze(wrap_model(model), build_layer_graph(model), ("cmpq", "pmpq", "tdmpq"), AnalysisOptions.from_fields(**FAST),
                         validate=True, progress=False)
        ranks[scale] = {m: rank_of(s, layer) for m, s in {**result.scores, "oracle": result.oracle}.items()}
    for method in ("cmpq", "pmpq", "tdmpq", "oracle"):
        # CMPQ is relative (1 - CKA): on BERT it ranked the layer near the top at both scales, so only "lands".
        if method != "cmpq":
            assert ranks[10][method] < ranks[1][method], (method, ranks)
        # ...and lands where the measured damage puts it, not merely higher than before.
        assert abs(ranks[10][method] - ranks[10]["oracle"]) <= 2, (method, ranks)
    assert abs(ranks[10]["tdmpq"] - ranks[10]["oracle"]) <= 1, ranks  # the closest of the three


def test_methods_agree_with_oracle_on_encoder():
    model = tiny_bert()
    result = analyze(wrap_model(model), build_layer_graph(model), ("cmpq", "pmpq", "tdmpq"),
                     AnalysisOptions.from_fields(**FAST), validate=True, progress=False)
    assert result.spearman["pmpq"] > 0.7 and result.spearman["tdmpq"] > 0.7, result.spearman
    assert set(result.cost_fpe) == {"cmpq", "pmpq", "tdmpq", "oracle"}
    assert all(cost > 0 for cost in result.cost_fpe.values())


def with_rounding_outliers(model: torch.nn.Module, producer: str, consumer: str) -> str:
    """Make the FFN's second linear (`consumer`) lose its whole function at 4 bits and nothing at FP32.

    One channel per 32 of the first linear (`producer`) is switched off (zero weights, bias -10: ReLU
    and GELU give 0), and the consumer reads that channel with a weight 100x its block's largest: the
    output is unchanged, but at 4 bits every other weight of the consumer rounds to zero.
    """
    first, second = model.get_submodule(producer), model.get_submodule(consumer)
    with torch.no_grad():
        first.weight[::32] = 0
        first.bias[::32] = -10
        blocks = second.weight.view(second.weight.shape[0], -1, 32)  # quantization blocks run along the input
        blocks[:, :, 0] = 100 * blocks.abs().amax(-1)
    return consumer


@pytest.mark.parametrize("variant", ["cka", "cca", "svcca", "pwcca"])
def test_cmpq_scores_are_finite_deterministic_and_find_a_damaged_layer(variant):
    model = tiny_opt()
    damaged = with_rounding_outliers(model, "model.decoder.layers.0.fc1", "model.decoder.layers.0.fc2")
    loaded = wrap_model(model)
    graph = build_layer_graph(model)
    calib = build_calibration(loaded, **{"samples": 16, "seq_len": 32})
    for granularity in ("layer", "block"):
        first = cmpq_scores(model, graph, calib, granularity, variant, progress=False)
        assert first == cmpq_scores(model, graph, calib, granularity, variant, progress=False)
        assert all(np.isfinite(v) and v >= 0 for v in first.values()), first
        expected = damaged if granularity == "layer" else "block.0"
        assert rank_of(first, expected) == 0, first


def test_pmpq_matched_scores_are_finite_deterministic_and_find_a_damaged_layer():
    # An encoder: its loss (cosine to the FP32 output) rises with any change, where a random LM's may fall.
    model = tiny_bert()
    damaged = with_rounding_outliers(model, "encoder.layer.0.intermediate.dense", "encoder.layer.0.output.dense")
    loaded = wrap_model(model)
    graph = build_layer_graph(model)
    calib = build_calibration(loaded, samples=16, seq_len=32)
    first = pmpq_scores(loaded, graph, calib, progress=False)
    assert first == pmpq_scores(loaded, graph, calib, progress=False)
    assert all(np.isfinite(v) for v in first.values()), first
    # First of the block layers, by far (a random BERT's 4-bit embeddings hurt more still; the oracle agrees).
    in_blocks = {name: v for name, v in first.items() if name.startswith("encoder.")}
    runner_up = max(v for name, v in in_blocks.items() if name != damaged)
    assert rank_of(in_blocks, damaged) == 0 and in_blocks[damaged] > 10 * runner_up, first


def test_pmpq_restores_weights_bitwise_and_prunes_tied_parameter_once():
    model = tiny_opt()
    loaded = wrap_model(model)
    graph = build_layer_graph(model)
    assert graph["lm_head"].tied_to == "model.decoder.embed_tokens"
    before = {name: p.detach().clone() for name, p in model.state_dict().items()}
    calib = build_calibration(loaded, samples=8, seq_len=16)
    for sparsities in ((0.2, 0.5), ()):  # fixed fractions, and matched to the 4-bit error
        scores = pmpq_scores(loaded, graph, calib, sparsities, progress=False)
        assert "lm_head" not in scores and "model.decoder.embed_tokens" in scores
        for name, tensor in model.state_dict().items():
            assert torch.equal(tensor, before[name]), name


def test_khm_orders_clusters_by_centre_whatever_the_labels():
    values = np.array([5.0, 0.1, 2.0, 0.12, 5.2, 2.1, 0.09, 4.9])
    for seed in range(3):
        centres, ranks = khm_cluster(values, 3, seed=seed)
        assert list(centres) == sorted(centres, reverse=True)
        assert set(ranks[[0, 4, 7]]) == {0} and set(ranks[[2, 5]]) == {1} and set(ranks[[1, 3, 6]]) == {2}
    scores = {f"l{i}": float(v) for i, v in enumerate(values)}
    bits, _ = cluster_bits(scores, (4, 16, 8))  # the order the widths are given in does not matter
    assert bits["l0"] == bits["l4"] == 16 and bits["l2"] == 8 and bits["l1"] == 4


def test_khm_handles_duplicates_and_ties():
    centres, ranks = khm_cluster(np.array([1.0, 1.0, 1.0, 3.0]), 3)
    assert list(ranks) == [1, 1, 1, 0] and list(centres) == [3.0, 1.0]
    bits, _ = cluster_bits({"a": 0.0, "b": 0.0, "c": 0.0}, (16, 8, 4))
    assert len(set(bits.values())) == 1


@pytest.mark.parametrize("target", [4.0, 5.5, 8.0, 12.3, 16.0])
def test_target_bits_budget_is_met_and_spent_on_sensitive_layers(target):
    rng = np.random.default_rng(1)
    scores = {f"l{i}": float(s) for i, s in enumerate(rng.lognormal(size=20))}
    params = {f"l{i}": int(p) for i, p in enumerate(rng.integers(1000, 50000, size=20))}
    bits = budget_bits(scores, params, (16, 8, 4), target_bits=target)
    average = sum(params[n] * bits[n] for n in bits) / sum(params.values())
    assert average <= target + 1e-9
    assert average > target - 4  # the greedy does not leave a whole width unused
    by_bits = {b: np.mean([scores[n] for n in bits if bits[n] == b]) for b in set(bits.values())}
    # More bits go to more sensitive layers on average.
    assert all(by_bits[hi] >= by_bits[lo] for hi in by_bits for lo in by_bits if hi > lo), by_bits


def test_size_budget_counts_scales_and_fixed_params_and_is_never_exceeded():
    scores = {"a": 1.0, "b": 0.5, "c": 0.01}
    params = {"a": 4096, "b": 4096, "c": 4096}
    weights = {name: [WeightShape(64, 64)] for name in scores}
    fixed = 1000
    for limit_mb in (0.0136, 0.015, 0.02, 0.03):
        bits = budget_bits(scores, params, (16, 8, 4), max_size_mb=limit_mb, block_size=32, fixed_bytes=4 * fixed,
                           weights=weights)
        size = sum(unit_bytes(weights[n], bits[n], 32) for n in bits) + 4 * fixed  # biases/norms stay FP32
        assert size <= limit_mb * 1e6
    with pytest.raises(CptqError, match="cannot be met"):
        budget_bits(scores, params, (16, 8, 4), max_size_mb=0.005, fixed_bytes=4 * fixed, weights=weights)


def test_a_budget_needs_a_target_or_a_size():
    # Neither given used to fail on `None * MB` (a TypeError) instead of saying what is missing.
    with pytest.raises(ValueError, match="target_bits or max_size_mb"):
        budget_bits({"a": 1.0}, {"a": 4096}, (16, 8, 4))


def test_plan_is_byte_identical_for_same_seed_and_respects_granularity():
    model = tiny_gpt2()
    graph = build_layer_graph(model)
    jsons = []
    for _ in range(2):
        options = AnalysisOptions.from_fields(granularity="block", **FAST)
        result = analyze(wrap_model(model), graph, ("cmpq",), options, progress=False)
        jsons.append(plan_from_scores(graph, result.scores["cmpq"], "cmpq", options, "tiny").to_json())
    assert jsons[0] == jsons[1]
    plan = json.loads(jsons[0])
    for layers in graph.blocks().values():
        assert len({plan["layers"][layer.name]["bits"] for layer in layers}) == 1
    assert plan["layers"]["lm_head"]["bits"] == plan["layers"]["transformer.wte"]["bits"]  # tied


def test_calibration_from_files_and_its_errors(tmp_path):
    from transformers import AutoTokenizer

    from cptquant.model_loading import embedded_model_path

    tokenizer = AutoTokenizer.from_pretrained(embedded_model_path())
    loaded = wrap_model(tiny_bert(), tokenizer=tokenizer)
    lines = tmp_path / "calib.txt"
    lines.write_text("\n".join(f"Sentence number {i} talks about quantization of weights." for i in range(12)))
    calib = build_calibration(loaded, str(lines), samples=10, seq_len=16)
    assert calib.num_samples == 10 and all(b["input_ids"].shape[1] <= 16 for b in calib.batches)
    records = tmp_path / "calib.jsonl"
    records.write_text("\n".join(json.dumps({"body": f"Record {i} has some text in it."}) for i in range(9)))
    assert build_calibration(loaded, str(records), "body", samples=64, seq_len=16).num_samples == 9
    offline = build_calibration(loaded, None, samples=16, seq_len=32)
    assert offline.num_tokens > 16 * 16  # packed sentences fill most of each sample

    empty = tmp_path / "empty.txt"
    empty.write_text("\n\n")
    few = tmp_path / "few.txt"
    few.write_text("One sentence that is long enough.\nAnother sentence that is long enough.\n")
    bad_cases = [
        (dict(calib=str(empty)), "is empty"),
        (dict(calib=str(few)), "at least 8"),
        (dict(calib=str(tmp_path / "missing.txt")), "not found"),
        (dict(calib=str(records), text_field="text"), "no text field 'text'"),
        (dict(seq_len=4096), "above the model's 64 positions"),
        (dict(calib="hf:only-a-name"), "hf:NAME:SPLIT"),
        (dict(calib="hf:::"), "must not be empty"),
        (dict(calib=str(tmp_path)), "is a folder; give a text or JSONL file"),
    ]
    for kwargs, message in bad_cases:
        with pytest.raises(CptqError, match=message):
            build_calibration(loaded, **{"samples": 16, "seq_len": 16, **kwargs})


@pytest.mark.parametrize("options, message", [
    (dict(sparsity=(0.0,)), "strictly between 0 and 1"),
    (dict(sparsity=(1.5,)), "strictly between 0 and 1"),
    (dict(bit_widths=(3, 8)), "bit widths"),
    (dict(granularity="head"), "granularity"),
    (dict(cca="kcca"), "CCA variant"),
    (dict(target_bits=6.0, max_size_mb=1.0), "not both"),
    (dict(block_size=24), "block size"),
    (dict(calib_samples=2), "at least 8"),
])
def test_bad_options_raise_clear_errors(options, message):
    model = tiny_bert()
    with pytest.raises(CptqError, match=message):
        analyze(wrap_model(model), build_layer_graph(model), ("cmpq",), AnalysisOptions.from_fields(**options), progress=False)


def test_unknown_method_and_unreachable_target_bits():
    model = tiny_bert()
    graph = build_layer_graph(model)
    with pytest.raises(CptqError, match="unknown method 'kmeans'"):
        analyze(wrap_model(model), graph, ("kmeans",), AnalysisOptions(), progress=False)
    scores = {unit: 1.0 for unit in allocation_units(graph, "layer")}
    with pytest.raises(CptqError, match=r"outside \[4, 16\]"):
        plan_from_scores(graph, scores, "cmpq", AnalysisOptions.from_fields(target_bits=2.0), "tiny")
    with pytest.raises(CptqError, match="no entry for"):
        plan_from_scores(graph, {}, "cmpq", AnalysisOptions(), "tiny")


def _cli_app() -> typer.Typer:
    app = typer.Typer()
    app.command("analyze")(analyze_command)
    app.command("noop")(lambda: None)  # two commands, so "analyze" is a subcommand as in cptq
    return app


def test_cli_analyze_writes_scores_plot_and_plans(tmp_path):
    folder = tmp_path / "tiny-gpt2"
    tiny_gpt2().save_pretrained(folder)
    out = tmp_path / "out"
    result = CliRunner().invoke(_cli_app(), ["analyze", str(folder), "--method", "all", "--validate",
                                             "-o", str(out), "--calib-samples", "8", "--seq-len", "16",
                                             "--target-bits", "6", "--no-progress"])
    assert result.exit_code == 0, result.output
    report = json.loads((out / "scores.json").read_text())
    assert set(report["scores"]) == {"cmpq", "pmpq", "tdmpq"} and set(report["spearman"]) == set(report["scores"])
    assert (out / "scores.png").stat().st_size > 1000
    assert "Spearman vs oracle" in result.output
    plan = json.loads((out / "plan-tdmpq.json").read_text())
    assert plan["meta"]["average_bits"] <= 6


def test_cli_analyze_rejects_bad_input(tmp_path):
    for args, message in [(["--method", "magic"], "unknown method 'magic'"),
                          (["--sparsity", "0.3,1.2"], "strictly between 0 and 1"),
                          (["--sparsity", "a,b"], "not a comma-separated list")]:
        result = CliRunner().invoke(_cli_app(), ["analyze", *args, "-o", str(tmp_path)])
        assert isinstance(result.exception, CptqError) and message in str(result.exception), result.output


def test_default_model_loads_offline():
    loaded = load_model(None)
    assert build_layer_graph(loaded.model).num_blocks == 6


def test_offline_calibration_never_sees_evaluation_text():
    from cptquant.corpus import calibration_sentences, evaluation_sentences
    from cptquant.passes.calibration import load_texts

    calibration, _ = load_texts(None, seq_len=128)
    pool = calibration_sentences()
    held_out = evaluation_sentences()
    assert len(held_out) >= 400 and not set(pool) & set(held_out)
    # The packed calibration samples are consecutive sentences of the calibration pool, nothing else.
    assert " ".join(pool).startswith(" ".join(calibration))


@pytest.mark.parametrize("make", [tiny_opt, tiny_bert, tiny_gpt2])
@pytest.mark.parametrize("granularity", ["layer", "block"])
def test_block_replay_gives_the_scores_of_full_passes(make, granularity):
    from cptquant.passes.block_replay import BlockReplay
    from cptquant.passes.oracle import oracle_scores

    model = make()
    model.eval()
    loaded, graph = wrap_model(model), build_layer_graph(model)
    calib = build_calibration(loaded, samples=8, seq_len=16)
    loss = TaskLoss(loaded, calib)
    full = BlockReplay(model, graph, loss, granularity, budget_bytes=0)  # keeps nothing: full passes
    assert full.kept == [] and set(full.unit_start.values()) == {-1}
    for budget in (None, 1):  # everything kept; then only the last block (the thinnest spacing)
        per_block = sum(b["input_ids"].numel() for b in loss.inputs) * model.config.hidden_size * 4
        replay = BlockReplay(model, graph, loss, granularity, budget_bytes=None if budget is None else per_block)
        assert replay.base_loss == full.base_loss
        if budget is None:
            assert replay.kept == list(range(graph.num_blocks)) and max(replay.unit_start.values()) >= 0
        # The oracle's scores; PMPQ replays its own calibration subset through the same class.
        assert oracle_scores(model, graph, calib, loss, granularity=granularity, replay=replay, progress=False) == \
            oracle_scores(model, graph, calib, loss, granularity=granularity, replay=full, progress=False)


def test_pass_memory_probe_reports_the_peak_of_a_pass(tmp_path):
    from cptquant.bench.pass_memory import measure
    from cptquant.testing import save_tiny_model

    folder = save_tiny_model(tiny_opt(), tmp_path / "tiny-opt")
    result = measure(str(folder), "tdmpq", "layer", 8, 16)
    if result is None:
        pytest.skip("needs Linux /proc")
    assert result["model_bytes"] > 0 and result["activation_bytes"] >= 0 and result["peak_bytes"] > 0
    assert result["within_goal"] == (result["peak_bytes"] <= result["model_bytes"] + result["activation_bytes"])


def test_lm_loss_is_kl_from_fp32_zero_at_fp32_and_exact_when_top_k_covers_the_vocabulary(monkeypatch):
    import torch.nn.functional as F

    from cptquant.passes import task_loss

    model = tiny_gpt2().eval()
    loaded = wrap_model(model)
    calib = build_calibration(loaded, samples=8, seq_len=16)
    monkeypatch.setattr(task_loss, "REFERENCE_TOP_K", model.config.vocab_size)
    loss = TaskLoss(loaded, calib)
    assert loss.has_zero_gradient_at_reference()
    assert abs(loss.evaluate(model)) < 1e-6
    reference = [model(**batch).logits.detach() for batch in calib.batches]
    with torch.no_grad():
        model.lm_head.weight.add_(0.05 * torch.randn_like(model.lm_head.weight))
    for index, batch in enumerate(calib.batches):
        keep = loss._lm_labels(index).flatten() != -100
        p = F.log_softmax(reference[index].flatten(0, 1)[keep], -1)
        q = F.log_softmax(model(**batch).logits.flatten(0, 1)[keep], -1)
        full = F.kl_div(q, p, log_target=True, reduction="batchmean")
        assert float(loss.batch_loss(model, index)) == pytest.approx(float(full), rel=1e-4)


def test_lm_loss_top_k_is_a_positive_lower_bound_and_ce_is_the_models_own_loss():
    import torch.nn.functional as F

    model = tiny_gpt2().eval()
    loaded = wrap_model(model)
    calib = build_calibration(loaded, samples=8, seq_len=16)
    kl, ce = TaskLoss(loaded, calib), TaskLoss(loaded, calib, lm_objective="ce")
    assert not ce.has_zero_gradient_at_reference()
    reference = [model(**batch).logits.detach() for batch in calib.batches]
    with torch.no_grad():
        model.lm_head.weight.add_(0.05 * torch.randn_like(model.lm_head.weight))
    for index, batch in enumerate(calib.batches):
        keep = kl._lm_labels(index).flatten() != -100
        logits = model(**batch).logits
        full = F.kl_div(F.log_softmax(logits.flatten(0, 1)[keep], -1),
                        F.log_softmax(reference[index].flatten(0, 1)[keep], -1), log_target=True, reduction="batchmean")
        assert 0 < float(kl.loss_of(logits, index)) <= float(full) + 1e-6
        labels = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
        own = model(**batch, labels=labels).loss  # transformers shifts the labels itself
        assert float(ce.loss_of(logits, index)) == pytest.approx(float(own), rel=1e-5)


def test_unknown_lm_loss_is_refused_before_any_model_loads():
    with pytest.raises(CptqError, match="--lm-loss"):
        analyze(None, None, ("tdmpq",), AnalysisOptions.from_fields(lm_loss="mse"))


@pytest.mark.parametrize("family", ["t5", "bart"])
def test_encoder_decoder_replays_its_encoder_blocks_exactly(family):
    """An encoder-decoder model's blocks are its encoder's (T5's decoder block holds a 3-long list of sub-layers,
    not blocks): replaying them gives the oracle the scores of full passes, decoder layers recomputed whole."""
    from cptquant.layer_graph import block_container
    from cptquant.passes.block_replay import BlockReplay
    from cptquant.passes.oracle import oracle_scores
    from cptquant.seq2seq_inputs import decoder_reads_input
    from cptquant.tiny_families import FAMILIES

    model = FAMILIES[family].build()
    loaded, graph = wrap_model(model), build_layer_graph(model)
    assert block_container(model) == {"t5": "encoder.block", "bart": "model.encoder.layers"}[family]
    with decoder_reads_input(model):
        calib = build_calibration(loaded, samples=8, seq_len=16)
        loss = TaskLoss(loaded, calib)
        full = BlockReplay(model, graph, loss, "layer", budget_bytes=0)
        replay = BlockReplay(model, graph, loss, "layer")
        assert replay.kept == [0, 1] and replay.base_loss == full.base_loss
        assert oracle_scores(model, graph, calib, loss, granularity="layer", replay=replay, progress=False) == \
            oracle_scores(model, graph, calib, loss, granularity="layer", replay=full, progress=False)


def test_one_export_calibrates_once_and_rereads_a_changed_file(tmp_path):
    """The plan's pass, GPTQ, smoothing and hot rows share one CalibrationSet per model and spec."""
    import os

    from transformers import AutoTokenizer

    from cptquant.model_loading import embedded_model_path
    from cptquant.passes.calibration import calibration_for

    loaded = wrap_model(tiny_bert(), tokenizer=AutoTokenizer.from_pretrained(embedded_model_path()))
    options = CalibrationOptions(calib_samples=8, seq_len=16)
    first = calibration_for(loaded, options)
    assert calibration_for(loaded, CalibrationOptions(calib_samples=8, seq_len=16)) is first
    assert calibration_for(loaded, CalibrationOptions(calib_samples=8, seq_len=16, seed=1)) is not first

    text = tmp_path / "calib.txt"
    text.write_text("\n".join(f"Sentence {i} is about the first topic of the file." for i in range(12)))
    from_file = calibration_for(loaded, CalibrationOptions(calib=str(text), calib_samples=8, seq_len=16))
    assert calibration_for(loaded, CalibrationOptions(calib=str(text), calib_samples=8, seq_len=16)) is from_file
    text.write_text("\n".join(f"Line {i} now says something else entirely, and longer than before." for i in range(12)))
    os.utime(text, ns=(text.stat().st_atime_ns, text.stat().st_mtime_ns + 1_000_000))
    again = calibration_for(loaded, CalibrationOptions(calib=str(text), calib_samples=8, seq_len=16))
    assert again is not from_file
    assert not torch.equal(again.batches[0]["input_ids"], from_file.batches[0]["input_ids"])


def test_weights_are_replaced_by_swapping_never_written_in_place():
    """A weight memory-mapped from safetensors must stay a clean page of its file: the passes give parameters
    other values by swapping their data, so the original storage is never written and comes back as it was."""
    from cptquant.passes.common import replaced_weights, restored_afterwards

    layer = torch.nn.Linear(8, 4)
    original = layer.weight.data
    before = original.clone()
    new = torch.full((8, 4), 2.0).T  # not contiguous: laid out as the parameter when swapped in
    with replaced_weights(layer, {layer.weight: new}):
        assert torch.equal(layer.weight, new) and layer.weight.is_contiguous()
        assert torch.equal(original, before)  # the original storage was not written
    assert layer.weight.data.data_ptr() == original.data_ptr() and torch.equal(layer.weight, before)
    with restored_afterwards([layer.weight]):
        layer.weight.data.zero_()  # what PMPQ's pruning does, in place
        assert torch.equal(original, before)
    assert layer.weight.data.data_ptr() == original.data_ptr() and torch.equal(layer.weight, before)


def test_tdmpq_recomputing_block_activations_changes_no_score(monkeypatch):
    """A large model's Fisher backward runs each block under activation checkpointing (memory: one block's
    activations, not all of them): the same gradients, so the same scores as keeping every activation; the blocks
    are left as found."""
    import contextlib

    import cptquant.passes.tdmpq as tdmpq
    from cptquant.testing import tiny_llama

    def scores() -> dict[str, float]:
        model = tiny_llama(0, tied=True)
        result = analyze(wrap_model(model), build_layer_graph(model), ("tdmpq",), AnalysisOptions.from_fields(**FAST),
                         validate=False, progress=False)
        assert not any("forward" in block.__dict__ for block in model.model.layers)
        return result.scores["tdmpq"]

    monkeypatch.setattr(tdmpq, "RECOMPUTE_ABOVE_BYTES", 0)  # as a model over 2 GB
    calls = []
    real = tdmpq.checkpoint
    monkeypatch.setattr(tdmpq, "checkpoint", lambda *args, **kwargs: calls.append(1) or real(*args, **kwargs))
    recomputed = scores()
    assert calls  # the blocks did run checkpointed
    monkeypatch.setattr(tdmpq, "recomputed_in_backward", lambda blocks: contextlib.nullcontext())
    assert scores() == recomputed


def test_replaying_puts_back_a_forward_the_block_already_had():
    """accelerate's hooks wrap a module's forward as an instance attribute: replay must not strip it."""
    from cptquant.passes.block_replay import replaying

    block = torch.nn.Linear(4, 4)
    calls = []

    def wrapped(*args, **kwargs):
        calls.append(1)
        return torch.nn.Linear.forward(block, *args, **kwargs)

    block.forward = wrapped
    plain = torch.nn.Linear(4, 4)
    with replaying([block, plain], lambda: "saved"):
        assert block(torch.zeros(1, 4)) == "saved" and plain(torch.zeros(1, 4)) == "saved"
    block(torch.zeros(1, 4))
    assert calls == [1] and block.forward is wrapped and "forward" not in plain.__dict__
