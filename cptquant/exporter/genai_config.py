"""`genai_config.json` for a causal-LM export, so the output folder also runs under onnxruntime-genai.

ONNX Runtime GenAI (`onnxruntime_genai.Model(folder)`) reads the decoder's input/output names, its
head counts and the special token ids from this file, and the tokenizer from the files beside it.
optimum's exports use the names GenAI knows (`input_ids`, `attention_mask`, `position_ids`,
`past_key_values.%d.key/value` in, `logits`, `present.%d.key/value` out); they are read from the
graph itself, never assumed. optimum's decoders grow the KV cache by concatenation, so the past and
present buffers are not shared (`past_present_share_buffer` false), unlike the model builder's.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import onnx

GENAI_CONFIG = "genai_config.json"
# model_type values GenAI 0.18 accepts for a plain decoder; other architectures get no genai_config.json.
GENAI_MODEL_TYPES = {"llama": "llama", "mistral": "mistral", "qwen2": "qwen2", "gpt2": "gpt2"}
_PAST = re.compile(r"^past_key_values\.(\d+)\.(key|value)$")
_PRESENT = re.compile(r"^present\.(\d+)\.(key|value)$")


def genai_model_type(model_type: str | None) -> str | None:
    return GENAI_MODEL_TYPES.get(model_type or "")


def _token_ids(value: int | list[int] | tuple[int, ...] | None) -> list[int]:
    if value is None:
        return []
    return [int(v) for v in value] if isinstance(value, (list, tuple)) else [int(value)]


def _config_value(config: dict[str, Any], *keys: str) -> Any:
    """The first of `keys` the config.json sets (GPT-2's file says n_head/n_embd where Llama's says
    num_attention_heads/hidden_size)."""
    for key in keys:
        if config.get(key) is not None:
            return config[key]
    raise ValueError(f"config.json sets none of {', '.join(keys)}")


def build_genai_config(model_path: Path, config: dict[str, Any],
                       generation: dict[str, Any] | None = None) -> dict[str, Any]:
    """The GenAI configuration of the decoder at `model_path` (its graph is read without its weights).

    `config` is the folder's config.json, `generation` its generation_config.json (its ids win:
    they are what `generate` uses)."""
    graph = onnx.load(str(model_path), load_external_data=False).graph
    inputs = [i.name for i in graph.input]
    outputs = [o.name for o in graph.output]
    layers = sorted({int(m.group(1)) for m in map(_PAST.match, inputs) if m})
    if "input_ids" not in inputs or "logits" not in outputs or not layers:
        raise ValueError(f"{model_path.name} is not a decoder with a KV cache (inputs: {', '.join(inputs[:4])}…)")
    if not all(f"present.{i}.key" in outputs and f"present.{i}.value" in outputs for i in layers):
        raise ValueError(f"{model_path.name}: present.N.key/value outputs do not match its past_key_values inputs")
    past_shape = next(i.type.tensor_type.shape for i in graph.input if i.name == f"past_key_values.{layers[0]}.key")
    dims = [d.dim_value if d.HasField("dim_value") else None for d in past_shape.dim]
    generation = generation or {}
    heads = int(_config_value(config, "num_attention_heads", "n_head"))
    hidden = int(_config_value(config, "hidden_size", "n_embd"))
    kv_heads = int(config.get("num_key_value_heads") or dims[1] or heads)
    head_size = int(config.get("head_dim") or dims[-1] or hidden // heads)
    context = int(config.get("max_position_embeddings") or config.get("n_positions") or 2048)
    eos = _token_ids(generation.get("eos_token_id", config.get("eos_token_id")))
    bos = generation.get("bos_token_id", config.get("bos_token_id"))
    pad = generation.get("pad_token_id", config.get("pad_token_id"))
    pad = pad if pad is not None else (eos[0] if eos else 0)
    names_in = {"input_ids": "input_ids", "past_key_names": "past_key_values.%d.key",
                "past_value_names": "past_key_values.%d.value"}
    for optional in ("attention_mask", "position_ids"):
        if optional in inputs:
            names_in[optional] = optional
    decoder = {
        "session_options": {"log_id": "onnxruntime-genai", "provider_options": []},
        "filename": model_path.name,
        "head_size": head_size,
        "hidden_size": hidden,
        "inputs": names_in,
        "outputs": {"logits": "logits", "present_key_names": "present.%d.key", "present_value_names": "present.%d.value"},
        "num_attention_heads": heads,
        "num_hidden_layers": len(layers),
        "num_key_value_heads": kv_heads,
    }
    model = {"type": genai_model_type(config.get("model_type")) or config.get("model_type"),
             "context_length": context, "decoder": decoder, "eos_token_id": eos if len(eos) != 1 else eos[0],
             "pad_token_id": int(pad), "vocab_size": int(config["vocab_size"])}
    if bos is not None:
        model["bos_token_id"] = int(bos)
    # Greedy by default, as optimum's generate with a default generation config.
    search = {"do_sample": False, "num_beams": 1, "num_return_sequences": 1, "max_length": context,
              "min_length": 0, "past_present_share_buffer": False, "repetition_penalty": 1.0,
              "temperature": 1.0, "top_k": 1, "top_p": 1.0, "early_stopping": True, "length_penalty": 1.0,
              "no_repeat_ngram_size": 0, "diversity_penalty": 0.0}
    return {"model": model, "search": search}


def write_genai_config(folder: Path, model_file: str) -> Path | None:
    """Write genai_config.json into `folder` for its `model_file` when the folder holds a decoder GenAI
    can run (config.json with a supported model_type); returns the path, or None when not written."""
    config_path = folder / "config.json"
    if not config_path.is_file():
        return None
    config = json.loads(config_path.read_text())
    if genai_model_type(config.get("model_type")) is None:
        return None
    generation_path = folder / "generation_config.json"
    generation = json.loads(generation_path.read_text()) if generation_path.is_file() else None
    path = folder / GENAI_CONFIG
    path.write_text(json.dumps(build_genai_config(folder / model_file, config, generation), indent=4) + "\n")
    return path
