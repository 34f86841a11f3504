"""The exporter's output bytes, pinned: tiny OPT, BERT and Llama with mixed 4/8/16-bit plans, in every
--format, with round-to-nearest and GPTQ codes.

The sha256 of model.onnx (no external data at this size) and of the report's per-layer records and
graph check were computed on the code before the lowering became onnx-ir passes (main, 218ac0b); any
change to them is a change of what users get, and must be deliberate (re-pin with
`python tests/test_export_bytes.py`, which prints the current values).

Re-pinned deliberately since: the tiny Llama's three model.onnx hashes, when its attention became
GroupQueryAttention by default (exporter/attention_fusion.py; `attention="optimum"` still gives the old
bytes, and the layer records and graph check did not change); then its qdq case, now written as the
MatMulNBits ORT fuses qdq into (such a file needs com.microsoft ops anyway): the same bytes as nbits, since
this mixed plan gives no two layers that read one input the same bits, so nothing is fused here; then the
three again, when the residual Adds + RMSNorms of such a file became SkipSimplifiedLayerNormalization
(lowering/skip_rms_norm.py; layer records and graph check unchanged); then tiny OPT's two GPTQ cases, when
a 4-bit table tied to the LM head got GPTQ codes for the head (quant/weight_quantizers.py): pinned on the
machine whose FP32 export of tiny OPT differs from the first pins' (the first machine's then have no pin for
those two cases and skip, saying so; its other cases keep theirs); then every GPTQ case, when the Hessians
became sequential (each block's measured on the blocks before it as written: passes/hessian.py); then the
Llama GPTQ case (the only one with `clip="mse"`), when GPTQ's clip search began to weigh each row by its input
energy (quant/quantize.py's `row_weights`); then the Llama cases again, when rotary moved inside
GroupQueryAttention and GQA began to read a fused q/k/v kernel's packed output (lowering/group_query_attention.py,
fused_kernels.py). Since then a calibration case's pins are keyed by the FP32 export and the numerics'
fingerprint (`pin_key`), so that several machines' pins can stand side by side; the keys without a
fingerprint are the older pins, made under NUMERICS. The Llama GPTQ case's pin of that machine went stale with
the rotary change and could not be made again here (another CPU): it holds this session's AMD EPYC's pin alone.

The inputs are deterministic: seeded tiny models with the offline tokenizer, explicit plans (hot rows
given, zero points and block sizes mixed), the offline calibration corpus. What the pins cannot hold
across machines: the FP32 export comes from torch and optimum, and GPTQ's Hessians and the outlier
channels' peaks from torch forward passes and BLAS sums, whose last bits depend on the CPU and the
library versions. The test therefore pins per FP32 model.onnx (a case can hold pins for several) and
checks a fingerprint of the float numerics the calibration cases see, and skips, saying so, where there is
no pin for the FP32 export or the numerics differ: the pins then describe another machine's inputs.
"""

from __future__ import annotations

import hashlib
import json
from functools import cache, lru_cache
from pathlib import Path

import numpy as np
import pytest

NUMERICS = '8a7977efa9be8dc2dce152a9907f836db3a9294539f790661862cc9034eca2c7'
# (model, format, algorithm): {the first 16 hex digits of the sha256 of the FP32 model.onnx the case starts from:
# (sha256 of model.onnx, sha256 of the report's layers and graph check)}. Per FP32 export, because tiny OPT's
# differs between machines (the first pins' and the AMX Xeon of 2026-11-30: torch's seeded init).
CASES = {
    ('opt', 'qdq', 'rtn'): {
        '863b287e857384b6': ('a475b45f8aea549218186efa62c6b8968ac6000004fd3f1fc25bcc0b8108bf26',
                            '6d7dc2789ea84931783fd3333a3b8ed7d4fb691dfeb30b12bdf0c68c2ae4a9a8'),
        '24fbecfe7341bc22': ('4e42a9b34456e35966131ce815def616f7cc849d04f83f3464e9527035133722',
                            'd73c285f3209179b6c8178d4f2fbf0090f9cf34f843a49610d50a949b68055e2'),
    },
    ('opt', 'qdq', 'gptq'): {
        '24fbecfe7341bc22+0af25fd6300d9da8': ('fc8024fde267660cfa2b5f48fe97cc1a62b0200d71f0d7081080bc3007c982f4',
                            'ef99b9602b35e13b6ea48b76bc180f8cd2a83ea3b66c0298be26bbb3bac86f71'),
        '24fbecfe7341bc22': ('fc8024fde267660cfa2b5f48fe97cc1a62b0200d71f0d7081080bc3007c982f4',
                            'ef99b9602b35e13b6ea48b76bc180f8cd2a83ea3b66c0298be26bbb3bac86f71'),
        '24fbecfe7341bc22+d685e0497ca4ce86': ('fc8024fde267660cfa2b5f48fe97cc1a62b0200d71f0d7081080bc3007c982f4',
                            'ef99b9602b35e13b6ea48b76bc180f8cd2a83ea3b66c0298be26bbb3bac86f71'),
    },
    ('opt', 'nbits', 'gptq'): {
        '24fbecfe7341bc22+0af25fd6300d9da8': ('220c417c8b043538811c9141c97926543180e88f313a753101124e64ae86c124',
                            '042c82f14bde21015951496d991ec7f12fe7024b3c635377198f740f30d3eca3'),
        '24fbecfe7341bc22': ('220c417c8b043538811c9141c97926543180e88f313a753101124e64ae86c124',
                            '042c82f14bde21015951496d991ec7f12fe7024b3c635377198f740f30d3eca3'),
        '24fbecfe7341bc22+d685e0497ca4ce86': ('220c417c8b043538811c9141c97926543180e88f313a753101124e64ae86c124',
                            '042c82f14bde21015951496d991ec7f12fe7024b3c635377198f740f30d3eca3'),
    },
    ('opt', 'dynamic', 'rtn'): {
        '24fbecfe7341bc22+0af25fd6300d9da8': ('00bbad05eb912ef9241a0b3b10fabe762ce122c5c319b1c4838b97e9ab8d1094',
                            '840c058ac42e2c3763d4006433c2c42ff9328516a08e59f04832df2863888421'),
        '863b287e857384b6': ('00bbad05eb912ef9241a0b3b10fabe762ce122c5c319b1c4838b97e9ab8d1094',
                            '89cd28b66d5949f9122580e80b4559b1f59156be43082f3d034228bbf1075145'),
        '24fbecfe7341bc22': ('00bbad05eb912ef9241a0b3b10fabe762ce122c5c319b1c4838b97e9ab8d1094',
                            '840c058ac42e2c3763d4006433c2c42ff9328516a08e59f04832df2863888421'),
        '24fbecfe7341bc22+d685e0497ca4ce86': ('00bbad05eb912ef9241a0b3b10fabe762ce122c5c319b1c4838b97e9ab8d1094',
                            '840c058ac42e2c3763d4006433c2c42ff9328516a08e59f04832df2863888421'),
    },
    ('bert', 'qdq', 'gptq'): {
        'e76b78283161f3a6+0af25fd6300d9da8': ('1a5d14b69ff7c940fbe802fa367a2f9bad269c69ec8f804cbb98e37c0a1f0a73',
                            '8e9447a16582a288790aebd3b5d6c1ef014108cd651b26666db86e916719204e'),
        'e76b78283161f3a6': ('1a5d14b69ff7c940fbe802fa367a2f9bad269c69ec8f804cbb98e37c0a1f0a73',
                            '8e9447a16582a288790aebd3b5d6c1ef014108cd651b26666db86e916719204e'),
        'e76b78283161f3a6+d685e0497ca4ce86': ('1a5d14b69ff7c940fbe802fa367a2f9bad269c69ec8f804cbb98e37c0a1f0a73',
                            '8e9447a16582a288790aebd3b5d6c1ef014108cd651b26666db86e916719204e'),
    },
    ('bert', 'nbits', 'rtn'): {
        'e76b78283161f3a6': ('ad9656dd3d55556acff3f788c61f03cf85073501448062f2e0c31c8a6ab9a6e7',
                            '9323c4423a29871183b1526172fc08f5b28e5b5d2ba781ec3b0809f89b692198'),
    },
    ('bert', 'dynamic', 'gptq'): {
        'e76b78283161f3a6+0af25fd6300d9da8': ('2e1e0d21cc211fee9c234c2006870c10485547bcd940bfd8a7383d7b097eb5e9',
                            '47b8eb2ced9f1e0fe19f5cd1e45f8984cfa2ee44822f05622600b922de5b40a3'),
        'e76b78283161f3a6': ('2e1e0d21cc211fee9c234c2006870c10485547bcd940bfd8a7383d7b097eb5e9',
                            '47b8eb2ced9f1e0fe19f5cd1e45f8984cfa2ee44822f05622600b922de5b40a3'),
        'e76b78283161f3a6+d685e0497ca4ce86': ('efcc0ff9f251a7ad726a5451741a8a31af184515c84059ddc03fa1af70690267',
                            '0608c392251173b55a2448c432767b0a3a5db42b4ecb37f55924a53680263354'),
    },
    ('llama', 'qdq', 'rtn'): {
        '8f22f78ef8b199c2': ('81b9fe88d67ad40d1b95d34cc521aaa316e0bf7e693d50ab730562fd8335a3f2',
                            'c5a33d99ac53195fe5f6aa553a556009b002f82bbfd759238438838b6bb55806'),
    },
    ('llama', 'nbits', 'rtn'): {
        '8f22f78ef8b199c2': ('81b9fe88d67ad40d1b95d34cc521aaa316e0bf7e693d50ab730562fd8335a3f2',
                            'c5a33d99ac53195fe5f6aa553a556009b002f82bbfd759238438838b6bb55806'),
    },
    ('llama', 'dynamic', 'gptq'): {
        '8f22f78ef8b199c2+0af25fd6300d9da8': ('950073558c05291dc5c5ddcda36e4fd4bdbe9ba4570b4ce0fdce91cf8b165e38',
                            'f9599c31cc4204366480f844545d1dbab1016cdb7926d29d52dc04cc55abeec1'),
        '8f22f78ef8b199c2+d685e0497ca4ce86': ('e5553dfac2b61a7c6f3b167885951df04f44e30312a4c3c8a97924619f773210',
                            '88a5b3f90ddf0eb909711c01a381eb3cc8ed4ba8367294798f1033ed12f9db1a'),
    },
}

MODELS = ("opt", "bert", "llama")
# Every model in every format, each format and each model with both algorithms; OPT's qdq twice, since its
# FusedGemm repair rewrites the graph a second time (GPTQ's codes are memoised across the two).
PINNED = (("opt", "qdq", "rtn"), ("opt", "qdq", "gptq"), ("opt", "nbits", "gptq"), ("opt", "dynamic", "rtn"),
          ("bert", "qdq", "gptq"), ("bert", "nbits", "rtn"), ("bert", "dynamic", "gptq"),
          ("llama", "qdq", "rtn"), ("llama", "nbits", "rtn"), ("llama", "dynamic", "gptq"))
# Below the default (6): the tiny random models' inputs have no channel 6x above the median, and the
# smoothing must be exercised.
OUTLIER_RATIO = 1.5


def _hot_rows(rows: int) -> list[int]:
    return sorted({(i * 37) % rows for i in range(rows // 8)})


def mixed_plan(model: str):
    """The plan factory: 4/8/16 bits in turn over the blocks' layers; 4-bit layers asymmetric but every
    third one; block size 16 on every fifth; the token embedding at 4 bits with hot rows (OPT: none, its
    table is the LM head's too, which gets its bits)."""
    from cptquant.plan import LayerPlan, Plan

    def make(loaded, graph) -> Plan:
        layers, cycle = {}, (4, 8, 16)
        for i, layer in enumerate(graph.layers):
            bits = cycle[i % 3] if layer.block is not None else 8
            layers[layer.name] = LayerPlan(bits=bits, block_size=16 if i % 5 == 4 else 32,
                                           symmetric=bits != 4 or i % 3 == 0)
        table = next(layer for layer in graph.layers if layer.role == "embedding")
        layers[table.name] = LayerPlan(bits=4, block_size=32, symmetric=False,
                                       hot_rows=None if model == "opt" else _hot_rows(table.out_features))
        if model == "opt":
            layers["lm_head"] = LayerPlan(bits=4, block_size=32, symmetric=False)
        if model == "llama":
            layers["lm_head"] = LayerPlan(bits=8, block_size=32, symmetric=True)
        return Plan(layers=layers, method="pinned", model=f"tiny-{model}", clip="mse" if model == "llama" else "absmax")

    return make


@cache
def _loaded(model: str):
    from cptquant.model_loading import wrap_model
    from cptquant.testing import tiny_bert, tiny_llama, tiny_opt, tiny_tokenizer

    build = {"opt": tiny_opt, "bert": tiny_bert, "llama": tiny_llama}[model]
    built = build()
    return wrap_model(built, tokenizer=tiny_tokenizer(built.config.model_type), name=f"tiny-{model}")


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def fp32_export_hash(model: str, folder: Path) -> str:
    from cptquant.onnx_io.onnx_export import export_onnx

    return _sha256(export_onnx(_loaded(model), folder))


@lru_cache(maxsize=1)
def numerics_fingerprint() -> str:
    """The float results the GPTQ and smoothing cases rest on, in small: a torch forward pass of each tiny
    model on fixed ids, and a float32 BLAS product."""
    import torch

    digest = hashlib.sha256()
    ids = torch.tensor([[5, 17, 99, 312, 45, 8, 600, 21]])
    with torch.no_grad():
        for model in MODELS:
            out = _loaded(model).model(input_ids=ids, attention_mask=torch.ones_like(ids))
            first = out[0] if isinstance(out, tuple) else next(iter(out.values()))
            digest.update(first.numpy().tobytes())
    rng = np.random.default_rng(0)
    a, b = rng.standard_normal((128, 64), np.float32), rng.standard_normal((64, 96), np.float32)
    digest.update((a @ b).tobytes())
    return digest.hexdigest()


def export_case(model: str, fmt: str, algorithm: str, out: Path) -> tuple[tuple[str, str], dict]:
    """(sha256 of model.onnx, sha256 of the report's layers and graph check), and the report."""
    from cptquant.exporter.pipeline import export_quantized
    from cptquant.options import CalibrationOptions
    from cptquant.passes.measurements import CalibrationMeasurements

    calibration = CalibrationMeasurements(CalibrationOptions(calib_samples=16, seq_len=32))  # the offline corpus, briefly
    result = export_quantized(_loaded(model), mixed_plan(model), out / "model.onnx", progress=False, fmt=fmt,
                              algorithm=algorithm, outlier_ratio=OUTLIER_RATIO, calibration=calibration)
    files = sorted(p.name for p in out.iterdir() if p.name.startswith("model.onnx"))
    assert files == ["model.onnx"], files  # no external data at this size: the one file is the model
    report = result.report.to_dict()
    records = {"layers": report["layers"], "graph_check": report["graph_check"]}
    hashes = _sha256(out / "model.onnx"), hashlib.sha256(json.dumps(records, sort_keys=True).encode()).hexdigest()
    return hashes, report


def _uses_calibration(fmt: str, algorithm: str) -> bool:
    return algorithm == "gptq" or fmt == "dynamic"


def pin_key(fp32_hash: str, fmt: str, algorithm: str, numerics: str) -> str:
    """A case's key in CASES: the FP32 export's hash; for a calibration case also the float numerics'
    fingerprint ("<fp32>+<numerics>"). A calibration key without the numerics was pinned under NUMERICS."""
    return fp32_hash[:16] + (f"+{numerics[:16]}" if _uses_calibration(fmt, algorithm) else "")


@pytest.fixture(scope="module")
def pinned_inputs(tmp_path_factory):
    """The FP32 export of each model, and the fingerprint of this machine's float numerics."""
    fp32 = {m: fp32_export_hash(m, tmp_path_factory.mktemp(f"fp32-{m}")) for m in MODELS}
    return fp32, numerics_fingerprint()


@pytest.fixture(scope="module")
def exports(tmp_path_factory):
    """Each pinned case exported once: (hashes, report)."""
    done: dict[tuple, tuple] = {}

    def export(case):
        if case not in done:
            done[case] = export_case(*case, tmp_path_factory.mktemp("-".join(case)))
        return done[case]

    return export


@pytest.mark.parametrize("case", PINNED, ids="-".join)
def test_export_bytes_are_pinned(case, pinned_inputs, exports):
    model, fmt, algorithm = case
    fp32, numerics = pinned_inputs
    pins = CASES[case].get(pin_key(fp32[model], fmt, algorithm, numerics))
    if pins is None and _uses_calibration(fmt, algorithm) and numerics == NUMERICS:
        pins = CASES[case].get(fp32[model][:16])
    if pins is None:
        pytest.skip(f"no pin for this FP32 export of tiny {model} (other torch/optimum/CPU)"
                    + (" and these torch/BLAS float results" if _uses_calibration(fmt, algorithm) else ""))
    assert exports(case)[0] == pins


def test_pinned_cases_take_the_paths_they_are_meant_to(exports):
    """Channels smoothed, hot rows written, the FusedGemm repair taken, GPTQ used: else the pins pin less."""
    report = exports(("bert", "dynamic", "gptq"))[1]
    assert sum(entry.get("outlier_channels", 0) for entry in report["layers"].values()) > 0
    assert report["layers"]["embeddings.word_embeddings"]["hot_rows"] > 0
    assert report["algorithm"] == ["gptq", "rtn"]
    report = exports(("opt", "qdq", "rtn"))[1]
    assert report["graph_check"]["written_as_matmulnbits_after_check"]
    table = exports(("opt", "nbits", "gptq"))[1]["layers"]["model.decoder.embed_tokens"]
    assert table["bits"] == 4 and table["algorithm"] == "gptq"  # the 4-bit table tied to the LM head: GPTQ for the head
    assert {entry["bits"] for entry in report["layers"].values()} == {4, 8, 16}
    assert {entry["block_size"] for entry in report["layers"].values()} == {None, 16, 32}


if __name__ == "__main__":  # print the current values, to (re)pin them deliberately
    import tempfile

    import torch

    torch.set_num_threads(2)
    with tempfile.TemporaryDirectory() as tmp:
        fp32 = {m: fp32_export_hash(m, Path(tmp) / f"fp32-{m}") for m in MODELS}
        print(f"numerics fingerprint {numerics_fingerprint()!r}")
        print("CASES (this machine's entries) = {")
        for m, f, a in PINNED:
            hashes = export_case(m, f, a, Path(tmp) / f"{m}-{f}-{a}")[0]
            key = pin_key(fp32[m], f, a, numerics_fingerprint())
            print(f"    ({m!r}, {f!r}, {a!r}): {{{key!r}: ({hashes[0]!r},\n{' ' * 30}{hashes[1]!r})}},")
        print("}")
