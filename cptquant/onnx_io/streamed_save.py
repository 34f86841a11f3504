"""Write an onnx-ir model as `save_onnx` writes its ModelProto, byte for byte, one initializer at a time.

`ir.serde.serialize_model` then `onnx.save_model` hold the model three times at the end (the onnx-ir model with
its tensors, the ModelProto with a copy of every tensor, the serialized bytes): ~0.4 GB each for the 640 M OPT's
4-bit export. Here the ModelProto is serialized without its initializers (a skeleton of a few MB), and the file
is that skeleton with each initializer spliced in where protobuf puts it: a message is its fields in field
number order, so GraphProto's `initializer` (field 5) goes between its `name` (2) and its `doc_string` (10),
and the graph (ModelProto field 7) between the model's `doc_string` (6) and its `opset_import` (8). Each tensor
is serialized on its own, written, and let go of from the onnx-ir model, which holds nothing big afterwards.

A model over 2 GB (its weights go to external data) is written by `save_onnx` from the whole ModelProto, as before.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import onnx
import onnx_ir as ir
from google.protobuf.message import Message

from .onnx_export import TWO_GB, save_onnx

_GRAPH_INITIALIZER = 5  # GraphProto.initializer
_MODEL_GRAPH = 7  # ModelProto.graph
_LENGTH_DELIMITED = 2  # protobuf wire type of a message field


def save_ir_model(model: ir.Model, path: Path, finish: Callable[[onnx.ModelProto], None]) -> list[Path]:
    """Write `model` to `path` as `save_onnx(proto, path)` would, where `proto` is `serialize_model(model)` after
    `finish(proto)` (which may change anything but the initializers). Empties the model's initializers (their
    values keep no tensor): the model is not usable afterwards. Returns the files written."""
    graph = model.graph
    values = list(graph.initializers.values())
    if any(value.meta.get("quant_parameter_tensor_names") for value in values) or model.functions:
        return _save_whole(model, path, finish)  # written beside the initializers: not split here
    sizes = []
    for value in values:
        sizes.append(_tensor_proto(value).ByteSize())
    body = sum(_field_bytes(_GRAPH_INITIALIZER, size) for size in sizes)
    graph.initializers.clear()
    skeleton = ir.serde.serialize_model(model)
    finish(skeleton)
    if len(skeleton.graph.initializer) or len(skeleton.graph.sparse_initializer):
        raise ValueError("the model's initializers were cleared, yet its ModelProto has some")
    graph_head, graph_tail = _split(skeleton.graph, _GRAPH_INITIALIZER)
    graph_size = len(graph_head) + body + len(graph_tail)
    model_head, model_tail = _split(skeleton, _MODEL_GRAPH)
    del skeleton
    if len(model_head) + _field_bytes(_MODEL_GRAPH, graph_size) + len(model_tail) > TWO_GB:
        for value in values:
            graph.initializers.add(value)  # in their order: the external data as save_onnx writes it
        return _save_whole(model, path, finish)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as out:
        out.write(model_head)
        out.write(_key(_MODEL_GRAPH) + _varint(graph_size))
        out.write(graph_head)
        for value, size in zip(values, sizes, strict=True):
            data = _tensor_proto(value).SerializeToString()
            if len(data) != size:
                raise ValueError(f"initializer {value.name} serialized to {len(data)} bytes, sized {size}")
            out.write(_key(_GRAPH_INITIALIZER) + _varint(size))
            out.write(data)
            del data
            value.const_value = None  # the model's copy: written, let go of
        out.write(graph_tail)
        out.write(model_tail)
    return [path]


def _save_whole(model: ir.Model, path: Path, finish: Callable[[onnx.ModelProto], None]) -> list[Path]:
    proto = ir.serde.serialize_model(model)
    finish(proto)
    return save_onnx(proto, path)


def _tensor_proto(value: ir.Value) -> onnx.TensorProto:
    tensor = value.const_value
    if tensor is None:
        raise ValueError(f"initializer {value.name} has no value")
    tensor.name = value.name  # as serialize_graph_into names it
    proto = onnx.TensorProto()
    ir.serde.serialize_tensor_into(proto, tensor)
    return proto


def _split(message: Message, number: int) -> tuple[bytes, bytes]:
    """`message`'s serialized fields numbered below `number`, and those above it (field `number` in neither)."""
    head, tail = type(message)(), type(message)()
    head.CopyFrom(message)
    tail.CopyFrom(message)
    for field, _ in message.ListFields():
        if field.number <= number:
            tail.ClearField(field.name)
        if field.number >= number:
            head.ClearField(field.name)
    return head.SerializeToString(), tail.SerializeToString()


def _key(number: int) -> bytes:
    return _varint(number << 3 | _LENGTH_DELIMITED)


def _field_bytes(number: int, size: int) -> int:
    return len(_key(number)) + len(_varint(size)) + size


def _varint(value: int) -> bytes:
    out = bytearray()
    while True:
        byte = value & 0x7F
        value >>= 7
        if value:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)
