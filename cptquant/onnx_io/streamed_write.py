"""Write an onnx-ir model one initializer at a time: the bytes `onnx.save_model` would write, without the
model ever held twice.

Serialized the usual way, the lowered model was held three times at the end of an export: the onnx-ir model
with its codes, its ModelProto (protobuf copies every tensor in) and the serialized bytes. Here the model is
serialized without its initializers' tensors (a small shell), and each initializer is serialized, written and
let go of in turn: the peak is the onnx-ir model plus one tensor. Protobuf writes a message's fields in field
number order, so the file is the shell's fields up to `graph` (7), then the graph's fields before
`initializer` (5), each initializer as a length-delimited field 5, the graph's later fields and the model's;
the graph's length comes first, so each initializer is serialized once to count its bytes and once to write
them. tests/test_lowering.py checks the bytes against `SerializeToString`. A model over 2 GB keeps its
weights in `<name>_data` beside it, page-aligned, as the exporter's other large files.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from pathlib import Path

import onnx
import onnx_ir as ir

from .external_data import ExternalDataWriter
from .onnx_export import TWO_GB

GRAPH_FIELD = 7  # ModelProto.graph
INITIALIZER_FIELD = 5  # GraphProto.initializer
LENGTH_DELIMITED = 2  # the wire type of strings, bytes and messages
EXTERNAL_THRESHOLD = 1024  # bytes: smaller tensors stay in the file (onnx.save_model's size_threshold)


def write_consuming(model: ir.Model, path: Path, finish: Callable[[onnx.ModelProto], None] | None = None) -> list[Path]:
    """Write `model` to `path`; returns the files written. Each initializer's tensor is dropped from `model` once
    written (the model is spent). `finish` edits the ModelProto of everything but the initializers first."""
    initializers = [value for value in model.graph.initializers.values() if value.const_value is not None]
    shell = _shell(model, initializers, finish)
    sizes = [_tensor(value).ByteSize() for value in initializers]  # counted one at a time: nothing is kept
    path.parent.mkdir(parents=True, exist_ok=True)
    if shell.ByteSize() + sum(sizes) + 16 * len(sizes) <= TWO_GB:
        _write_one_file(shell, initializers, sizes, path)
        return [path]
    data_name = path.name + "_data"
    with ExternalDataWriter(path.parent, data_name) as data:
        for value in initializers:
            tensor = _tensor(value)
            if len(tensor.raw_data) >= EXTERNAL_THRESHOLD:
                data.append(tensor, tensor.raw_data)  # the proto keeps where they lie, not the bytes
            shell.graph.initializer.append(tensor)
            value.const_value = None
    onnx.save_model(shell, str(path))
    return [path, path.parent / data_name]


def _shell(model: ir.Model, initializers: list[ir.Value], finish: Callable[[onnx.ModelProto], None] | None) -> onnx.ModelProto:
    """The model serialized without its initializers (their value infos and annotations stay)."""
    tensors = {value.name: value.const_value for value in initializers}
    for value in initializers:
        value.const_value = None
    serde_log = logging.getLogger(ir.serde.__name__)
    level = serde_log.level
    serde_log.setLevel(logging.ERROR)  # onnx-ir warns of each initializer it finds without a tensor
    try:
        shell = ir.serde.serialize_model(model)
    finally:
        serde_log.setLevel(level)
        for value in initializers:
            value.const_value = tensors[value.name]
    if finish is not None:
        finish(shell)
    return shell


def _tensor(value: ir.Value) -> onnx.TensorProto:
    """The initializer as onnx-ir's model serializer writes it: named as its value."""
    tensor = value.const_value
    assert tensor is not None
    tensor.name = value.name
    proto = onnx.TensorProto()
    ir.serde.serialize_tensor_into(proto, from_=tensor)
    return proto


def _write_one_file(shell: onnx.ModelProto, initializers: list[ir.Value], sizes: list[int], path: Path) -> None:
    model_bytes = shell.SerializeToString()
    graph_at, graph_end = _field_span(model_bytes, GRAPH_FIELD)
    graph_bytes = model_bytes[graph_at:graph_end]
    split = _first_field_after(graph_bytes, INITIALIZER_FIELD)
    entries = sum(len(_key(INITIALIZER_FIELD)) + len(_varint(size)) + size for size in sizes)
    with open(path, "wb") as out:
        out.write(model_bytes[:_key_start(model_bytes, graph_at)])
        out.write(_key(GRAPH_FIELD) + _varint(len(graph_bytes) + entries))
        out.write(graph_bytes[:split])
        for value, size in zip(initializers, sizes):
            payload = _tensor(value).SerializeToString()
            if len(payload) != size:
                raise RuntimeError(f"initializer {value.name}: {len(payload)} bytes written, {size} counted")
            out.write(_key(INITIALIZER_FIELD) + _varint(size))
            out.write(payload)
            value.const_value = None
            del payload
        out.write(graph_bytes[split:])
        out.write(model_bytes[graph_end:])


def _varint(number: int) -> bytes:
    out = bytearray()
    while True:
        low, number = number & 0x7F, number >> 7
        out.append(low | (0x80 if number else 0))
        if not number:
            return bytes(out)


def _key(field: int) -> bytes:
    return _varint(field << 3 | LENGTH_DELIMITED)


def _read_varint(data: bytes, at: int) -> tuple[int, int]:
    number = shift = 0
    while True:
        byte = data[at]
        number |= (byte & 0x7F) << shift
        at, shift = at + 1, shift + 7
        if byte < 0x80:
            return number, at


def _fields(data: bytes) -> Iterator[tuple[int, int, int, int]]:
    """(field number, where its key starts, where its value starts, where it ends) of each top-level field."""
    at = 0
    while at < len(data):
        start = at
        key, at = _read_varint(data, at)
        field, wire = key >> 3, key & 7
        if wire == 0:
            _, end = _read_varint(data, at)
        elif wire == 1:
            end = at + 8
        elif wire == 5:
            end = at + 4
        elif wire == LENGTH_DELIMITED:
            length, at = _read_varint(data, at)
            end = at + length
        else:
            raise ValueError(f"unexpected protobuf wire type {wire}")
        yield field, start, at, end
        at = end


def _field_span(data: bytes, field: int) -> tuple[int, int]:
    """Where the (one) value of `field` lies in `data`."""
    for number, _, value_at, end in _fields(data):
        if number == field:
            return value_at, end
    raise ValueError(f"field {field} not found")


def _key_start(data: bytes, value_at: int) -> int:
    return next(start for _, start, at, _ in _fields(data) if at == value_at)


def _first_field_after(data: bytes, field: int) -> int:
    """Where the first field numbered above `field` starts (fields are written in number order)."""
    return next((start for number, start, _, _ in _fields(data) if number > field), len(data))
