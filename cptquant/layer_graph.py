"""The layer graph: every quantizable layer of a torch transformer, with its role and block.

This is what the sensitivity passes annotate and what a plan names. Layer names are the
qualified torch module names (``encoder.layer.0.attention.self.query``), so a plan can be read
next to ``model.named_modules()``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

import torch
from torch import nn

ROLE_LINEAR = "linear"  # nn.Linear: weight [out, in]
ROLE_CONV1D = "conv1d"  # GPT-2's transformers Conv1D: weight [in, out]
ROLE_EMBEDDING = "embedding"  # nn.Embedding: table [rows, hidden], quantized along hidden
ROLE_LM_HEAD = "lm_head"  # output projection; often tied to the input embedding

_BLOCK_INDEX = re.compile(r"\.(\d+)(\.|$)")
# The smallest quantization block (options.check_block_size): a layer whose input size it does not divide
# cannot be blocked at any size, e.g. MPNet's and T5's relative-position bias tables (buckets x heads).
MIN_BLOCK_SIZE = 16


@dataclass(frozen=True)
class Layer:
    name: str
    role: str
    block: int | None  # index of the transformer block, None for embeddings and the head
    in_features: int  # the dimension quantization blocks run along (hidden size for embeddings)
    out_features: int  # output size (number of rows for embeddings)
    tied_to: str | None = None  # name of the layer whose parameter this one shares

    @property
    def num_params(self) -> int:
        return self.in_features * self.out_features


@dataclass
class LayerGraph:
    model_type: str
    num_blocks: int
    layers: list[Layer] = field(default_factory=list)
    # Bytes of the exported file that no plan changes (graph, biases, norms); set by the exporter
    # from the FP32 export so that size budgets count them exactly. None until then.
    fixed_bytes: int | None = None
    # Layers of the model that no plan can quantize, with the reason; they stay FP32 and the report says so.
    unquantizable: dict[str, str] = field(default_factory=dict)
    # Tied LM heads whose export reads the embedding's own initializer (through a Transpose), so the
    # lowering can let them read the table's codes; set by the exporter. None until then: every tied
    # head is assumed to (optimum's export with accelerate installed; without it the export may hold a
    # second, transposed copy, which is then priced and written as a weight of its own).
    heads_reading_table: set[str] | None = None
    # Layers whose weight several ONNX files of the export store (an encoder-decoder's decoder layers in both
    # decoder files, its shared table in all three) -> how many; set by the exporter. A size budget counts
    # every copy, since each is bytes in the output folder. Layers not named here are stored once.
    stored_copies: dict[str, int] = field(default_factory=dict)

    def names(self) -> list[str]:
        return [layer.name for layer in self.layers]

    def __getitem__(self, name: str) -> Layer:
        for layer in self.layers:
            if layer.name == name:
                return layer
        raise KeyError(name)

    def __contains__(self, name: str) -> bool:
        return any(layer.name == name for layer in self.layers)

    def blocks(self) -> dict[int, list[Layer]]:
        out: dict[int, list[Layer]] = {}
        for layer in self.layers:
            if layer.block is not None:
                out.setdefault(layer.block, []).append(layer)
        return out


def _is_conv1d(module: nn.Module) -> bool:
    # transformers.pytorch_utils.Conv1D, matched by name to avoid importing private paths.
    return type(module).__name__ == "Conv1D" and hasattr(module, "nf")


def block_container(model: nn.Module) -> str | None:
    """The qualified name of the ModuleList that holds the transformer blocks (the longest one).

    In an encoder-decoder model, the encoder's: it runs first, so the passes may replay its blocks' outputs
    (block_replay.py), and a list inside a block (T5's decoder block has 3 sub-layers) is not taken for one."""
    encoder = _encoder_prefix(model)
    best, best_len = None, 0
    for name, module in model.named_modules():
        if encoder is not None and not name.startswith(encoder + "."):
            continue
        if isinstance(module, nn.ModuleList) and len(module) > best_len:
            best, best_len = name, len(module)
    return best


def _encoder_prefix(model: nn.Module) -> str | None:
    get_encoder = getattr(model, "get_encoder", None)  # a transformers encoder-decoder's, not nn.Module's
    if not getattr(getattr(model, "config", None), "is_encoder_decoder", False) or get_encoder is None:
        return None
    encoder = get_encoder()
    return next((name for name, module in model.named_modules() if module is encoder and name), None)


def _block_of(name: str, container: str | None) -> int | None:
    if not container or not name.startswith(container + "."):
        return None
    match = _BLOCK_INDEX.match(name[len(container) :])
    return int(match.group(1)) if match else None


def build_layer_graph(model: nn.Module) -> LayerGraph:
    """Find every nn.Linear, Conv1D and nn.Embedding, with the LM head and its tie."""
    container = block_container(model)
    get_output_embeddings = getattr(model, "get_output_embeddings", None)  # a transformers model's, not nn.Module's
    output_embeddings = get_output_embeddings() if get_output_embeddings is not None else None
    param_owner: dict[int, str] = {}
    layers: list[Layer] = []
    unquantizable: dict[str, str] = {}
    for name, module in model.named_modules():
        if isinstance(module, nn.Embedding):
            role, out_f, in_f = ROLE_EMBEDDING, module.num_embeddings, module.embedding_dim
        elif output_embeddings is not None and module is output_embeddings and isinstance(module, nn.Linear):
            role, out_f, in_f = ROLE_LM_HEAD, module.out_features, module.in_features
        elif isinstance(module, nn.Linear):
            role, out_f, in_f = ROLE_LINEAR, module.out_features, module.in_features
        elif _is_conv1d(module):
            role, in_f, out_f = ROLE_CONV1D, module.weight.shape[0], module.weight.shape[1]
        else:
            continue
        if in_f % MIN_BLOCK_SIZE:
            unquantizable[name] = (f"input size {in_f} is not a multiple of the smallest quantization block "
                                   f"({MIN_BLOCK_SIZE})")
            continue
        tied_to = param_owner.get(id(module.weight))
        param_owner.setdefault(id(module.weight), name)
        layers.append(Layer(name, role, _block_of(name, container), int(in_f), int(out_f), tied_to))
    num_blocks = len(_blocks(model, container)) if container else 0
    model_type = getattr(getattr(model, "config", None), "model_type", type(model).__name__)
    return LayerGraph(model_type=model_type, num_blocks=num_blocks, layers=layers, unquantizable=unquantizable)


def _blocks(model: nn.Module, container: str) -> nn.ModuleList:
    blocks = model.get_submodule(container)
    assert isinstance(blocks, nn.ModuleList)  # block_container() names only a ModuleList
    return blocks


def _layer_weight(model: nn.Module, name: str) -> torch.Tensor:
    """The weight of layer `name` (an nn.Linear, Conv1D or nn.Embedding: each has one)."""
    weight = model.get_submodule(name).weight
    if not isinstance(weight, torch.Tensor):
        raise TypeError(f"{name}.weight is a {type(weight).__name__}, not a tensor")
    return weight


def weight_in_out(model: nn.Module, layer: Layer) -> torch.Tensor:
    """The layer's weight as [in_features, out_features] (the ONNX MatMul layout).

    Embedding tables come back as [hidden, rows] so that every layer's blocks run along dim 0.
    """
    weight = _layer_weight(model, layer.name).detach()
    return weight if layer.role == ROLE_CONV1D else weight.t()
