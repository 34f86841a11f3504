"""Export a loaded model to ONNX with optimum-onnx's exporter (opset 21, KV cache for decoders)."""

from __future__ import annotations

import contextlib
import io
import logging
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import onnx
from onnx.external_data_helper import uses_external_data

from ..errors import CptqError, first_line
from ..model_loading import TASK_SEQ2SEQ, LoadedModel
from .external_data import ExternalDataWriter, read_external

if TYPE_CHECKING:  # torch loads with the exporter, not on import
    from torch import nn

OPSET = 21
TWO_GB = 2**31 - 1  # protobuf's limit for one file; above it weights go to external data
MODEL_FILE = "model.onnx"
# An encoder-decoder model's files, under the names optimum's ORTModelForSeq2SeqLM loads. The merged decoder
# (both decoders in one file behind an If) is not written: the layer map and the lowering read the top-level
# graph of a file, so the decoder and its with-past twin are rewritten as two files, each with its own weights.
SEQ2SEQ_FILES = ("encoder_model.onnx", "decoder_model.onnx", "decoder_with_past_model.onnx")


def onnx_files(task: str) -> tuple[str, ...]:
    """The ONNX files optimum writes for `task`: model.onnx, or the encoder and decoders of a seq2seq model."""
    return SEQ2SEQ_FILES if task == TASK_SEQ2SEQ else (MODEL_FILE,)


def is_onnx_file(name: str) -> bool:
    """Whether a file of an export folder is (part of) one of its ONNX models: the file or its external data."""
    return any(name.startswith(stem) for stem in (MODEL_FILE, *SEQ2SEQ_FILES))


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
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


@contextlib.contextmanager
def _use_cache_restored(model: nn.Module) -> Iterator[None]:
    """optimum's seq2seq export turns `use_cache` on in the encoder's own config and leaves it so, after which
    T5's encoder refuses every forward call ("use_cache can only be set to True if T5Stack is used as a
    decoder"): every submodule config's flag goes back as it was."""
    configs = {id(c): c for _, m in model.named_modules() if (c := getattr(m, "config", None)) is not None}
    saved = {key: getattr(config, "use_cache", None) for key, config in configs.items()}
    try:
        yield
    finally:
        for key, config in configs.items():
            if saved[key] is not None:
                config.use_cache = saved[key]


def _post_process_fits(model: nn.Module) -> bool:
    """Whether the model takes the in-memory export path. optimum's post-processing de-duplicates tied weights
    by serializing the whole model in memory, which protobuf refuses above 2 GB (optimum then fails the
    export): above that it is skipped, and the tied head keeps its own copy, which the layer map prices and
    the lowering writes as its own weight. The same models are exported without constant folding and with
    their external data gathered a weight at a time (_StreamingOnnx)."""
    every_use = sum(p.numel() * p.element_size() for _, p in model.named_parameters(remove_duplicate=False))
    return every_use < TWO_GB


class _StreamingOnnx:
    """Stands in for the `onnx` module inside optimum's exporter while a model over 2 GB is exported.

    torch writes such a model's weights one file per tensor; optimum then gathers them into one
    `model.onnx_data` by loading every weight into memory and saving again ("probably too memory heavy
    for large models", its comment says): a whole copy of the model beside the torch weights. Here `load`
    reads the graph alone and `save` appends each weight's bytes to the one data file in turn, so the
    gathering holds one weight at a time. Everything else is the real module."""

    def __getattr__(self, name: str) -> Any:
        return getattr(onnx, name)

    @staticmethod
    def load(path: str, load_external_data: bool = True, **kwargs: Any) -> onnx.ModelProto:
        return onnx.load(path, load_external_data=False, **kwargs)

    @staticmethod
    def save(model: onnx.ModelProto, path: str, save_as_external_data: bool = False, all_tensors_to_one_file: bool = True,
             location: str | None = None, size_threshold: int = 1024, **_: Any) -> None:
        target = Path(path)
        if not save_as_external_data or not all_tensors_to_one_file or location is None:
            raise CptqError("cptquant's streamed external data only gathers into one file (optimum changed?)")
        gather_external_data(model, target.parent, location, size_threshold)
        onnx.save_model(model, str(target))


def gather_external_data(model: onnx.ModelProto, base: Path, location: str, size_threshold: int) -> None:
    """Every initializer of `model` (its data in files under `base`, or inline) at least `size_threshold`
    bytes into `base / location`, one at a time; tensors of node attributes (Constant values) inline, since
    the per-tensor files are deleted afterwards."""
    with ExternalDataWriter(base, location) as gathered:
        for tensor in model.graph.initializer:
            external = uses_external_data(tensor)
            payload = read_external(tensor, base) if external else tensor.raw_data
            if external or len(payload) >= size_threshold:
                gathered.append(tensor, payload)
    for node in model.graph.node:
        for attribute in node.attribute:
            if attribute.type == onnx.AttributeProto.TENSOR and uses_external_data(attribute.t):
                attribute.t.raw_data = read_external(attribute.t, base)
                del attribute.t.external_data[:]
                attribute.t.data_location = onnx.TensorProto.DEFAULT


@contextlib.contextmanager
def _streamed_external_data(enabled: bool) -> Iterator[None]:
    if not enabled:
        yield
        return
    import optimum.exporters.onnx.convert as convert

    real = convert.onnx
    convert.onnx = _StreamingOnnx()
    try:
        yield
    finally:
        convert.onnx = real


def export_onnx(loaded: LoadedModel, folder: Path) -> Path:
    """Write model.onnx (+ external data when large), config.json, generation config and tokenizer; for a
    seq2seq model its SEQ2SEQ_FILES instead of model.onnx. Returns the first ONNX file."""
    from optimum.exporters.onnx import onnx_export_from_model

    folder.mkdir(parents=True, exist_ok=True)
    files = onnx_files(loaded.task)
    restored = _use_cache_restored(loaded.model) if files != (MODEL_FILE,) else contextlib.nullcontext()
    large = not _post_process_fits(loaded.model)
    try:
        with _quiet(), restored, _streamed_external_data(large):
            onnx_export_from_model(loaded.model, output=folder, task=loaded.task, opset=OPSET, do_validation=False,
                                   # seq2seq: no merged decoder
                                   no_post_process=files != (MODEL_FILE,) or large,
                                   # folding writes a transposed copy of every Linear weight while the torch
                                   # weights are held: above 2 GB the Transposes stay (the layer map follows
                                   # them, ORT folds them at session start)
                                   do_constant_folding=not large)
    except Exception as exc:  # the exporter raises many types; the user needs the first line
        raise CptqError(f"ONNX export of {loaded.display_name} failed: {first_line(exc, type(exc).__name__)}") from exc
    if loaded.tokenizer is not None:
        loaded.tokenizer.save_pretrained(folder)
    for name in files:
        if not (folder / name).is_file():
            raise CptqError(f"the exporter wrote no {name} (files: {sorted(p.name for p in folder.iterdir())})")
    return folder / files[0]


def load_onnx(path: Path) -> onnx.ModelProto:
    return onnx.load(str(path), load_external_data=True)


def load_onnx_lazily(path: Path) -> tuple[onnx.ModelProto, Path | None]:
    """The file's graph, and where its external weights lie (None: it holds them all, and they are loaded).

    A model over 2 GB keeps its weights in external data: those are not loaded here, but read one at a
    time through a memory map by the layer map and the lowering (`base_dir`), so that the FP32 export is
    never held in memory whole."""
    proto = onnx.load(str(path), load_external_data=False)
    if any(uses_external_data(tensor) for tensor in proto.graph.initializer):
        return proto, path.parent
    return proto, None  # it had no external data: complete as it is


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
