"""GPTQ: same storage as round-to-nearest, lower output error on correlated inputs, and its Hessians."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from cptquant.layer_graph import ROLE_EMBEDDING, build_layer_graph
from cptquant.model_loading import TASK_FEATURES, LoadedModel
from cptquant.passes.calibration import CalibrationSet, build_calibration
from cptquant.passes.hessian import BlockwiseHessians, collect_hessians, hessians_by_block
from cptquant.quant.gptq import gptq_quantize, inverse_hessian_cholesky
from cptquant.quant.quantize import block_codes, block_params, quantize_blocked


def _correlated_layer(k=128, n=48, tokens=2048, seed=0):
    """Inputs X = Z A with strongly correlated features, a weight W [K, N] and H = XᵀX / tokens."""
    rng = np.random.default_rng(seed)
    z = rng.standard_normal((tokens, k))
    a = rng.standard_normal((k, k)) / np.sqrt(k) + 0.5 * np.eye(k)
    x = (z @ a).astype(np.float32)
    w = (rng.standard_normal((k, n)) * 0.05).astype(np.float32)
    return x, w


def _hessian(x):
    x64 = x.astype(np.float64)
    return x64.T @ x64 / len(x)


def _output_error(x, w, quantized):
    return float(np.linalg.norm(x @ quantized.dequantize() - x @ w))


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("clip", ["absmax", "mse"])
def test_identity_hessian_is_round_to_nearest(bits, symmetric, clip):
    _, w = _correlated_layer(k=96, n=40)
    w[:32, :5] = 0.0  # an all-zero block keeps its safe scale of 1
    gptq = gptq_quantize(w, np.eye(96), bits, 32, symmetric, clip)
    rtn = quantize_blocked(w, bits, 32, symmetric, clip)
    assert gptq.q.dtype == rtn.q.dtype
    assert np.array_equal(gptq.q, rtn.q)
    assert np.array_equal(gptq.scale, rtn.scale)
    if symmetric:
        assert gptq.zero_point is None
    else:
        assert np.array_equal(gptq.zero_point, rtn.zero_point)


@pytest.mark.parametrize("symmetric", [True, False])
def test_act_order_with_diagonal_hessian_is_round_to_nearest(symmetric):
    # No cross terms: nothing to compensate, so any order gives RTN; checks the codes go back in place.
    _, w = _correlated_layer(k=96, n=40)
    diag = np.random.default_rng(3).uniform(0.1, 10.0, 96)
    gptq = gptq_quantize(w, np.diag(diag), 4, 32, symmetric, act_order=True)
    rtn = quantize_blocked(w, 4, 32, symmetric)
    assert np.array_equal(gptq.q, rtn.q) and np.array_equal(gptq.scale, rtn.scale)


@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("clip", ["mse", "auto"])  # auto, the exporter's default: GPTQ searches, RTN takes absmax
def test_the_clip_search_weighs_rows_by_their_input_energy(symmetric, clip):
    # A diagonal Hessian leaves nothing to compensate: GPTQ is then round-to-nearest whose clipping range per
    # block minimises Σ H_kk (ŵ − w)², not the plain squared error.
    _, w = _correlated_layer(k=96, n=40)
    diag = np.random.default_rng(3).uniform(0.01, 10.0, 96).astype(np.float32)
    gptq = gptq_quantize(w, np.diag(diag), 4, 32, symmetric, clip, act_order=True)
    blocks = w.reshape(3, 32, 40)
    scale, zero_point = block_params(blocks, 4, symmetric, "mse", diag.reshape(3, 32))
    assert np.array_equal(gptq.scale, scale)
    assert np.array_equal(gptq.q, block_codes(blocks, scale, zero_point, 4).reshape(96, 40))
    assert not np.array_equal(gptq.scale, quantize_blocked(w, 4, 32, symmetric, "mse").scale)
    assert np.array_equal(quantize_blocked(w, 4, 32, symmetric, "auto").scale, quantize_blocked(w, 4, 32, symmetric).scale)


@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("clip", ["absmax", "mse"])
@pytest.mark.parametrize("act_order", [False, True])
def test_gptq_beats_round_to_nearest_on_correlated_inputs(symmetric, clip, act_order):
    x, w = _correlated_layer()
    x *= np.random.default_rng(1).uniform(0.2, 3.0, x.shape[1]).astype(np.float32)  # uneven input scales
    gptq = gptq_quantize(w, _hessian(x), 4, 32, symmetric, clip, act_order=act_order)
    rtn = quantize_blocked(w, 4, 32, symmetric, clip)
    assert _output_error(x, w, gptq) < 0.8 * _output_error(x, w, rtn)


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("symmetric", [True, False])
def test_storage_layout(bits, symmetric):
    x, w = _correlated_layer(k=160, n=24)
    qw = gptq_quantize(w, _hessian(x), bits, 32, symmetric)
    assert qw.q.shape == (160, 24) and qw.scale.shape == (5, 24)
    assert qw.bits == bits and qw.block_size == 32 and qw.symmetric == symmetric
    assert qw.scale.dtype == np.float32 and (qw.scale > 0).all()
    if symmetric:
        assert qw.q.dtype == np.int8
        assert qw.q.min() >= -(2 ** (bits - 1)) and qw.q.max() <= 2 ** (bits - 1) - 1
    else:
        assert qw.q.dtype == np.uint8 and qw.zero_point.dtype == np.uint8
        assert qw.zero_point.shape == (5, 24)
        assert qw.q.max() <= 2**bits - 1 and qw.zero_point.max() <= 2**bits - 1
    dq = qw.dequantize()
    assert dq.shape == w.shape and dq.dtype == np.float32 and np.isfinite(dq).all()


def test_block_size_must_divide_k_and_hessian_must_match():
    x, w = _correlated_layer(k=96, n=8)
    with pytest.raises(ValueError):
        gptq_quantize(w, _hessian(x), 4, 64)
    with pytest.raises(ValueError):
        gptq_quantize(w, np.eye(64), 4, 32)


@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("act_order", [False, True])
def test_dead_input_is_zeroed_and_the_rest_still_compensated(symmetric, act_order):
    x, w = _correlated_layer()
    x[:, [3, 70]] = 0.0  # inputs that never fire: zero rows and columns in H
    gptq = gptq_quantize(w, _hessian(x), 4, 32, symmetric, act_order=act_order)
    dq = gptq.dequantize()
    assert np.isfinite(dq).all()
    assert (dq[[3, 70]] == 0).all()
    assert _output_error(x, w, gptq) < 0.8 * _output_error(x, w, quantize_blocked(w, 4, 32, symmetric))


def test_inverse_hessian_cholesky_is_upper_factor_of_dampened_inverse():
    x, _ = _correlated_layer(k=64)
    h = _hessian(x)
    upper, dead = inverse_hessian_cholesky(h, damp=0.01)
    dampened = h + 0.01 * np.mean(np.diag(h)) * np.eye(64)
    assert not dead.any()
    assert np.array_equal(upper, np.triu(upper)) and (np.diag(upper) > 0).all()
    np.testing.assert_allclose(upper.T @ upper @ dampened, np.eye(64), atol=1e-8)


@pytest.mark.parametrize("k", [1, 255, 256, 600])
def test_a_hessian_from_one_triangle_equals_the_full_product(k):
    """syrk computes one triangle of xᵀx; the accumulator mirrors it: the same matrix as the full product, exactly
    symmetric, for sizes that are not a multiple of the mirror's band."""
    from cptquant.passes.hessian import _gram_lower, _HessianAccumulator

    rng = np.random.default_rng(k)
    accumulator, full, tokens = _HessianAccumulator(), np.zeros((k, k)), 0
    for rows in (7, 50):
        x = torch.from_numpy(rng.standard_normal((rows, k)).astype(np.float32))
        accumulator.add(_gram_lower(x), rows)
        full += (x.T @ x).double().numpy()
        tokens += rows
    h = accumulator.hessian()
    assert h.flags.c_contiguous and np.array_equal(h, h.T)
    np.testing.assert_allclose(h, full / tokens, rtol=1e-5, atol=1e-5)


def _tiny_bert_loaded():
    from transformers import BertConfig, BertModel

    torch.manual_seed(0)
    config = BertConfig(vocab_size=1000, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                        intermediate_size=128, max_position_embeddings=128)
    model = BertModel(config).eval()
    return LoadedModel(model, config, None, TASK_FEATURES, "tiny-bert", "tiny-bert")


def test_hessians_are_symmetric_psd_for_every_linear_and_skip_embeddings():
    loaded = _tiny_bert_loaded()
    graph = build_layer_graph(loaded.model)
    calib = build_calibration(loaded, samples=16, seq_len=32)
    hessians = collect_hessians(loaded, graph, calib, graph.names(), progress=False)
    linear = [layer for layer in graph.layers if layer.role != ROLE_EMBEDDING]
    assert set(hessians) == {layer.name for layer in linear}
    for layer in linear:
        h = hessians[layer.name]
        assert h.shape == (layer.in_features, layer.in_features) and h.dtype == np.float64
        np.testing.assert_allclose(h, h.T, rtol=1e-6, atol=1e-9)
        assert np.linalg.eigvalsh(h).min() > -1e-6 * np.abs(h).max()
        assert np.trace(h) > 0
    # query, key and value read the same input
    np.testing.assert_array_equal(hessians["encoder.layer.0.attention.self.query"],
                                  hessians["encoder.layer.0.attention.self.value"])


def test_hessians_ignore_padded_tokens():
    loaded = _tiny_bert_loaded()
    graph = build_layer_graph(loaded.model)
    names = [layer.name for layer in graph.layers if layer.role != ROLE_EMBEDDING]
    gen = torch.Generator().manual_seed(1)
    lengths = [7, 20, 12, 3]
    rows = [torch.randint(1, 1000, (length,), generator=gen) for length in lengths]
    padded_ids = torch.zeros((len(rows), max(lengths)), dtype=torch.long)
    padded_mask = torch.zeros_like(padded_ids)
    for i, row in enumerate(rows):
        padded_ids[i, : len(row)] = row
        padded_mask[i, : len(row)] = 1
    padded = CalibrationSet([{"input_ids": padded_ids, "attention_mask": padded_mask}], "test", 20)
    unpadded = CalibrationSet([{"input_ids": row[None], "attention_mask": torch.ones_like(row[None])} for row in rows],
                              "test", 20)
    with_padding = collect_hessians(loaded, graph, padded, names, progress=False)
    without = collect_hessians(loaded, graph, unpadded, names, progress=False)
    for name in names:
        scale = np.abs(without[name]).max()
        np.testing.assert_allclose(with_padding[name], without[name], atol=1e-5 * scale, err_msg=name)


@pytest.mark.parametrize("family", ["llama", "opt", "gpt2", "bert", "albert"])
def test_block_by_block_hessians_equal_the_one_pass_ones_bit_for_bit(family):
    """The export measures Hessians one block at a time (memory: one block's at once); the codes GPTQ
    writes must not change, so neither may a single bit of a Hessian. ALBERT runs one shared block for
    all its layers: it is measured in one pass."""
    from cptquant.model_loading import wrap_model
    from cptquant.testing import tiny_tokenizer
    from cptquant.tiny_families import build

    loaded = wrap_model(build(family), None, tiny_tokenizer("opt"))
    graph = build_layer_graph(loaded.model)
    calib = build_calibration(loaded, samples=8, seq_len=32)
    names = graph.names()
    at_once = collect_hessians(loaded, graph, calib, names, progress=False)
    by_block = hessians_by_block(loaded, graph, calib, names, progress=False)
    assert isinstance(by_block, BlockwiseHessians) == (family != "albert")
    assert set(by_block) == set(at_once)
    for name in reversed(list(at_once)):  # asked out of order too: an earlier block is measured again
        np.testing.assert_array_equal(by_block[name], at_once[name], err_msg=name)
    if isinstance(by_block, BlockwiseHessians):
        assert len(by_block.held) < len(at_once)  # one block's Hessians (or the head's) at a time


def test_the_head_s_hessian_is_measured_without_computing_the_logits():
    """The tail's pass stops once the head has read its input: the head's own product (the logits over the
    vocabulary, the largest of a small LM's) never runs, and its Hessian is the one-pass one."""
    from cptquant.model_loading import wrap_model
    from cptquant.testing import tiny_tokenizer
    from cptquant.tiny_families import build

    loaded = wrap_model(build("llama"), None, tiny_tokenizer("opt"))
    graph = build_layer_graph(loaded.model)
    calib = build_calibration(loaded, samples=8, seq_len=32)
    head = "lm_head"
    by_block = hessians_by_block(loaded, graph, calib, [head], progress=False)
    calls = []
    handle = loaded.model.get_submodule(head).register_forward_hook(lambda *_: calls.append(1))
    try:
        measured = by_block[head]
    finally:
        handle.remove()
    assert calls == []
    np.testing.assert_array_equal(measured, collect_hessians(loaded, graph, calib, [head], progress=False)[head])


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_later_blocks_are_measured_on_the_earlier_blocks_as_written(family):
    """Sequential GPTQ: once a block's layers are written (rounded), the next block's Hessians are those of
    the model with that block's weights as written (GPT-2's Conv1D weights are [K, N] in torch, the others
    [N, K]); the written weights are not kept once used, and the torch weights come back untouched."""
    import copy

    from cptquant.model_loading import wrap_model
    from cptquant.passes.common import weight_param
    from cptquant.testing import tiny_tokenizer
    from cptquant.tiny_families import build

    loaded = wrap_model(build(family), None, tiny_tokenizer("opt"))
    graph = build_layer_graph(loaded.model)
    calib = build_calibration(loaded, samples=8, seq_len=32)
    names = [layer.name for layer in graph.layers if layer.block in (0, 1)]
    before = {name: p.detach().clone() for name, p in loaded.model.named_parameters()}
    by_block = hessians_by_block(loaded, graph, calib, names, progress=False)
    rounded = copy.deepcopy(loaded.model)
    for layer in graph.layers:
        if layer.block == 0:
            by_block.pop(layer.name)
            weight = weight_param(loaded.model, layer).detach().numpy()
            kn = weight if layer.role == "conv1d" else weight.T
            written = quantize_blocked(kn, 4, 16, False).dequantize()
            by_block.write(layer.name, lambda written=written: written)
            with torch.no_grad():
                weight_param(rounded, layer).copy_(torch.from_numpy(written if layer.role == "conv1d" else written.T))
    expected = collect_hessians(wrap_model(rounded, None, loaded.tokenizer), graph, calib, names, progress=False)
    block_1 = [layer.name for layer in graph.layers if layer.block == 1 and layer.role != ROLE_EMBEDDING]
    fp32 = collect_hessians(loaded, graph, calib, block_1, progress=False)
    for name in block_1:
        np.testing.assert_allclose(by_block[name], expected[name], rtol=1e-5, atol=1e-7, err_msg=name)
        assert not np.allclose(fp32[name], expected[name], rtol=1e-3)  # the rounding does reach block 1
    assert by_block.written == {}
    for name, p in loaded.model.named_parameters():
        assert torch.equal(p, before[name]), name


def test_gptq_codes_are_memoised_before_the_hessian_is_asked_for():
    """The MatMulNBits repair lowers the graph a second time: the codes come from the memo, and no Hessian
    is asked for again (measured on demand, block by block, a second request would re-run the forward)."""
    from cptquant.quant.weight_quantizers import Gptq

    x, w = _correlated_layer(k=64, n=16)
    asked = []

    class Counting(dict):
        def pop(self, name, default):
            asked.append(name)
            return _hessian(x)

    quantizer = Gptq(lambda names: Counting(), ["layer"])
    first = quantizer("layer", w, 4, 32, True, "absmax")
    again = quantizer("layer", w, 4, 32, True, "absmax")
    assert asked == ["layer"]
    np.testing.assert_array_equal(again.q, first.q)
    assert again.q.dtype == first.q.dtype and again.scale is first.scale


@pytest.mark.parametrize("symmetric", [True, False])
def test_memoised_codes_are_packed_two_per_byte_and_come_back_equal(symmetric):
    from cptquant.quant.weight_quantizers import _PackedCodes

    x, w = _correlated_layer(k=64, n=16)
    quantized = gptq_quantize(w, _hessian(x), 4, 32, symmetric, "absmax", act_order=True)
    packed = _PackedCodes.pack(quantized)
    assert packed.packed.nbytes * 2 == quantized.q.nbytes
    back = packed.unpack()
    assert back.q.dtype == quantized.q.dtype
    np.testing.assert_array_equal(back.q, quantized.q)
    assert {int(v) for v in np.unique(quantized.q)} <= set(range(-8, 8) if symmetric else range(16))


@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("act_order", [False, True])
def test_gptq_in_its_hessian_s_memory_gives_the_same_codes(symmetric, act_order):
    """overwrite_hessian: the Hessian reordered, factorised and inverted in place (no K x K copies), the same
    codes and scales to the last bit."""
    x, w = _correlated_layer(k=256, n=40)
    x[:, [0, 17, 255]] = 0.0  # dead inputs too
    h = _hessian(x)
    copied = gptq_quantize(w, h, 4, 32, symmetric, act_order=act_order)
    assert np.array_equal(h, _hessian(x))  # left alone without overwrite_hessian
    in_place = gptq_quantize(w, h, 4, 32, symmetric, act_order=act_order, overwrite_hessian=True)
    np.testing.assert_array_equal(in_place.q, copied.q)
    assert in_place.scale.tobytes() == copied.scale.tobytes()
    if not symmetric:
        np.testing.assert_array_equal(in_place.zero_point, copied.zero_point)


def test_a_column_major_weight_gives_the_same_codes():
    """A Gemm's transposed weight (or a tied table read as the head's [K, N]) arrives as a column-major view;
    GPTQ works on a row-major copy of it, with the same codes and scales to the last bit."""
    x, w = _correlated_layer(k=128, n=40)
    h = _hessian(x)
    row_major = gptq_quantize(w, h, 4, 32, False, act_order=True)
    column_major = gptq_quantize(np.asfortranarray(w), h, 4, 32, False, act_order=True)
    np.testing.assert_array_equal(column_major.q, row_major.q)
    assert column_major.scale.tobytes() == row_major.scale.tobytes()
    np.testing.assert_array_equal(column_major.zero_point, row_major.zero_point)


def test_an_indefinite_hessian_is_dampened_more():
    x, _ = _correlated_layer(k=64)
    values, vectors = np.linalg.eigh(_hessian(x))
    values[:2] = -0.02 * values.mean()  # a first dampening of 1 % of the mean diagonal is not enough
    h = (vectors * values) @ vectors.T
    h = (h + h.T) / 2
    upper, _ = inverse_hessian_cholesky(h, damp=0.01)
    dampened = h + 10 * 0.01 * np.mean(np.diag(h)) * np.eye(64)  # the second try
    np.testing.assert_allclose(upper.T @ upper @ dampened, np.eye(64), atol=1e-8)


def test_gptq_takes_each_hessian_out_of_the_mapping():
    """The quantizer pops each Hessian it reads (then factorised in its memory): none is held after its layer;
    the export still reports that calibration text was read."""
    from cptquant.quant.weight_quantizers import Gptq

    x, w = _correlated_layer(k=64, n=16)
    hessians = {"a": _hessian(x), "b": _hessian(x)}
    expected = gptq_quantize(w, _hessian(x), 4, 32, True, act_order=True)
    quantizer = Gptq(lambda names: hessians, ["a", "b"])
    got = quantizer("a", w, 4, 32, True, "absmax")
    np.testing.assert_array_equal(got.q, expected.q)
    assert list(hessians) == ["b"] and quantizer.used_calibration
    quantizer("b", w, 4, 32, True, "absmax")
    assert hessians == {} and quantizer.used_calibration


def test_a_tied_table_is_quantized_with_its_lm_head_s_hessian():
    """A 4-bit table that is also the LM head gets GPTQ codes from the head's input Hessian (its [hidden, rows]
    weight is the head's [K, N]); at 8 bits (hot rows) it stays round-to-nearest."""
    from cptquant.quant.weight_quantizers import Gptq

    x, w = _correlated_layer(k=64, n=16)
    expected = gptq_quantize(w, _hessian(x), 4, 32, False, act_order=True)
    hessians = {"lm_head": _hessian(x)}
    quantizer = Gptq(lambda names: hessians, ["lm_head"], hessian_of={"embed_tokens": "lm_head"})
    assert quantizer.algorithm_for("embed_tokens", 4) == "gptq"
    assert quantizer.algorithm_for("embed_tokens", 8) == "rtn"
    np.testing.assert_array_equal(quantizer("embed_tokens", w, 4, 32, False, "absmax").q, expected.q)
    assert hessians == {}
    np.testing.assert_array_equal(quantizer("embed_tokens", w, 8, 32, True, "absmax").q,
                                  quantize_blocked(w, 8, 32, True).q)


def test_blockwise_hessians_pop_lets_go_of_a_layer_s_hessian():
    from cptquant.model_loading import wrap_model
    from cptquant.testing import tiny_tokenizer
    from cptquant.tiny_families import build

    loaded = wrap_model(build("opt"), None, tiny_tokenizer("opt"))
    graph = build_layer_graph(loaded.model)
    calib = build_calibration(loaded, samples=8, seq_len=32)
    names = graph.names()
    at_once = collect_hessians(loaded, graph, calib, names, progress=False)
    by_block = hessians_by_block(loaded, graph, calib, names, progress=False)
    assert isinstance(by_block, BlockwiseHessians)
    first = next(iter(at_once))
    np.testing.assert_array_equal(by_block.pop(first), at_once[first])
    assert first not in by_block.held and by_block.pop("no such layer") is None
    np.testing.assert_array_equal(by_block[first], at_once[first])  # measured again when asked again


def test_memoised_codes_spilled_to_a_folder_come_back_equal(tmp_path):
    """With a spill folder the quantizer keeps the memo's codes on disk (the export's scratch folder), not in
    memory; the repair's second request reads them back unchanged, no Hessian asked for again."""
    from cptquant.quant.weight_quantizers import Gptq

    x, w = _correlated_layer(k=64, n=16)
    hessians = {"layer": _hessian(x)}
    quantizer = Gptq(lambda names: hessians, ["layer"], spill=tmp_path / "codes")
    first = quantizer("layer", w, 4, 32, False, "absmax")
    quantizer.release_measurements()
    memo = next(iter(quantizer._done.values()))
    assert memo.packed.size == 0 and memo.file is not None and memo.file.exists()
    again = quantizer("layer", w, 4, 32, False, "absmax")
    np.testing.assert_array_equal(again.q, first.q)
    assert again.q.dtype == first.q.dtype
    np.testing.assert_array_equal(again.zero_point, first.zero_point)
