"""The k_quant_mixed rule (passes/rule.py): llama.cpp's use_more_bits layer choice as a plan."""

from __future__ import annotations

from cptquant.layer_graph import build_layer_graph
from cptquant.passes.rule import rule_plan, use_more_bits
from cptquant.testing import tiny_gpt2, tiny_llama, tiny_opt


def test_use_more_bits_matches_llama_cpp_for_30_layers():
    # SmolLM2's 30 blocks: n/8 = 3, 7n/8 = 26 (integer division)
    chosen = [i for i in range(30) if use_more_bits(i, 30)]
    assert chosen == [0, 1, 2, 5, 8, 11, 14, 17, 20, 23, 26, 27, 28, 29]


def _eight_bit(model):
    plan = rule_plan(build_layer_graph(model), 32)
    return sorted(name for name, lp in plan.layers.items() if lp.bits == 8), plan


def test_llama_rule_picks_v_proj_down_proj_and_head():
    eight, plan = _eight_bit(tiny_llama())  # 2 blocks: n/8 = 0 and 7n/8 = 1, so only block 1 gets more bits
    assert eight == ["lm_head", "model.layers.1.mlp.down_proj", "model.layers.1.self_attn.v_proj"]
    assert {lp.bits for lp in plan.layers.values()} == {4, 8}
    assert plan.layers["model.embed_tokens"].bits == 4  # untied: the table stays at 4 bits


def test_tied_table_follows_its_head_and_fused_qkv_counts_as_value():
    eight, _ = _eight_bit(tiny_gpt2())
    assert "transformer.h.1.attn.c_attn" in eight and "transformer.h.1.mlp.c_proj" in eight
    assert "transformer.h.1.attn.c_proj" not in eight  # attention output, not the MLP's down projection
    assert "transformer.wte" in eight and "lm_head" in eight
    eight, _ = _eight_bit(tiny_opt())
    assert "model.decoder.layers.1.fc2" in eight and "model.decoder.layers.1.fc1" not in eight


def test_cli_exports_the_rule_and_refuses_a_budget_with_it(tmp_path):
    import json

    from typer.testing import CliRunner

    from cptquant.cli import export_app
    from cptquant.testing import save_tiny_model

    folder = save_tiny_model(tiny_llama(), tmp_path / "tiny-llama")
    runner = CliRunner()
    result = runner.invoke(export_app, [str(folder), "--method", "rule", "--target-bits", "5", "-o",
                                        str(tmp_path / "x"), "--no-progress"])
    assert result.exit_code == 2 and "takes no --target-bits" in result.stderr
    out = tmp_path / "rule"
    result = runner.invoke(export_app, [str(folder), "--method", "rule", "-o", str(out), "--no-verify",
                                        "--no-progress"])
    assert result.exit_code == 0, result.output
    report = json.loads((out / "model.report.json").read_text())
    assert report["method"] == "rule"
    assert report["layers"]["model.layers.1.self_attn.v_proj"]["bits"] == 8
    assert report["layers"]["model.layers.0.self_attn.v_proj"]["bits"] == 4
