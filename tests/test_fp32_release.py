"""The FP32 graphs the export reads are let go of once lowered: nothing but the lowering's own call holds one.

Below 2 GB a file's graph carries all its weights; a reference kept past the lowering (main before the
pipeline split held every file's graph in a dict of (graph, folder) pairs to the end of the export) would keep
a whole FP32 copy of the model in memory through the checks, parity, the FP16 reference and verification.
"""

from __future__ import annotations

import gc
import types
from pathlib import Path

import onnx

import cptquant.exporter.file_lowering as file_lowering
from cptquant.exporter.fp32_files import open_fp32_files
from cptquant.exporter.pipeline import export_quantized
from cptquant.model_loading import wrap_model
from cptquant.plan_source import plan_factory
from cptquant.testing import tiny_llama, tiny_tokenizer


def _holders(obj: object) -> list[str]:
    """What refers to `obj` besides running frames (a caller's locals and argument stack)."""
    return [type(r).__name__ for r in gc.get_referrers(obj) if not isinstance(r, types.FrameType)]


def test_the_lowering_gets_the_only_reference_to_each_fp32_graph(tmp_path: Path, monkeypatch) -> None:
    real = file_lowering.lower_model
    holders: list[list[str]] = []

    def watched(model: onnx.ModelProto, *args, **kwargs):
        holders.append(_holders(model))
        return real(model, *args, **kwargs)

    monkeypatch.setattr(file_lowering, "lower_model", watched)
    loaded = wrap_model(tiny_llama(0), None, tiny_tokenizer("llama"))
    make_plan = plan_factory(None, None, 8)
    export_quantized(loaded, make_plan, tmp_path / "out" / "model.onnx", progress=False)
    assert holders == [[]]


def test_taking_a_file_leaves_no_reference_to_it(tmp_path: Path) -> None:
    from cptquant.onnx_io.onnx_export import export_onnx

    loaded = wrap_model(tiny_llama(0), None, tiny_tokenizer("llama"))
    export_onnx(loaded, tmp_path / "fp32")
    fp32 = open_fp32_files(tmp_path / "fp32", loaded.task, "model.onnx")
    assert fp32.names == [("model.onnx", "model.onnx")] and fp32.opset == 21
    graph = fp32.take("model.onnx")
    assert fp32.protos == {} and _holders(graph) == []
