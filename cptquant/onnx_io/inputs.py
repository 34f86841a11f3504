"""Build ONNX Runtime feeds for an exported transformer from its declared inputs.

optimum's exports take input_ids and attention_mask, and depending on the architecture
token_type_ids, position_ids and past_key_values.* (empty at the first step).
"""

from __future__ import annotations

import numpy as np
import onnxruntime as ort

NP_TYPES = {"tensor(int64)": np.int64, "tensor(int32)": np.int32, "tensor(float)": np.float32,
             "tensor(float16)": np.float16}


def feeds_for(session: ort.InferenceSession, input_ids: np.ndarray,
              attention_mask: np.ndarray | None = None) -> dict[str, np.ndarray]:
    """Feeds for one forward pass with an empty KV cache; batch and length from `input_ids`."""
    input_ids = np.asarray(input_ids, dtype=np.int64)
    batch, length = input_ids.shape
    if attention_mask is None:
        attention_mask = np.ones_like(input_ids)
    attention_mask = np.asarray(attention_mask, dtype=np.int64)
    feeds = {}
    for arg in session.get_inputs():
        dtype = NP_TYPES.get(arg.type, np.int64)
        if arg.name == "input_ids":
            feeds[arg.name] = input_ids.astype(dtype)
        elif arg.name == "attention_mask":
            feeds[arg.name] = attention_mask.astype(dtype)
        elif arg.name == "token_type_ids":
            feeds[arg.name] = np.zeros_like(input_ids, dtype=dtype)
        elif arg.name == "position_ids":
            feeds[arg.name] = np.clip(np.cumsum(attention_mask, axis=1) - 1, 0, None).astype(dtype)
        elif arg.name.startswith("past_key_values"):
            shape = [d if isinstance(d, int) else (batch if i == 0 else 0) for i, d in enumerate(arg.shape)]
            feeds[arg.name] = np.zeros(shape, dtype=dtype)
        else:
            raise ValueError(f"unexpected model input {arg.name!r} ({arg.type})")
    return feeds
