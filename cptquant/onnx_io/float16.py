"""The FP16 baseline of an FP32 export, with ONNX Runtime's float16 converter, one weight at a time.

The converter works on a whole in-memory model: for a model stored with external data (over 2 GB) that is
the FP32 weights, their FP16 copies and a serialized proto at once. Here the converter sees the graph
with every external FP32 weight replaced by a one-element stand-in (it only decides, per initializer,
whether FP16 nodes read it, and retypes the graph); then each weight is read from the FP32 data file
through a memory map, converted with the converter's own rounding (`convert_np_to_float16`) when the
converter chose FP16 for it, and appended to the FP16 data file. Peak memory: the graph plus one weight.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto
from onnx.external_data_helper import uses_external_data

from .external_data import ExternalDataWriter, external_location

# convert_float_to_float16's defaults, which write_fp16's in-memory path uses too
MIN_POSITIVE = 5.96e-08
MAX_FINITE = 65504.0
SLICE_ELEMENTS = 1 << 22  # weights converted at once (16 MB of float32)


def convert_streamed(source: Path, target: Path) -> None:
    """Write `target` (+ `target`_data), the FP16 twin of `source`, whose weights are external data."""
    from onnxruntime.transformers.float16 import convert_float_to_float16, convert_np_to_float16

    model = onnx.load(str(source), load_external_data=False)
    stand_ins: dict[str, tuple[list[int], tuple[str, int, int | None]]] = {}
    for tensor in model.graph.initializer:
        if tensor.data_type == TensorProto.FLOAT and uses_external_data(tensor):
            stand_ins[tensor.name] = (list(tensor.dims), external_location(tensor))
            del tensor.external_data[:]
            tensor.data_location = TensorProto.DEFAULT
            del tensor.dims[:]
            tensor.dims.append(1)
            tensor.raw_data = np.zeros(1, np.float32).tobytes()
    model = convert_float_to_float16(model, keep_io_types=True, disable_shape_infer=True)
    target.parent.mkdir(parents=True, exist_ok=True)
    with ExternalDataWriter(target.parent, target.name + "_data") as data:
        for tensor in model.graph.initializer:
            if tensor.name not in stand_ins:
                continue
            dims, (location, offset, _) = stand_ins[tensor.name]
            stored = np.memmap(source.parent / location, dtype=np.float32, mode="r", offset=offset,
                               shape=(int(np.prod(dims)),))
            if tensor.data_type == TensorProto.FLOAT16:
                array = np.empty(stored.shape, np.float16)
                # elementwise, so a slice at a time: the converter's masks and index arrays are several
                # copies of what it is given (1.5 GB for a 400 MB embedding table whole)
                for start in range(0, stored.size, SLICE_ELEMENTS):
                    part = slice(start, start + SLICE_ELEMENTS)
                    array[part] = convert_np_to_float16(np.asarray(stored[part]), MIN_POSITIVE, MAX_FINITE)
            else:
                array = stored
            del tensor.dims[:]
            tensor.dims.extend(dims)
            data.append(tensor, memoryview(array.data).cast("B"))  # written from the array: no bytes copy
            del stored, array
    for info in model.graph.value_info:  # the converter typed the stand-ins' value infos with their one element
        if info.name in stand_ins:
            shape = info.type.tensor_type.shape
            del shape.dim[:]
            for size in stand_ins[info.name][0]:
                shape.dim.add().dim_value = size
    onnx.save_model(model, str(target))
