"""The k_quant_mixed rule: the fixed layer choice that llama.cpp's Q4_K_M (`use_more_bits`), ONNX
Runtime GenAI's model builder, Olive and ModelOpt use instead of measuring sensitivity.

Everything at 4 bits except: the LM head at 8, and the attention value projection (or the fused
QKV projection) and the MLP down projection at 8 in blocks i < L/8, i >= 7L/8 and (i - L/8) % 3 == 2
(integer division, as in llama.cpp). A tied embedding follows its LM head (llama.cpp gives the
shared table the output's type). Built as a plan for our own exporter, so that comparing it with
a sensitivity method isolates the choice of layers from the kernels and codes.
"""

from __future__ import annotations

import re

from ..layer_graph import ROLE_EMBEDDING, ROLE_LM_HEAD, Layer, LayerGraph
from ..options import fitting_block_size
from ..plan import LayerPlan, Plan

RULE_METHOD = "rule"
MORE_BITS, BASE_BITS = 8, 4

# Attention value projections, or fused QKV projections, by the names transformers gives them.
_VALUE = re.compile(r"(^|\.)(v_proj|value|c_attn|query_key_value|qkv_proj|Wqkv|qkv|v)$")


def use_more_bits(block: int, num_blocks: int) -> bool:
    """llama.cpp's use_more_bits(i_layer, n_layers)."""
    eighth = num_blocks // 8
    return block < eighth or block >= 7 * num_blocks // 8 or (block - eighth) % 3 == 2


def _down_projection(layers: list[Layer]) -> set[str]:
    """The MLP's output projection of one block: the matrix layer with the widest input (the FFN's
    intermediate size) whose output is narrower than its input. Found by shape, so it holds for
    down_proj, fc2, fc_out, dense_4h_to_h, GPT-2's mlp.c_proj and BERT's output.dense alike."""
    candidates = [layer for layer in layers if layer.role != ROLE_EMBEDDING and layer.in_features > layer.out_features]
    if not candidates:
        return set()
    widest = max(layer.in_features for layer in candidates)
    return {layer.name for layer in candidates if layer.in_features == widest}


def rule_plan(graph: LayerGraph, block_size: int, model_name: str = "") -> Plan:
    """The k_quant_mixed plan for `graph` (symmetric everywhere; zero points are applied after)."""
    more: set[str] = set()
    for block, layers in graph.blocks().items():
        if use_more_bits(block, graph.num_blocks):
            more |= {layer.name for layer in layers if _VALUE.search(layer.name)}
            more |= _down_projection(layers)
    heads = {layer.name for layer in graph.layers if layer.role == ROLE_LM_HEAD}
    more |= heads
    more |= {layer.tied_to for layer in graph.layers if layer.name in heads and layer.tied_to}
    layer_plans = {layer.name: LayerPlan(bits=MORE_BITS if layer.name in more else BASE_BITS,
                                         block_size=fitting_block_size(layer.in_features, block_size))
                   for layer in graph.layers}
    meta = {"allocation": "k_quant_mixed rule (llama.cpp Q4_K_M use_more_bits)",
            "more_bits_blocks": sorted(b for b in graph.blocks() if use_more_bits(b, graph.num_blocks))}
    return Plan(layers=layer_plans, method=RULE_METHOD, model=model_name, meta=meta)
