"""The "map layers" stage: the layer graph as the FP32 export realises it, over every ONNX file of the export.

Each file gets its layer map (layer_map.py); layers no file reads are dropped from the graph (named, with why,
in its `unquantizable`), and the graph learns the bytes every plan keeps (graph, biases, norms) so that size
budgets are exact.
"""

from __future__ import annotations

import tempfile
from collections import Counter
from collections.abc import Iterable
from pathlib import Path

import numpy as np
import onnx

from ..layer_graph import LayerGraph, build_layer_graph
from ..model_loading import LoadedModel
from ..onnx_io.onnx_export import MODEL_FILE, export_onnx, load_onnx
from .fp32_files import open_fp32_files
from .layer_map import LayerMap, build_layer_map
from .report import files_size

NOT_IN_ONNX = ("no initializer of the exported graph holds its weight (unused by this task's outputs, or folded "
               "into another constant by the exporter)")
READ_THROUGH = "its weight is tied to {}, which reads it in the ONNX files (quantized as planned there)"


def exported_layer_graph(loaded: LoadedModel, fp32_dir: Path,
                         model_proto: onnx.ModelProto | None = None) -> tuple[LayerGraph, LayerMap]:
    """The layer graph of a single-file export, with its layer map.

    Layers the exported graph never reads (a pooler no output needs) are dropped, and the graph
    learns the bytes every plan keeps (graph, biases, norms) so that size budgets are exact.
    """
    model_proto = model_proto if model_proto is not None else load_onnx(fp32_dir / MODEL_FILE)
    graph, layer_maps, _ = exported_files_layer_graph(loaded, fp32_dir, {MODEL_FILE: model_proto})
    return graph, layer_maps[MODEL_FILE]


def layer_graph_priced_as_exported(loaded: LoadedModel, scratch: Path | None = None) -> LayerGraph:
    """The layer graph as an export prices a size budget: from an FP32 export into a temporary folder (removed
    after), with the bytes every plan keeps and each layer's copies per file (an encoder-decoder stores its
    decoder layers twice). `cptq analyze --max-size-mb` plans on it, so that its plan meets the budget when
    `cptq-export --plan` writes it; priced on torch's modules alone it counted one copy of each layer and
    estimated the graph's bytes (a tiny T5 at 0.62 MB got an all-16-bit plan that exports at ~1.5 MB)."""
    with tempfile.TemporaryDirectory(dir=scratch) as folder:
        export_onnx(loaded, Path(folder))
        fp32 = open_fp32_files(Path(folder), loaded.task, MODEL_FILE)
        graph, _, _ = exported_files_layer_graph(loaded, fp32.folder, fp32.protos, fp32.base_dirs)
    return graph


def exported_files_layer_graph(loaded: LoadedModel, fp32_dir: Path, protos: dict[str, onnx.ModelProto],
                               base_dirs: dict[str, Path | None] | None = None,
                               ) -> tuple[LayerGraph, dict[str, LayerMap], list[str]]:
    """The layer graph over every ONNX file of the export (one, or a seq2seq model's encoder and decoders),
    each file's layer map, and the layers no file reads. One plan covers the graph; each file is lowered
    with the uses its own map found. A layer some file reads is planned; a weight several files store (the
    shared embedding, decoder layers in both decoders) is quantized alike in each, and counted in each.
    `base_dirs`: per file, where its external weights lie when its proto was loaded without them."""
    graph = build_layer_graph(loaded.model)
    base_dirs = base_dirs or {}
    layer_maps = {name: build_layer_map(proto, loaded.model, graph, base_dir=base_dirs.get(name))
                  for name, proto in protos.items()}
    used = {name for layer_map in layer_maps.values() for name in layer_map.mapped}
    # A tie's owner stays planned when its partners alone read the weight (BART's model.shared, read as the
    # encoder's and decoder's token embeddings): the passes give every tied layer its owner's bits.
    used |= {layer.tied_to for layer in graph.layers if layer.tied_to and layer.name in used}
    unused = [layer.name for layer in graph.layers if layer.name not in used]
    through: dict[str, str] = {}  # a tied layer no file reads by its own name -> the partner the first file reads it through
    for layer_map in layer_maps.values():
        for name, partner in layer_map.read_through.items():
            through.setdefault(name, partner)
    absent = [name for name in unused if name not in through]
    graph.layers = [layer for layer in graph.layers if layer.name in used]
    graph.unquantizable.update({name: READ_THROUGH.format(through[name]) if name in through else NOT_IN_ONNX
                                for name in unused})
    graph.fixed_bytes = sum(_fixed_bytes(fp32_dir, name, proto, layer_maps[name]) for name, proto in protos.items())
    graph.heads_reading_table = set().union(*(_heads_reading_table(graph, m) for m in layer_maps.values()))
    graph.stored_copies = stored_copies(graph, layer_maps.values())
    return graph, layer_maps, absent


def stored_copies(graph: LayerGraph, layer_maps: Iterable[LayerMap]) -> dict[str, int]:
    """Layers not stored exactly once -> how many files store their weight, each its own copy, which a size
    budget counts: an encoder-decoder's decoder layers are in both decoders, and a tie's owner that no file
    reads by its own name (BART's model.shared, read as the token embeddings) is stored as those."""
    counts = Counter(name for layer_map in layer_maps for name in layer_map.mapped)
    return {layer.name: counts[layer.name] for layer in graph.layers if counts[layer.name] != 1}


def _heads_reading_table(graph: LayerGraph, layer_map: LayerMap) -> set[str]:
    """Tied heads whose MatMul reads the initializer their embedding's Gather reads (lowering/context.py's
    tied_table_sites shares their codes; a head with its own stored copy is written on its own)."""
    uses = layer_map.uses()
    heads = set()
    for layer in graph.layers:
        if layer.tied_to and layer.name in uses and layer.tied_to in uses:
            tables = {u.initializer for u in uses[layer.tied_to] if u.op_type == "Gather"}
            if any(u.op_type == "MatMul" and u.via_transpose and u.initializer in tables for u in uses[layer.name]):
                heads.add(layer.name)
    return heads


def _fixed_bytes(fp32_dir: Path, file_name: str, model_proto: onnx.ModelProto, layer_map: LayerMap) -> int:
    """Bytes of one FP32 export file that are not quantizable weights: what every plan keeps."""
    sizes = {init.name: int(np.prod(init.dims)) for init in model_proto.graph.initializer}
    weights = {use.initializer for mapping in layer_map.mapped.values() for use in mapping.uses}
    model_bytes = files_size([p for p in fp32_dir.iterdir() if p.name.startswith(file_name)])
    return model_bytes - 4 * sum(sizes[name] for name in weights)
