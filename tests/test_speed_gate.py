"""The speed gate's interval and verdicts (runtimes/speed_gate.py), on synthetic timings: no clock involved."""

from __future__ import annotations

import numpy as np

from cptquant.runtimes.speed_gate import (
    FAIL,
    INCONCLUSIVE,
    PASS,
    GateSettings,
    bootstrap_interval,
    paired_log_ratios,
    speed_interval,
)


def _noisy_probes(speedup: float, spread: float, seed: int = 1):
    """Probes whose baseline takes `speedup` times the candidate's time, both scaled by one shared load factor
    per round (what another process does to interleaved runs) and by a little noise of their own."""
    rng = np.random.default_rng(seed)
    state = {"calls": 0, "load": 1.0}

    def probe(name: str) -> float:
        if state["calls"] % 2 == 0:  # the load changes between pairs, not within one
            state["load"] = float(rng.uniform(1, 4))
        state["calls"] += 1
        own = float(np.exp(rng.normal(0, spread)))
        return state["load"] * own * (speedup if name == "baseline" else 1.0)

    return {"b1_s16": probe, "b8_s128": probe}


def _start(probes, rounds: int = 10):
    samples = {figure: [] for figure in probes}
    for figure, probe in probes.items():
        for _ in range(rounds):
            base, cand = probe("baseline"), probe("candidate")
            samples[figure].append(float(np.log(base / cand)))
    return samples


def test_paired_log_ratios_pair_by_round():
    rounds = {"b1_s16": {"quantized": [1.0, 2.0], "fp32": [2.0, 2.0]}}
    assert np.allclose(paired_log_ratios(rounds, "quantized", "fp32")["b1_s16"], [np.log(2), 0.0])


def test_interval_holds_the_estimate_and_narrows_with_rounds():
    rng = np.random.default_rng(0)
    few = {"f": list(rng.normal(0.2, 0.1, 20))}
    many = {"f": list(rng.normal(0.2, 0.1, 400))}
    e1, lo1, hi1 = bootstrap_interval(few, 0.95, 500, 0)
    e2, lo2, hi2 = bootstrap_interval(many, 0.95, 500, 0)
    assert lo1 <= e1 <= hi1 and lo2 <= e2 <= hi2
    assert hi2 / lo2 < hi1 / lo1
    assert abs(np.log(e2) - 0.2) < 0.03


def test_a_faster_model_passes_and_a_slower_one_fails_under_shared_load():
    settings = GateSettings(max_rounds=300, max_seconds=60)
    for speedup, expected in ((1.3, PASS), (0.7, FAIL)):
        probes = _noisy_probes(speedup, spread=0.15)
        interval = speed_interval(_start(probes), 1.0, settings, probes, "candidate", "baseline")
        assert interval.verdict == expected, interval
        assert interval.low <= interval.estimate <= interval.high


def test_a_model_at_the_threshold_is_inconclusive_not_failed():
    probes = _noisy_probes(1.0, spread=0.3)
    interval = speed_interval(_start(probes), 1.0, GateSettings(narrow=0.001, max_rounds=60), probes,
                              "candidate", "baseline")
    assert interval.verdict == INCONCLUSIVE
    assert min(interval.rounds.values()) >= 60 and "cap" in interval.stopped
    assert interval.low < 1.0 < interval.high


def test_no_probes_means_the_interval_of_the_rounds_taken():
    samples = {"f": [0.1, 0.12, 0.09, 0.11] * 5}
    interval = speed_interval(samples, 0.0, GateSettings())
    assert interval.verdict == PASS and interval.rounds == {"f": 20} and interval.added_seconds == 0


def test_the_bench_slower_model_computes_the_same_outputs(tmp_path):
    """bench/verify_gate.py's model that really is slower than FP32: same outputs, every MatMul three times."""
    import onnx
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper

    from cptquant.bench.verify_gate import write_repeated_matmuls

    w = np.random.default_rng(0).normal(size=(8, 4)).astype(np.float32)
    graph = helper.make_graph([helper.make_node("MatMul", ["x", "w"], ["y"])], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 8])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 4])],
                              [numpy_helper.from_array(w, "w")])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), tmp_path / "fp32.onnx")
    write_repeated_matmuls(tmp_path / "fp32.onnx", tmp_path / "slow.onnx")
    slow = onnx.load(str(tmp_path / "slow.onnx"))
    assert [n.op_type for n in slow.graph.node].count("MatMul") == 3
    assert len({i for n in slow.graph.node if n.op_type == "MatMul" for i in n.input[1:]}) == 3
    x = np.random.default_rng(1).normal(size=(2, 8)).astype(np.float32)
    y = ort.InferenceSession(str(tmp_path / "slow.onnx")).run(None, {"x": x})[0]
    assert np.allclose(y, x @ w, atol=1e-5)


def test_a_check_line_shows_digits_enough_to_tell_measured_from_threshold():
    """`--min-cosine 0.9999999` once printed "FAIL … 1 < 1"."""
    from cptquant.runtimes.gate import Check

    assert Check("cpu", "mean cosine vs fp32", 0.99999985, 0.9999999, False).line() == \
        "FAIL [cpu] mean cosine vs fp32: 0.99999985 < 0.9999999"
    assert Check("cpu", "mean cosine vs fp32", 0.9953, 0.99, False).line() == "PASS [cpu] mean cosine vs fp32: 0.9953 >= 0.99"
