"""Input Hessians for GPTQ: H = mean over real tokens of x xᵀ, for each layer's input x.

One forward pass over the calibration set with a forward pre-hook on every requested nn.Linear /
Conv1D; padded positions are dropped with the attention mask. Embedding tables read token ids,
not activations, so they have no Hessian and are skipped (they stay round-to-nearest).
"""

from __future__ import annotations

import numpy as np
import torch

from ..errors import CptqError
from ..layer_graph import ROLE_EMBEDDING, LayerGraph
from .calibration import CalibrationSet
from .common import progress_bar


class _HessianAccumulator:
    def __init__(self) -> None:
        self.sum: torch.Tensor | None = None  # float64 running Σ x xᵀ
        self.tokens = 0

    def add(self, gram: torch.Tensor, tokens: int) -> None:
        self.sum = gram.double() if self.sum is None else self.sum + gram
        self.tokens += tokens

    def hessian(self) -> np.ndarray:
        return (self.sum / self.tokens).cpu().numpy()


def _real_rows(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """The rows of activation `x` ([B, T, K] or [B*T, K]) at real tokens; per-sample inputs
    ([B, K], a pooler or classifier head) are all real."""
    flat = x.detach().reshape(-1, x.shape[-1])
    if flat.shape[0] == mask.numel():
        return flat[mask.reshape(-1).to(flat.device).bool()]
    return flat


def _hooked_forward(model, calib: CalibrationSet, handles: list, mask_in_flight: list, label: str, progress: bool,
                    after_batch=None) -> None:
    """One no-grad pass over the calibration set for hooks that read the batch's mask; removes the hooks."""
    device = next(model.parameters()).device
    try:
        with torch.no_grad(), progress_bar(progress) as bar:
            task = bar.add_task(label, total=len(calib.batches))
            for batch in calib.batches:
                mask_in_flight[:] = [batch["attention_mask"]]
                model(input_ids=batch["input_ids"].to(device), attention_mask=batch["attention_mask"].to(device))
                if after_batch is not None:
                    after_batch()
                bar.advance(task)
    finally:
        for handle in handles:
            handle.remove()


def collect_hessians(loaded, graph: LayerGraph, calib: CalibrationSet, layer_names: list[str],
                     progress: bool = True) -> dict[str, np.ndarray]:
    """Hessians [K, K] (float64, normalised by the number of real tokens) keyed by layer name.

    Embedding layers in `layer_names` are left out of the result. A tied LM head is hooked like
    any Linear (its input is the final hidden state, not the embedding's token ids).
    """
    model = loaded.model
    accumulators: dict[str, _HessianAccumulator] = {}
    mask_in_flight: list[torch.Tensor] = []
    # q/k/v (and gate/up) read the same tensor: its xᵀx is computed once per call chain. Holding a
    # reference to the last input keeps the identity test sound (the tensor cannot be freed and reused).
    last: dict = {"x": None, "gram": None, "tokens": 0}

    def hook_for(acc: _HessianAccumulator):
        def hook(_module, args, kwargs):
            x = args[0] if args else kwargs.get("input", kwargs.get("x"))
            if not isinstance(x, torch.Tensor):
                return
            if x is not last["x"]:
                rows = _real_rows(x, mask_in_flight[0]).float()
                # float32 product per batch (fast), float64 running sum across batches.
                last.update(x=x, gram=rows.T @ rows, tokens=rows.shape[0])
            acc.add(last["gram"], last["tokens"])

        return hook

    handles = []
    for name in layer_names:
        layer = graph[name]
        if layer.role == ROLE_EMBEDDING:
            continue
        acc = accumulators[name] = _HessianAccumulator()
        handles.append(model.get_submodule(name).register_forward_pre_hook(hook_for(acc), with_kwargs=True))
    _hooked_forward(model, calib, handles, mask_in_flight, "Hessians forward", progress,
                    after_batch=lambda: last.update(x=None, gram=None))
    missing = [name for name, acc in accumulators.items() if acc.tokens == 0]
    if missing:
        raise CptqError(f"no calibration input reached these layers, so GPTQ has no Hessian: {', '.join(missing)}")
    return {name: acc.hessian() for name, acc in accumulators.items()}


def collect_input_absmax(loaded, graph: LayerGraph, calib: CalibrationSet, layer_names: list[str],
                         progress: bool = True) -> dict[str, np.ndarray]:
    """Largest |x| per input channel [K] of each layer's input over the real calibration tokens.

    `--format dynamic` quantizes a layer's whole input with one scale at run time; a few channels
    far above the rest (BERT's FFN inputs: 28 against a median of 1.9 on MiniLM) set that scale.
    """
    model = loaded.model
    absmax: dict[str, torch.Tensor] = {}
    mask_in_flight: list[torch.Tensor] = []

    def hook_for(name: str):
        def hook(_module, args, kwargs):
            x = args[0] if args else kwargs.get("input", kwargs.get("x"))
            if isinstance(x, torch.Tensor):
                peak = _real_rows(x, mask_in_flight[0]).float().abs().amax(dim=0)
                absmax[name] = peak if name not in absmax else torch.maximum(absmax[name], peak)

        return hook

    names = [name for name in layer_names if graph[name].role != ROLE_EMBEDDING]
    handles = [model.get_submodule(name).register_forward_pre_hook(hook_for(name), with_kwargs=True)
               for name in names]
    _hooked_forward(model, calib, handles, mask_in_flight, "activation ranges forward", progress)
    return {name: peak.cpu().numpy() for name, peak in absmax.items()}
