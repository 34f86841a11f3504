"""`cptq verify`'s encoder-decoder measures (cptquant/runtimes/seq2seq.py) on tiny T5 and BART models.

The decode loop must generate what transformers generates (else generation agreement between two variants would
compare two wrong answers); a variant against itself must score exactly zero KL and full agreement; the export's
short verification must carry the figures (the command-line path, `cptq verify` on a folder and the report schema
are in tests/test_architectures.py)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from test_report_schemas import _errors

import cptquant
from cptquant.model_loading import wrap_model
from cptquant.onnx_io.onnx_export import MODEL_FILE, export_onnx
from cptquant.runtimes.cpu import CpuAdapter
from cptquant.runtimes.eval_text import TextEncoder
from cptquant.runtimes.quality import QualitySettings
from cptquant.runtimes.seq2seq import greedy_generate, open_seq2seq_sessions, seq2seq_quality, start_token
from cptquant.tiny_families import FAMILIES, SEQ2SEQ


@pytest.fixture(scope="module", params=["t5", "bart"])
def fp32_export(request, tmp_path_factory):
    model = FAMILIES[request.param].build()
    folder = tmp_path_factory.mktemp(request.param)
    export_onnx(wrap_model(model, SEQ2SEQ, None, name=request.param), folder)
    return model, folder


def test_greedy_decode_with_past_matches_transformers(fp32_export):
    model, folder = fp32_export
    adapter = CpuAdapter(threads=2)
    sessions, facts = open_seq2seq_sessions(adapter, {"fp32": folder / MODEL_FILE}, model.config)
    assert facts["fp32"]["bytes_on_disk"] > 0 and facts["fp32"]["peak_rss_bytes"] is None
    ids = np.random.default_rng(0).integers(4, model.config.vocab_size, size=(1, 12))
    steps, generated = greedy_generate(adapter, sessions["fp32"], ids, start_token(model.config), 8)
    assert len(steps) == 7 and all(s > 0 for s in steps)
    # Plain argmax greedy in torch, the whole prefix re-read each step (no cache, no logits processors)
    prefix = [start_token(model.config)]
    with torch.no_grad():
        for _ in range(8):
            logits = model(input_ids=torch.from_numpy(ids), decoder_input_ids=torch.tensor([prefix])).logits
            prefix.append(int(logits[0, -1].argmax()))
    assert generated == prefix[1:]


def test_a_variant_against_itself_scores_no_difference(fp32_export):
    model, folder = fp32_export
    adapter = CpuAdapter(threads=2)
    sessions, _ = open_seq2seq_sessions(adapter, {"quantized": folder / MODEL_FILE, "fp32": folder / MODEL_FILE},
                                        model.config)
    quality = seq2seq_quality(SEQ2SEQ, adapter, sessions, TextEncoder(folder, model.config), model.config,
                              QualitySettings(n_texts=16), progress=False)
    vs = quality.vs["fp32"]
    assert quality.n_examples > 100 and quality.settings["teacher_forced"]
    assert vs["ppl_increase"] == 0 and abs(vs["kl_divergence"]) < 1e-6
    assert vs["top1_agreement"] == 1 and vs["generation_token_agreement"] == 1 and vs["generation_exact_match"] == 1


@pytest.mark.parametrize("name", ["t5", pytest.param("bart", marks=pytest.mark.matrix)])
def test_short_verification_of_a_4_bit_export(name, tmp_path):
    """The export's short verification of an encoder-decoder: 4-bit weights move the teacher-forced distributions
    measurably but not wholly, and the speed figures cover the encoder pass and the decode step of all files."""
    family = FAMILIES[name]
    result = cptquant.export(family.build(), tmp_path / "out", task=SEQ2SEQ, bits=4, calib_samples=8, seq_len=32)
    verification = result.report.verification
    assert "error" not in verification, verification
    vs = verification["quality"]["vs_fp32"]
    assert 0 < vs["kl_divergence"] < 0.5 and 0.5 < vs["top1_agreement"] < 1
    speed = verification["speed"]
    assert set(speed["vs_fp32"]["latency_speedup"]) == {"encoder_b1_s16", "decode_per_token"}
    assert speed["variants"]["quantized"]["bytes_on_disk"] == result.report.model_bytes
    assert speed["vs_fp32"]["smaller_on_disk_by"] > 2
    assert _errors("export-report.schema.json", result.report.to_dict()) == []
