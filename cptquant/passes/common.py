"""What the passes share: allocation units, weight access in the quantizer's layout, exact restore."""

from __future__ import annotations

import contextlib
import inspect
import time
from collections.abc import Iterable, Iterator, Mapping
from typing import TYPE_CHECKING

import numpy as np
import torch

from ..layer_graph import ROLE_CONV1D, ROLE_EMBEDDING, Layer, LayerGraph
from ..options import fitting_block_size
from ..plan import HOT_ROW_BITS
from ..quant.quantize import fake_quantize
from ..quant.storage import WeightShape
from .calibration import CalibrationSet

if TYPE_CHECKING:  # rich is imported when a bar is made: `import cptquant` stays quick
    from rich.progress import Progress


def block_unit(index: int) -> str:
    return f"block.{index}"


def allocation_units(graph: LayerGraph, granularity: str) -> dict[str, list[Layer]]:
    """What gets one score and one bit width: every layer, or every block plus the layers outside blocks.

    A layer tied to another (an LM head sharing the embedding's parameter) is not a unit of its
    own: it follows its owner, since the parameter can only be stored once.
    """
    units: dict[str, list[Layer]] = {}
    for layer in graph.layers:
        if layer.tied_to is not None:
            continue
        if granularity == "block" and layer.block is not None:
            units.setdefault(block_unit(layer.block), []).append(layer)
        else:
            units[layer.name] = [layer]
    return units


def unit_of(graph: LayerGraph, layer: Layer, granularity: str) -> str:
    owner = graph[layer.tied_to] if layer.tied_to else layer
    if granularity == "block" and owner.block is not None:
        return block_unit(owner.block)
    return owner.name


def stored_weight_shape(graph: LayerGraph, layer: Layer, hot_rows: dict[str, list[int]]) -> WeightShape:
    """`layer`'s weight as the file will store it, for pricing: a table with its hot rows; a tied head that
    reads its embedding's initializer in the export (graph.heads_reading_table; assumed when not known)
    as what reading the table adds, with the table's hot rows; any other tied head as a copy of its own."""
    table = layer.role == ROLE_EMBEDDING
    reads_table = bool(layer.tied_to) and (graph.heads_reading_table is None
                                           or layer.name in graph.heads_reading_table)
    rows = list(hot_rows.get(layer.tied_to or layer.name, ())) if table or reads_table else []
    return WeightShape(layer.in_features, layer.out_features, table, len(rows), tied_head=reads_table,
                       copies=graph.stored_copies.get(layer.name, 1), hot_prefix=rows == list(range(len(rows))))


def weight_param(model: torch.nn.Module, layer: Layer) -> torch.nn.Parameter:
    weight = model.get_submodule(layer.name).weight
    if not isinstance(weight, torch.nn.Parameter):  # the layer graph holds Linear, Conv1D and Embedding only
        raise TypeError(f"{layer.name}.weight is a {type(weight).__name__}, not a parameter")
    return weight


def transformer_blocks(model: torch.nn.Module, container: str | None) -> list[torch.nn.Module]:
    """The blocks of the ModuleList named `container` (layer_graph.block_container), in order; none for None."""
    if container is None:
        return []
    blocks = model.get_submodule(container)
    if not isinstance(blocks, torch.nn.ModuleList):  # block_container() names only a ModuleList
        raise TypeError(f"{container} is a {type(blocks).__name__}, not a list of blocks")
    return list(blocks)


def fake_quantize_symmetric_torch(weight_kn: torch.Tensor, bits: int, block_size: int) -> torch.Tensor:
    """quant.quantize.fake_quantize(symmetric, absmax) in torch, value for value (the same float32
    operations, round half to even), without numpy's temporaries: 4x faster on OPT's embedding table."""
    k, n = weight_kn.shape
    blocks = weight_kn.reshape(k // block_size, block_size, n)
    qmax = 2 ** (bits - 1) - 1
    scale = blocks.abs().amax(1) / qmax
    scale = torch.where(scale > torch.finfo(torch.float32).tiny, scale, torch.ones_like(scale))
    codes = torch.clamp(torch.round(blocks / scale[:, None, :]), -qmax - 1, qmax)
    return (codes * scale[:, None, :]).reshape(k, n)


def quantized_weight(model: torch.nn.Module, layer: Layer, bits: int, block_size: int, clip: str,
                     hot_rows: list[int] | None = None) -> torch.Tensor:
    """The layer's weight after the exporter's own quantizer, in the parameter's torch layout.

    `hot_rows` of a 4-bit embedding table are quantized at 8 bits, as the exporter stores them.
    """
    param = weight_param(model, layer)
    as_kn = param.detach() if layer.role == ROLE_CONV1D else param.detach().t()
    size = fitting_block_size(as_kn.shape[0], block_size)
    if clip != "mse":  # absmax, or auto (round-to-nearest takes absmax)
        quantized = fake_quantize_symmetric_torch(as_kn.float(), bits, size)
    else:
        quantized = torch.from_numpy(fake_quantize(as_kn.float().cpu().numpy(), bits, size, True, clip))
    quantized = (quantized if layer.role == ROLE_CONV1D else quantized.t()).to(param.dtype).contiguous()
    if hot_rows and bits == 4 and layer.role == ROLE_EMBEDDING:
        rows = torch.as_tensor(hot_rows, dtype=torch.long)
        hot = fake_quantize_symmetric_torch(param.detach()[rows].float().t(), HOT_ROW_BITS, size)
        quantized[rows] = hot.t().to(param.dtype)
    return quantized


@contextlib.contextmanager
def restored_afterwards(params: Iterable[torch.nn.Parameter]) -> Iterator[None]:
    """Whatever happens to `params` inside happens to copies: afterwards the originals are back, untouched.

    Each parameter's data is swapped, never written: a weight memory-mapped from its safetensors file stays a
    clean page of that file (written in place, every page touched became a private anonymous copy: after GPTQ's
    sequential Hessians, most of the model)."""
    originals = {param: param.data for param in params}
    try:
        for param, original in originals.items():
            param.data = original.clone()
        yield
    finally:
        for param, original in originals.items():
            param.data = original


@contextlib.contextmanager
def replaced_weights(model: torch.nn.Module,
                     new_values: Mapping[torch.nn.Parameter, torch.Tensor]) -> Iterator[None]:
    """Temporarily give parameters other values (as restored_afterwards: swapped in, the originals untouched)."""
    originals = {param: param.data for param in new_values}
    try:
        for param, value in new_values.items():
            # laid out as the parameter: the same kernels, to the last bit, as when values were copied into it
            param.data = value.to(param.dtype).contiguous()
        yield
    finally:
        for param, original in originals.items():
            param.data = original


def forward_options(model: torch.nn.Module) -> dict[str, bool]:
    """Keyword arguments for a plain scoring forward pass: no KV cache where the model would build one."""
    return {"use_cache": False} if "use_cache" in inspect.signature(model.forward).parameters else {}


@torch.no_grad()
def time_forward(model: torch.nn.Module, calib: CalibrationSet, repeats: int = 3) -> float:
    """Seconds for one plain forward pass over the calibration set: the unit of cost (1 FPE).

    The median of `repeats` passes: one pass slowed by another process would make every cost look small.
    """
    # Without a KV cache, as the task loss runs it: building one would make the unit slower than it is.
    extra = forward_options(model)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        for batch in calib.batches:
            model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], **extra)
        times.append(time.perf_counter() - start)
    return sorted(times)[len(times) // 2]


def progress_bar(enabled: bool) -> Progress:
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    return Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                    disable=not enabled, transient=True)


def finite(values: dict[str, float]) -> dict[str, float]:
    return {k: float(v) if np.isfinite(v) else 0.0 for k, v in values.items()}
