"""External data of ONNX files over 2 GB: where a tensor's bytes lie, and one writer that appends tensors to a
data file, so the paths that hold one weight at a time (onnx_export's gathering, float16's streamed baseline,
the layer map's memory maps) read and write it the same way."""

from __future__ import annotations

from pathlib import Path
from typing import BinaryIO

import onnx
from onnx.external_data_helper import uses_external_data

PAGE = 4096  # tensors start on a page, as onnx writes them, so ONNX Runtime can map each one


def external_location(tensor: onnx.TensorProto) -> tuple[str, int, int | None]:
    """(file name, byte offset, length or None: to the end) of a tensor stored as external data."""
    where = {entry.key: entry.value for entry in tensor.external_data}
    length = where.get("length")
    return where["location"], int(where.get("offset", 0)), int(length) if length is not None else None


def read_external(tensor: onnx.TensorProto, base: Path) -> bytes:
    location, offset, length = external_location(tensor)
    with open(base / location, "rb") as data:
        data.seek(offset)
        return data.read(length) if length is not None else data.read()


def has_external_data(path: Path) -> bool:
    """Whether any weight of the ONNX file at `path` is stored outside it (the graph alone is read)."""
    model = onnx.load(str(path), load_external_data=False)
    return any(uses_external_data(tensor) for tensor in model.graph.initializer)


class ExternalDataWriter:
    """Appends tensors' bytes to one data file, page-aligned, and points each tensor at its bytes there."""

    def __init__(self, folder: Path, location: str):
        self.location = location
        self._file: BinaryIO = open(folder / location, "wb")  # noqa: SIM115 - closed by close()/__exit__
        self._offset = 0

    def __enter__(self) -> ExternalDataWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        self._file.close()

    def append(self, tensor: onnx.TensorProto, payload: bytes | memoryview) -> None:
        """`payload`: the tensor's bytes (a memoryview of an array's bytes: written without a copy)."""
        tensor.ClearField("raw_data")
        del tensor.external_data[:]
        tensor.data_location = onnx.TensorProto.EXTERNAL
        for key, value in (("location", self.location), ("offset", str(self._offset)), ("length", str(len(payload)))):
            entry = tensor.external_data.add()
            entry.key, entry.value = key, value
        self._file.write(payload)
        pad = -(self._offset + len(payload)) % PAGE
        self._file.write(b"\0" * pad)
        self._offset += len(payload) + pad
