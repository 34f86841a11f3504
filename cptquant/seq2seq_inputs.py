"""Decoder inputs for an encoder-decoder model called like an encoder (`model(input_ids, attention_mask)`).

Every pass, the Hessian collection and the task loss call a model with its calibration text alone. An
encoder-decoder LM (T5, BART) also needs the decoder's input: while the context below is open, a call
without one decodes the input itself, shifted right by the model's own rule (decoder start token first).
The decoder then reproduces the text it was given, and the task loss (passes/task_loss.py) compares its
predictions of the unshifted input with FP32's: a label-free objective that runs every layer of both stacks.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

from .errors import CptqError

_DECODER_INPUTS = ("decoder_input_ids", "decoder_inputs_embeds", "labels")


@contextlib.contextmanager
def decoder_reads_input(model: Any) -> Iterator[None]:
    """Within it, `model(input_ids=..., attention_mask=...)` of an encoder-decoder model decodes its input.
    A call that gives decoder inputs (optimum's ONNX export, generate) is left as it is; other models too."""
    if not getattr(getattr(model, "config", None), "is_encoder_decoder", False):
        yield
        return

    def fill(module: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> tuple[tuple[Any, ...], dict[str, Any]] | None:
        if any(kwargs.get(name) is not None for name in _DECODER_INPUTS):
            return None
        ids = kwargs.get("input_ids", args[0] if args else None)
        if ids is None:
            return None
        kwargs["decoder_input_ids"] = shifted_right(module, ids)
        return args, kwargs

    handle = model.register_forward_pre_hook(fill, with_kwargs=True)
    try:
        yield
    finally:
        handle.remove()


def start_token(config: Any) -> int:
    """The decoder's first token: the config's decoder start token, else its pad token (T5's rule)."""
    start = getattr(config, "decoder_start_token_id", None)
    if start is None:
        start = getattr(config, "pad_token_id", None)
    if start is None:
        raise CptqError("the model's config names no decoder_start_token_id (nor a pad token to start from)")
    return int(start)


def shifted_right(model: Any, ids: Any) -> Any:
    """The model's own shift (T5, BART) where it has one; else (M2M100, Blenderbot-small, ...) the rule they all
    follow: the decoder start token first, then the input but its last token."""
    if hasattr(model, "prepare_decoder_input_ids_from_labels"):
        return model.prepare_decoder_input_ids_from_labels(labels=ids)
    shifted = ids.new_full(ids.shape, start_token(model.config))
    shifted[:, 1:] = ids[:, :-1]
    return shifted
