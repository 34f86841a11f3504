"""Runtime adapters and `cptq verify`, on tiny models exported in the test session (offline, CPU)."""

from __future__ import annotations

import json
import shutil
import xml.etree.ElementTree as ET
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from typer.testing import CliRunner

from cptquant.cli import app
from cptquant.errors import CptqError
from cptquant.exporter.pipeline import export_quantized
from cptquant.model_loading import load_model, wrap_model
from cptquant.onnx_io.baselines import baseline_dir
from cptquant.onnx_io.inputs import feeds_for
from cptquant.plan import uniform_plan
from cptquant.runtimes.cpu import CpuAdapter
from cptquant.runtimes.cuda import CudaAdapter
from cptquant.runtimes.gate import parse_fraction
from cptquant.runtimes.quality import kl_divergence, score_tokens, score_variants, window_spans
from cptquant.runtimes.speed import greedy_decode
from cptquant.runtimes.verify import short_verification

HAS_CUDA = "CUDAExecutionProvider" in ort.get_available_providers()
runner = CliRunner()


def _export(loaded, bits: int, out: Path) -> Path:
    export_quantized(loaded, lambda _loaded, graph: uniform_plan(graph, bits), out / "model.onnx", progress=False)
    return out


@pytest.fixture(scope="module")
def tiny_opt(tmp_path_factory):
    """A 2-layer OPT (random weights) exported at 8 bits; the torch model is kept for hand computations."""
    from cptquant.testing import tiny_opt as build_tiny_opt

    model = build_tiny_opt()
    out = _export(wrap_model(model), 8, tmp_path_factory.mktemp("opt") / "opt8")
    return model, out


@pytest.fixture(scope="module")
def tiny_bert_source(tmp_path_factory) -> Path:
    """A 2-layer BERT saved as a model folder, so exports of it have a real `source` to rebuild from."""
    from cptquant.testing import tiny_bert

    model = tiny_bert()
    folder = tmp_path_factory.mktemp("bert-src") / "tiny-bert"
    model.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def tiny_bert4(tiny_bert_source, tmp_path_factory) -> Path:
    return _export(load_model(str(tiny_bert_source)), 4, tmp_path_factory.mktemp("bert") / "bert4")


def _verify(*args: str):
    return runner.invoke(app, ["verify", *map(str, args), "--quick", "--no-progress"])


def _copy_output(folder: Path, dst: Path) -> Path:
    shutil.copytree(folder, dst)
    return dst


# ---------------------------------------------------------------- perplexity


@pytest.mark.parametrize("window, stride, spans", [
    # n = 20 tokens; (begin, end, first scored token); token j is predicted by the logits at j-1
    (32, 16, [(0, 20, 1)]),
    (8, 4, [(0, 8, 1), (4, 12, 8), (8, 16, 12), (12, 20, 16)]),
    (8, 8, [(0, 8, 1), (8, 16, 9), (16, 20, 17)]),  # stride == window: tokens 8 and 16 have no context
    (6, 5, [(0, 6, 1), (5, 11, 6), (10, 16, 11), (15, 20, 16)]),
])
def test_sliding_window_perplexity_matches_torch_by_hand(tiny_opt, window, stride, spans):
    model, out = tiny_opt
    assert window_spans(20, window, stride) == spans
    ids = np.random.default_rng(1).integers(4, 1000, size=20)
    total, count = 0.0, 0
    with torch.no_grad():
        for begin, end, first in spans:
            logits = model(input_ids=torch.from_numpy(ids[begin:end])[None], use_cache=False).logits[0].double()
            logp = torch.log_softmax(logits, dim=-1)
            for j in range(first, end):
                total -= float(logp[j - 1 - begin, ids[j]])
                count += 1
    expected = float(np.exp(total / count))
    adapter = CpuAdapter()
    session = adapter.session(baseline_dir(out) / "fp32" / "model.onnx")
    scores = score_tokens(adapter, session, ids, window, stride)
    assert len(scores.nll) == count
    assert scores.perplexity == pytest.approx(expected, rel=1e-4)


def test_kl_divergence_is_zero_for_the_same_model(tiny_opt):
    _, out = tiny_opt
    adapter = CpuAdapter()
    fp32 = adapter.session(baseline_dir(out) / "fp32" / "model.onnx")
    quantized = adapter.session(out / "model.onnx")
    ids = np.random.default_rng(3).integers(4, 1000, size=40)
    scores, kl = score_variants(adapter, {"q": quantized, "same": fp32, "fp32": fp32}, ids, 16, 8, candidate="fp32")
    assert kl["same"] == pytest.approx(np.zeros_like(kl["same"]), abs=1e-9)
    assert len(kl["q"]) == len(scores["q"].nll) == 39 and (kl["q"] > 0).all()
    # KL(reference || model) by hand
    expected = 0.5 * np.log(0.5 / 0.9) + 0.5 * np.log(0.5 / 0.1)
    assert kl_divergence(np.log([[0.5, 0.5]]), np.log([[0.9, 0.1]]))[0] == pytest.approx(expected)


@given(n=st.integers(2, 300), window=st.integers(2, 64), stride_fraction=st.floats(0.01, 1.0))
def test_window_spans_score_each_token_at_most_once(n, window, stride_fraction):
    stride = max(1, int(window * stride_fraction))
    scored = [j for _, end, first in window_spans(n, window, stride) for j in range(first, end)]
    assert scored == sorted(set(scored)) and all(1 <= j < n for j in scored)
    for begin, end, first in window_spans(n, window, stride):
        assert begin < first < end <= begin + window
    if stride < window:  # overlapping windows leave no token without context
        assert scored == list(range(1, n))


def test_kv_cache_decoding_matches_full_forward_greedy(tiny_opt):
    _, out = tiny_opt
    adapter = CpuAdapter()
    session = adapter.session(out / "model.onnx")
    prompt = np.random.default_rng(2).integers(4, 1000, size=(1, 16))
    _, steps, generated = greedy_decode(adapter, session, prompt, 6)
    assert len(steps) == 5
    ids = prompt
    for token in generated:  # no cache: the whole sequence every step
        logits = session.run(["logits"], feeds_for(session, ids))[0]
        assert int(logits[0, -1].argmax()) == token
        ids = np.concatenate([ids, [[token]]], axis=1)


# ---------------------------------------------------------------- the gate


def test_verify_passes_writes_reports_and_junit(tiny_opt, tmp_path):
    _, out = tiny_opt
    junit = tmp_path / "junit.xml"
    result = _verify(out, "--max-ppl-increase", "2%", "--min-speedup", "0", "--junit", junit,
                     "--report-dir", tmp_path / "reports")
    assert result.exit_code == 0, result.output
    assert "PASS [cpu] perplexity increase vs fp32" in result.stdout
    if not HAS_CUDA:  # --ep auto: the missing EP is one line, not an error
        assert "CUDA skipped: this onnxruntime build has no CUDAExecutionProvider" in result.stderr
    report = json.loads((tmp_path / "reports" / "report.json").read_text())
    assert report["passed"] is True
    cpu = report["eps"]["cpu"]
    assert abs(cpu["quality"]["vs_fp32"]["ppl_increase"]) < 0.02
    assert cpu["quality"]["vs_fp32"]["top1_agreement"] > 0.9
    assert 0 <= cpu["quality"]["vs_fp32"]["kl_divergence"] < 0.05
    assert set(cpu["speed"]["variants"]) == {"quantized", "fp32", "fp16"}
    assert cpu["speed"]["variants"]["quantized"]["latency"]["decode_per_token"]["p50_ms"] > 0
    assert cpu["speed"]["vs_fp16"]["smaller_on_disk_by"] > 1
    for figures in cpu["speed"]["variants"].values():  # Linux: measured in a fresh process per variant
        assert figures["peak_rss_bytes"] > figures["rss_growth_bytes"] > 0
    assert "CPUExecutionProvider" in cpu["device"] and ort.__version__ in cpu["device"]
    for base in ("fp32", "fp16"):  # every speed figure also as a ratio to each baseline
        vs = cpu["speed"][f"vs_{base}"]
        assert set(vs["latency_speedup"]) == set(vs["p90_speedup"]) == {"prefill_b1_s16", "decode_per_token"}
        assert vs["tokens_per_s_ratio"] > 0 and vs["peak_rss_bytes_ratio"] > 0
    markdown = (tmp_path / "reports" / "report.md").read_text()
    assert "## Checks" in markdown
    assert "- quantized vs fp16: " in markdown and "smaller on disk, peak RSS" in markdown and "tokens/s" in markdown
    suite = ET.parse(junit).getroot().find("testsuite")
    cases = suite.findall("testcase")
    assert suite.get("failures") == "0" and len(cases) == int(suite.get("tests"))
    assert not any(case.find("failure") is not None for case in cases)
    if not HAS_CUDA:
        skipped = [case.find("skipped") for case in cases if case.find("skipped") is not None]
        assert len(skipped) == 1 and skipped[0].get("message").startswith("CUDA skipped:")


def test_verify_fails_all_4bit_under_tight_cosine(tiny_bert4, tmp_path):
    junit = tmp_path / "junit.xml"
    result = _verify(tiny_bert4, "--min-cosine", "0.99999", "--min-speedup", "0", "--junit", junit)
    assert result.exit_code == 1, result.output
    report = json.loads((tiny_bert4 / "verify" / "report.json").read_text())
    cosine = report["eps"]["cpu"]["quality"]["vs_fp32"]["mean_cosine"]
    assert 0.5 < cosine < 0.99999
    assert f"FAIL [cpu] mean cosine vs fp32: {cosine:.4g} < 1" in result.stdout
    failures = [case.find("failure") for case in ET.parse(junit).getroot().iter("testcase")
                if case.find("failure") is not None]
    assert len(failures) == 1 and "mean cosine vs fp32" in failures[0].get("message")
    for case in ET.parse(junit).getroot().iter("testcase"):  # only the attributes the JUnit schemas know
        assert set(case.attrib) <= {"name", "classname", "time"}
    outputs = [case.findtext("system-out") for case in ET.parse(junit).getroot().iter("testcase")]
    assert f"FAIL [cpu] mean cosine vs fp32: {cosine:.4g} < 1" in outputs


def test_speed_threshold_failure_names_the_measured_value(tiny_bert4):
    result = _verify(tiny_bert4, "--ep", "cpu", "--baseline", "fp16", "--min-cosine", "0", "--min-speedup", "1000")
    assert result.exit_code == 1
    assert "FAIL [cpu] speed-up vs fp16 (geometric mean of paired ratios):" in result.stdout
    assert "95% interval" in result.stdout and "< 1000" in result.stdout


def test_missing_baselines_are_rebuilt_from_the_source(tiny_bert4, tmp_path):
    moved = _copy_output(tiny_bert4, tmp_path / "moved")  # a new place: its baseline cache does not exist
    assert not baseline_dir(moved).exists()
    result = _verify(moved, "--ep", "cpu", "--min-cosine", "0", "--min-speedup", "0")
    assert result.exit_code == 0, result.output
    assert (baseline_dir(moved) / "fp16" / "model.onnx").is_file()
    gone = _copy_output(tiny_bert4, tmp_path / "gone")
    report = json.loads((gone / "model.report.json").read_text())
    report["source"] = str(tmp_path / "deleted-model-folder")
    (gone / "model.report.json").write_text(json.dumps(report))
    result = _verify(gone, "--ep", "cpu")
    assert result.exit_code == 2
    assert result.stderr.strip() == (f"error: baseline cache {baseline_dir(gone)} is missing and cannot be rebuilt from "
                                     f"{report['source']}: model folder not found: {report['source']}")


def test_a_stale_baseline_cache_from_another_model_is_rebuilt_or_refused(tiny_opt, tiny_bert4, tmp_path):
    """An output folder copied beside the cache of another model of the same folder name: never compared with it."""
    bert = _copy_output(tiny_bert4, tmp_path / "out")
    shutil.copytree(baseline_dir(tiny_opt[1]), baseline_dir(bert))  # the OPT's baselines where BERT's belong
    result = _verify(bert, "--ep", "cpu", "--min-cosine", "0", "--min-speedup", "0")
    assert result.exit_code == 0, result.output  # rebuilt from the report's source folder
    inputs = {i.name for i in onnx.load(str(baseline_dir(bert) / "fp16" / "model.onnx")).graph.input}
    assert inputs == {i.name for i in onnx.load(str(bert / "model.onnx")).graph.input}
    opt = _copy_output(tiny_opt[1], tmp_path / "elsewhere" / "out")  # came from memory: cannot be rebuilt
    shutil.copytree(baseline_dir(tiny_bert4), baseline_dir(opt))
    result = _verify(opt, "--ep", "cpu")
    assert result.exit_code == 2, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"error: baseline cache {baseline_dir(opt)} does not match this "
                                                   "export (inputs input_ids, attention_mask, token_type_ids instead of")


def test_short_verification_reports_cpu_figures_against_both_baselines(tiny_bert4):
    figures = short_verification(tiny_bert4)
    assert figures["ep"] == "cpu"
    for base in ("fp32", "fp16"):
        assert 0.5 < figures["quality"][f"vs_{base}"]["mean_cosine"] <= 1.0
        assert set(figures["speed"][f"vs_{base}"]["latency_speedup"]) == {"b1_s16"}


# ---------------------------------------------------------------- CUDA


@pytest.mark.skipif(HAS_CUDA, reason="this machine has the CUDA EP; the skip path is for machines without it")
def test_cuda_is_skipped_cleanly_without_a_gpu(tiny_opt):
    ok, why = CudaAdapter().available()
    assert not ok
    assert why.startswith("this onnxruntime build has no CUDAExecutionProvider")
    result = _verify(tiny_opt[1], "--ep", "cuda")
    assert result.exit_code == 2
    assert result.stderr.strip() == f"error: --ep cuda is not available here: {why}"


def test_cuda_probe_without_a_usable_gpu_is_one_line(monkeypatch, capfd):
    """onnxruntime-gpu installed but no GPU (or no CUDA libraries): ORT falls back to the CPU and logs about
    it on its own; the probe must leave only its reason, which `--ep auto` prints as the one skip line."""
    from cptquant.runtimes import cuda
    from cptquant.runtimes.verify import select_adapters

    if HAS_CUDA and CudaAdapter().available()[0]:
        pytest.skip("a usable GPU is here")
    real = ort.get_available_providers
    monkeypatch.setattr(ort, "get_available_providers", lambda: [*real(), "CUDAExecutionProvider"])
    cuda._probe.cache_clear()
    try:
        capfd.readouterr()
        adapters, skipped = select_adapters("auto")
        ok, why = CudaAdapter().available()
        captured = capfd.readouterr()
    finally:
        cuda._probe.cache_clear()
    assert not ok and why.startswith(("onnxruntime-gpu is installed but GPU 0 is not usable",
                                      "onnxruntime-gpu could not start on GPU 0"))
    assert [a.name for a in adapters] == ["cpu"] and skipped == {"cuda": f"CUDA skipped: {why}"}
    assert captured.err == "" and captured.out == ""  # nothing from ORT's logger or warnings


needs_gpu = pytest.mark.skipif(not HAS_CUDA or not CudaAdapter().available()[0], reason="needs onnxruntime-gpu and a GPU")


@needs_gpu
def test_verify_on_cuda_measures_every_variant(tiny_opt, tmp_path):
    result = _verify(tiny_opt[1], "--ep", "cuda", "--max-ppl-increase", "5%", "--min-speedup", "0",
                     "--report-dir", tmp_path)
    assert result.exit_code == 0, result.output
    cuda = json.loads((tmp_path / "report.json").read_text())["eps"]["cuda"]
    assert "CUDAExecutionProvider" in cuda["device"]
    assert cuda["speed"]["variants"]["quantized"]["latency"]["decode_per_token"]["p50_ms"] > 0


@needs_gpu
def test_cuda_matches_cpu_on_the_fp32_baseline(tiny_opt):
    _, out = tiny_opt
    ids = np.random.default_rng(3).integers(4, 1000, size=(1, 24))
    results = []
    for adapter in (CpuAdapter(), CudaAdapter()):
        session = adapter.session(baseline_dir(out) / "fp32" / "model.onnx")
        results.append(score_tokens(adapter, session, ids, 16, 8).perplexity)
        _, _, generated = greedy_decode(adapter, session, ids[:, :16], 4)
        results.append(generated)
    assert results[0] == pytest.approx(results[2], rel=1e-3)
    assert results[1] == results[3]


# ---------------------------------------------------------------- bad input: exit 2, one line


def _with_external_weight(folder: Path, location: str) -> None:
    """Point the largest initializer of folder/model.onnx at `location` as external data."""
    path = folder / "model.onnx"
    model = onnx.load(str(path))
    tensor = max(model.graph.initializer, key=lambda t: len(t.raw_data))
    size = len(tensor.raw_data)
    tensor.ClearField("raw_data")
    tensor.data_location = onnx.TensorProto.EXTERNAL
    for key, value in (("location", location), ("offset", "0"), ("length", str(size))):
        tensor.external_data.add(key=key, value=value)
    onnx.save(model, str(path))


def _bad_output(kind: str, tiny_opt, tmp_path: Path) -> Path:
    folder = _copy_output(tiny_opt[1], tmp_path / "out")
    if kind == "not-cptquant":
        (folder / "model.report.json").unlink()
    elif kind == "corrupt":
        (folder / "model.onnx").write_bytes(b"\x08\x07 this is not protobuf \xff\xff\xff")
    elif kind == "missing-data":
        _with_external_weight(folder, "model.onnx_data")
    elif kind == "escape":
        (tmp_path / "outside.bin").write_bytes(b"\0" * 10**6)
        _with_external_weight(folder, "../outside.bin")
    elif kind == "absolute":
        (tmp_path / "outside.bin").write_bytes(b"\0" * 10**6)
        _with_external_weight(folder, str(tmp_path / "outside.bin"))
    return folder


@pytest.mark.parametrize("kind, message", [
    ("not-cptquant", "is not a cptquant output folder (missing model.report.json)"),
    ("corrupt", "model.onnx is not a valid ONNX model"),
    ("missing-data", "external data file 'model.onnx_data' is missing"),
    ("escape", "points to external data at '../outside.bin', outside the model's folder; refusing to load it"),
    ("absolute", "outside the model's folder; refusing to load it"),
])
def test_bad_folder_exits_2_with_one_line(kind, message, tiny_opt, tmp_path):
    folder = _bad_output(kind, tiny_opt, tmp_path)
    result = _verify(folder, "--ep", "cpu")
    assert result.exit_code == 2, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0]


def test_external_data_inside_the_folder_is_accepted(tiny_opt, tmp_path):
    from cptquant.runtimes.export_folder import check_model_file

    folder = _copy_output(tiny_opt[1], tmp_path / "out")
    model = onnx.load(str(folder / "model.onnx"))
    onnx.save_model(model, str(folder / "model.onnx"), save_as_external_data=True, location="model.onnx_data",
                    size_threshold=0)
    check_model_file(folder / "model.onnx")
    session = CpuAdapter().session(folder / "model.onnx")
    assert "logits" in CpuAdapter().run(session, feeds_for(session, np.ones((1, 4), dtype=np.int64)))


def test_not_a_folder_and_in_memory_source_without_cache(tiny_opt, tmp_path):
    result = _verify(tmp_path / "nowhere", "--ep", "cpu")
    assert result.exit_code == 2 and "nowhere not found; give the output folder of cptq-export" in result.stderr
    (tmp_path / "a-file").write_text("")
    result = _verify(tmp_path / "a-file", "--ep", "cpu")
    assert result.exit_code == 2 and "is not a folder; give the output folder of cptq-export" in result.stderr
    moved = _copy_output(tiny_opt[1], tmp_path / "moved")  # came from memory: nothing to rebuild from
    result = _verify(moved, "--ep", "cpu")
    assert result.exit_code == 2 and "is missing and cannot be rebuilt" in result.stderr


@pytest.mark.parametrize("args, message", [
    (["--max-ppl-increase", "two"], "--max-ppl-increase must be a number or a percentage like 2% (got 'two')"),
    (["--max-accuracy-drop", "-1%"], "--max-accuracy-drop must be a non-negative finite number (got '-1%')"),
    (["--max-accuracy-drop", "150%"], "--max-accuracy-drop must be at most 100% (got '150%')"),
    (["--min-cosine", "1.5"], "--min-cosine must be between -1 and 1 (got '1.5')"),
    (["--min-cosine", "2"], "--min-cosine must be between -1 and 1 (got '2')"),
    (["--min-speedup", "inf"], "--min-speedup must be a finite number of at least 0 (got 'inf')"),
    (["--max-ppl-increase", "abc"], "--max-ppl-increase must be a number or a percentage like 2% (got 'abc')"),
    (["--threads", "0"], "--threads must be at least 1 (got 0)"),
    (["--min-speedup", "fast"], "--min-speedup must be a number (got 'fast')"),
    (["--baseline", "int8"], "--baseline must be fp16 or fp32 (got 'int8')"),
    (["--ep", "tpu"], "--ep must be auto or a comma list of cpu, cuda (got 'tpu')"),
])
def test_bad_options_exit_2(args, message, tiny_opt):
    result = _verify(tiny_opt[1], *args)
    assert result.exit_code == 2
    assert result.stderr.strip() == f"error: {message}"


def test_percent_thresholds_accept_both_spellings():
    assert parse_fraction("2%", "--x") == pytest.approx(0.02)
    assert parse_fraction("0.02", "--x") == pytest.approx(0.02)
    with pytest.raises(CptqError, match="--x must be a number or a percentage"):
        parse_fraction("2 percent", "--x")


# ---------------------------------------------------------------- classification and masked LM


def _word_tokenizer():
    """A word-level tokenizer over the offline corpus, with BERT's special tokens (no download)."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    from cptquant.corpus import sentences

    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    tok = Tokenizer(models.WordLevel(unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.train_from_iterator(sentences(), trainers.WordLevelTrainer(vocab_size=1000, special_tokens=specials))
    tok.post_processor = processors.TemplateProcessing(single="[CLS] $A [SEP]", special_tokens=[("[CLS]", 2), ("[SEP]", 3)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="[PAD]", unk_token="[UNK]", cls_token="[CLS]",
                                   sep_token="[SEP]", mask_token="[MASK]")


def _tiny_bert_config(**extra):
    from transformers import BertConfig

    return BertConfig(vocab_size=1000, hidden_size=64, num_hidden_layers=2, intermediate_size=128,
                      num_attention_heads=4, max_position_embeddings=128, **extra)


def test_classification_accuracy_from_labelled_eval_file(tmp_path):
    from transformers import BertForSequenceClassification

    torch.manual_seed(0)
    model = BertForSequenceClassification(_tiny_bert_config(num_labels=2, id2label={0: "neg", 1: "pos"},
                                                            label2id={"neg": 0, "pos": 1}))
    out = _export(wrap_model(model, tokenizer=_word_tokenizer()), 8, tmp_path / "cls8")
    texts = ["The file is opened for reading.", "Return a new list of the items.", "This raises an error."] * 4
    eval_file = tmp_path / "eval.jsonl"
    eval_file.write_text("\n".join(json.dumps({"text": t, "label": ["neg", "pos", 1][i % 3]})
                                   for i, t in enumerate(texts)) + "\n")
    result = _verify(out, "--ep", "cpu", "--eval", eval_file, "--max-accuracy-drop", "100%", "--min-speedup", "0")
    assert result.exit_code == 0, result.output
    quality = json.loads((out / "verify" / "report.json").read_text())["eps"]["cpu"]["quality"]
    assert quality["n_examples"] == 12 and quality["settings"]["labels"] is True
    accuracies = {name: v["accuracy"] for name, v in quality["variants"].items()}
    assert all(a * 12 == pytest.approx(round(a * 12), abs=1e-4) for a in accuracies.values())  # k of 12 right
    assert quality["vs_fp32"]["accuracy_drop"] == pytest.approx(accuracies["fp32"] - accuracies["quantized"])
    assert "PASS [cpu] accuracy drop vs fp32" in result.stdout
    eval_file.write_text('{"text": "no label here"}\n{"label": 1}\n')
    result = _verify(out, "--ep", "cpu", "--eval", eval_file)
    assert result.exit_code == 2 and "eval.jsonl:2: expected a JSON object with a \"text\" key" in result.stderr
    # once scored as the texts "123" and "None", or as labels the model cannot predict
    for lines, fragment in (('{"text": 123}', 'eval.jsonl:1: "text" must be a string, not 123'),
                            ('{"text": "a b", "label": 99}', "label 99 is outside the model's 2 classes"),
                            ('{"text": "a b", "label": -1}', "label -1 is outside the model's 2 classes")):
        eval_file.write_text(lines + "\n")
        result = _verify(out, "--ep", "cpu", "--eval", eval_file)
        assert result.exit_code == 2 and fragment in result.stderr, result.stderr
    # a reports path that cannot be written is refused before the run, not after it
    (tmp_path / "a-file").write_text("")
    for args, fragment in ((["--junit", tmp_path], "is a folder; give a file"),
                           (["--report-dir", tmp_path / "a-file"], "is a file; give a folder"),
                           (["--junit", tmp_path / "a-file" / "j.xml"], "a-file is a file, not a folder")):
        result = _verify(out, "--ep", "cpu", *args)
        assert result.exit_code == 2 and fragment in result.stderr, result.stderr


def test_masked_lm_agreement_on_masked_positions(tmp_path):
    from transformers import BertForMaskedLM

    torch.manual_seed(0)
    model = BertForMaskedLM(_tiny_bert_config())
    out = _export(wrap_model(model, tokenizer=_word_tokenizer()), 4, tmp_path / "mlm4")
    result = _verify(out, "--ep", "cpu", "--baseline", "fp16", "--max-accuracy-drop", "0", "--min-speedup", "0")
    quality = json.loads((out / "verify" / "report.json").read_text())["eps"]["cpu"]["quality"]
    assert quality["n_examples"] >= 64  # at least one masked token in each of the 64 quick sentences
    assert 0.0 <= quality["vs_fp16"]["top1_agreement"] <= 1.0
    drop = quality["vs_fp16"]["accuracy_drop"]
    assert result.exit_code == (0 if drop <= 0 else 1), result.output
    assert ("PASS" if drop <= 0 else "FAIL") + " [cpu] accuracy drop vs fp16" in result.stdout


def test_bytes_on_disk_are_the_model_and_the_external_data_it_names(tmp_path):
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    from cptquant.runtimes.base import model_bytes

    weight = numpy_helper.from_array(np.ones((64, 64), np.float32), "w")
    graph = helper.make_graph([helper.make_node("MatMul", ["x", "w"], ["y"])], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 64])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 64])], [weight])
    path = tmp_path / "model.onnx"
    onnx.save(helper.make_model(graph), str(path), save_as_external_data=True, location="weights.bin",
              size_threshold=0)
    (tmp_path / "model.onnx.bak").write_bytes(b"x" * 1000)  # same prefix, not part of the model
    assert model_bytes(path) == path.stat().st_size + (tmp_path / "weights.bin").stat().st_size


def test_eval_text_that_was_calibration_text_is_flagged(tmp_path):
    from transformers import BertModel

    from cptquant.corpus import sentences
    from cptquant.options import CalibrationOptions
    from cptquant.passes.measurements import CalibrationMeasurements

    torch.manual_seed(0)
    loaded = wrap_model(BertModel(_tiny_bert_config()), tokenizer=_word_tokenizer())
    texts = sentences()
    calib = tmp_path / "calib.txt"
    calib.write_text("\n".join(texts[:80]) + "\n")
    out = tmp_path / "bert4"
    export_quantized(loaded, lambda _loaded, graph: uniform_plan(graph, 4), out / "model.onnx", progress=False,
                     algorithm="gptq",
                     calibration=CalibrationMeasurements(CalibrationOptions(calib=str(calib), calib_samples=16, seq_len=32)))
    assert json.loads((out / "model.report.json").read_text())["calibration_text"]["calib"] == str(calib)
    for eval_texts, expected in ((texts[70:90], "10 of the 20 --eval texts are also calibration text"),
                                 (texts[-20:], None)):
        eval_file = tmp_path / "eval.txt"
        eval_file.write_text("\n".join(eval_texts) + "\n")
        result = _verify(out, "--ep", "cpu", "--eval", eval_file, "--min-cosine", "0", "--min-speedup", "0")
        assert result.exit_code == 0, result.output
        warnings = json.loads((out / "verify" / "report.json").read_text())["warnings"]
        if expected:
            assert len(warnings) == 1 and expected in warnings[0] and f"warning: {expected}" in result.stderr
        else:
            assert warnings == [] and "warning" not in result.stderr


def test_two_exports_in_one_folder_have_their_own_baselines(tiny_bert_source, tmp_path):
    folder = tmp_path / "deploy"
    export_quantized(load_model(str(tiny_bert_source)), lambda _l, graph: uniform_plan(graph, 8), folder / "int8.onnx",
                     progress=False)
    # the second export writes config.json again (the same bytes): replacing a file takes force (output_folder/targets.py)
    export_quantized(load_model(str(tiny_bert_source)), lambda _l, graph: uniform_plan(graph, 4), folder / "int4.onnx",
                     progress=False, force=True)
    caches = {name: baseline_dir(folder, f"{name}.onnx") for name in ("int8", "int4")}
    assert caches["int8"] != caches["int4"] and baseline_dir(folder) not in caches.values()
    report = json.loads((folder / "int8.report.json").read_text())
    assert report["trust_remote_code"] is False
    for name in caches:
        result = _verify(folder / f"{name}.onnx", "--ep", "cpu", "--min-cosine", "0", "--min-speedup", "0")
        assert result.exit_code == 0, result.output
        assert json.loads((folder / "verify" / "report.json").read_text())["variants"]["fp32"].startswith(
            str(caches[name]))


def test_reexport_with_force_drops_the_old_models_verify_reports(tiny_bert_source, tmp_path):
    bert = load_model(str(tiny_bert_source))
    out = _export(bert, 8, tmp_path / "out")
    assert _verify(out, "--ep", "cpu", "--min-cosine", "0", "--min-speedup", "0").exit_code == 0
    assert (out / "verify" / "report.json").is_file()
    export_quantized(bert, lambda _l, graph: uniform_plan(graph, 4), out / "model.onnx", force=True, progress=False)
    assert not (out / "verify").exists()


def test_max_kl_gates_only_when_given():
    from cptquant.runtimes.gate import Thresholds, gate

    measured = {"quality": {"vs_fp32": {"ppl_increase": 0.01, "kl_divergence": 0.2, "top1_agreement": 0.8}},
                "speed": {"vs_fp32": {"geomean_speedup": 2.0}}}
    names = [c.name for c in gate("cpu", measured, "text-generation-with-past", "fp32", Thresholds())]
    assert not any("KL" in n for n in names)
    checks = gate("cpu", measured, "text-generation-with-past", "fp32", Thresholds(max_kl=0.1))
    kl = next(c for c in checks if "KL" in c.name)
    assert not kl.passed and "0.2 > 0.1" in kl.line()
