"""The "export FP32" stage's artifact: the ONNX files optimum wrote, as the later stages read them.

One file (model.onnx, written out under the output's own name), or an encoder-decoder model's three
(onnx_export.SEQ2SEQ_FILES, written under optimum's names). A model over 2 GB is opened lazily: its graph
alone, its weights memory-mapped one at a time where they are read (`base_dirs`), so that the FP32 export
is never held in memory whole.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import onnx

from ..onnx_io.onnx_export import MODEL_FILE, load_onnx_lazily, onnx_files


@dataclass
class Fp32Files:
    folder: Path
    names: list[tuple[str, str]]  # (name in `folder`, name written in the output), the first one first
    # each file's graph, until the lowering takes it (take): nothing else here holds a reference to it
    protos: dict[str, onnx.ModelProto]
    base_dirs: dict[str, Path | None]  # where a file's external weights lie (None: loaded with its graph)
    opset: int  # the ai.onnx opset of the first file

    @property
    def first(self) -> str:
        return self.names[0][0]

    @property
    def written(self) -> list[str]:
        return [written for _, written in self.names]

    def take(self, name: str) -> onnx.ModelProto:
        """A file's graph, let go of here: once the caller drops it, its memory is free."""
        return self.protos.pop(name)


def open_fp32_files(folder: Path, task: str, model_name: str) -> Fp32Files:
    """The files `task`'s FP32 export wrote into `folder`; `model_name` is what the single file is written as."""
    names = ([(MODEL_FILE, model_name)] if onnx_files(task) == (MODEL_FILE,)
             else [(name, name) for name in onnx_files(task)])
    protos: dict[str, onnx.ModelProto] = {}
    base_dirs: dict[str, Path | None] = {}
    for name, _ in names:
        protos[name], base_dirs[name] = load_onnx_lazily(folder / name)
    opset = next(o.version for o in protos[names[0][0]].opset_import if o.domain in ("", "ai.onnx"))
    return Fp32Files(folder, names, protos, base_dirs, opset)
