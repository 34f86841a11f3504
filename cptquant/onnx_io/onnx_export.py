"""Export a loaded model to ONNX with optimum-onnx's exporter (opset 21, KV cache for decoders)."""

from __future__ import annotations

import contextlib
import io
import logging
import warnings
from pathlib import Path

import onnx

from ..errors import CptqError
from ..model_loading import LoadedModel

OPSET = 21
TWO_GB = 2**31 - 1  # protobuf's limit for one file; above it weights go to external data
MODEL_FILE = "model.onnx"


@contextlib.contextmanager
def _quiet():
    """The exporter prints tracer warnings by the hundred; they say nothing to our users."""
    loggers = [logging.getLogger(n) for n in ("optimum", "transformers", "torch.onnx")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
            warnings.simplefilter("ignore")
            yield
    finally:
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)


def export_onnx(loaded: LoadedModel, folder: Path) -> Path:
    """Write model.onnx (+ external data when large), config.json, generation config and tokenizer."""
    from optimum.exporters.onnx import onnx_export_from_model

    folder.mkdir(parents=True, exist_ok=True)
    try:
        with _quiet():
            onnx_export_from_model(loaded.model, output=folder, task=loaded.task, opset=OPSET, do_validation=False)
    except Exception as exc:  # the exporter raises many types; the user needs the first line
        raise CptqError(f"ONNX export of {loaded.display_name} failed: {str(exc).strip().splitlines()[0]}") from exc
    if loaded.tokenizer is not None:
        loaded.tokenizer.save_pretrained(folder)
    model_path = folder / MODEL_FILE
    if not model_path.is_file():
        raise CptqError(f"the exporter wrote no {MODEL_FILE} (files: {sorted(p.name for p in folder.iterdir())})")
    return model_path


def load_onnx(path: Path) -> onnx.ModelProto:
    return onnx.load(str(path), load_external_data=True)


def save_onnx(model: onnx.ModelProto, path: Path) -> list[Path]:
    """Save, moving weights to `<name>_data` when the model is over 2 GB. Returns the files written."""
    path.parent.mkdir(parents=True, exist_ok=True)
    large = model.ByteSize() > TWO_GB if _fits_bytesize(model) else True
    if large:
        data_name = path.name + "_data"
        onnx.save_model(model, str(path), save_as_external_data=True, all_tensors_to_one_file=True,
                        location=data_name, size_threshold=1024)
        return [path, path.parent / data_name]
    onnx.save_model(model, str(path))
    return [path]


def _fits_bytesize(model: onnx.ModelProto) -> bool:
    # ByteSize() itself fails on protos over 2 GB in some protobuf builds.
    try:
        model.ByteSize()
        return True
    except Exception:
        return False
