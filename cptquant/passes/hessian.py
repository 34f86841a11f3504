"""Input Hessians for GPTQ: H = mean over real tokens of x xᵀ, for each layer's input x.

A forward pre-hook on every requested nn.Linear / Conv1D over the calibration set; padded positions
are dropped with the attention mask. Embedding tables read token ids, not activations, so they have
no Hessian and are skipped (they stay round-to-nearest).

A Hessian is K x K float64: held for every layer at once they take more memory than the model itself
(OPT-2.7B: 35 GB against 10.6 GB of weights). `BlockwiseHessians` therefore measures them one block at a
time, when the quantizer first asks for a layer of that block, and forgets the block before: the
blocks before it are replayed from their saved outputs and the blocks after it do not run, so the whole
export costs about two forward passes and holds one block's Hessians plus one block's outputs. It is also
sequential, as GPTQ was defined: block i's inputs come from blocks 0..i-1 with their weights as written
(SmolLM2 tdmpq 4.5 bits: KL 0.114 -> 0.109 against FP32 inputs; docs/benchmarks.md).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np
import numpy.typing as npt
import torch
from scipy.linalg import blas
from torch.utils.hooks import RemovableHandle

from ..errors import CptqError
from ..layer_graph import ROLE_CONV1D, ROLE_EMBEDDING, LayerGraph, block_container
from ..model_loading import LoadedModel
from .block_replay import replaying
from .calibration import CalibrationSet
from .common import forward_options, progress_bar, replaced_weights, transformer_blocks, weight_param

Hessian = npt.NDArray[np.float64]  # [K, K], K the layer's input size


def _gram_lower(rows: torch.Tensor) -> torch.Tensor:
    """rowsᵀ rows in float32, its lower triangle computed (the upper one may hold anything). On the CPU BLAS's
    syrk does half a matmul's work and runs faster per flop too (8,192-wide rows, 1,024 of them, 2 threads:
    0.37 s against torch's 0.88 s for the full product); elsewhere a matmul."""
    if rows.device.type != "cpu":
        return rows.T @ rows
    # rows [T, K] row-major: its transpose is a column-major [K, T] view that syrk reads without a copy; the
    # column-major upper triangle of A Aᵀ it returns is, read row-major, the lower triangle of the product.
    upper = blas.ssyrk(1.0, rows.contiguous().numpy().T, trans=0, lower=0)
    return torch.from_numpy(upper.T)


def _mirror_lower(h: np.ndarray, rows_per_step: int = 256) -> None:
    """Copy the lower triangle of square `h` onto its upper one, in place, a band of rows at a time."""
    size = h.shape[0]
    for start in range(0, size, rows_per_step):
        stop = min(start + rows_per_step, size)
        h[start:stop, stop:] = h[stop:, start:stop].T
        band, above = h[start:stop, start:stop], np.triu_indices(stop - start, 1)
        band[above] = band.T[above]


class _HessianAccumulator:
    def __init__(self) -> None:
        self.sum: torch.Tensor | None = None  # float64 running Σ x xᵀ, its lower triangle
        self.tokens = 0

    def add(self, gram: torch.Tensor, tokens: int) -> None:
        if self.sum is None:
            self.sum = gram.double()
        else:
            self.sum.add_(gram)  # in place (the same sums as `sum + gram`): no second K x K float64 per batch
        self.tokens += tokens

    def hessian(self) -> Hessian:
        """The mean, made in the running sum's memory (so called once)."""
        if self.sum is None:
            raise ValueError("no input was accumulated")  # _finished() reports such layers first
        hessian: Hessian = self.sum.div_(self.tokens).cpu().numpy()
        self.sum = None
        _mirror_lower(hessian)
        return hessian


def _real_rows(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """The rows of activation `x` ([B, T, K] or [B*T, K]) at real tokens; per-sample inputs
    ([B, K], a pooler or classifier head) are all real."""
    flat = x.detach().reshape(-1, x.shape[-1])
    if flat.shape[0] == mask.numel():
        return flat[mask.reshape(-1).to(flat.device).bool()]
    return flat


class _BlockDone(Exception):
    """Raised after the last block a pass needs: the rest of the model does not run."""


def _hooked_forward(model: torch.nn.Module, calib: CalibrationSet, handles: list[RemovableHandle],
                    mask_in_flight: list[torch.Tensor], label: str, progress: bool,
                    after_batch: Callable[[], None] | None = None, before_batch: Callable[[int], None] | None = None,
                    options: dict[str, bool] | None = None) -> None:
    """One no-grad pass over the calibration set for hooks that read the batch's mask; removes the hooks.
    `before_batch(index)` runs before each batch; a hook may end a batch early by raising _BlockDone."""
    device = next(model.parameters()).device
    try:
        with torch.no_grad(), progress_bar(progress) as bar:
            task = bar.add_task(label, total=len(calib.batches))
            for index, batch in enumerate(calib.batches):
                if before_batch is not None:
                    before_batch(index)
                mask_in_flight[:] = [batch["attention_mask"]]
                try:
                    model(input_ids=batch["input_ids"].to(device), attention_mask=batch["attention_mask"].to(device),
                          **(options or {}))
                except _BlockDone:
                    pass
                if after_batch is not None:
                    after_batch()
                bar.advance(task)
    finally:
        for handle in handles:
            handle.remove()


def collect_hessians(loaded: LoadedModel, graph: LayerGraph, calib: CalibrationSet, layer_names: list[str],
                     progress: bool = True) -> dict[str, Hessian]:
    """Hessians [K, K] (float64, normalised by the number of real tokens) keyed by layer name, all at once.

    Embedding layers in `layer_names` are left out of the result. A tied LM head is hooked like
    any Linear (its input is the final hidden state, not the embedding's token ids).
    """
    accumulators, handles, mask_in_flight, reset = _hooks(loaded.model, graph, layer_names)
    _hooked_forward(loaded.model, calib, handles, mask_in_flight, "Hessians forward", progress, after_batch=reset)
    return _finished(accumulators)


def _finished(accumulators: dict[str, _HessianAccumulator]) -> dict[str, Hessian]:
    missing = [name for name, acc in accumulators.items() if acc.tokens == 0]
    if missing:
        raise CptqError(f"no calibration input reached these layers, so GPTQ has no Hessian: {', '.join(missing)}")
    return {name: acc.hessian() for name, acc in accumulators.items()}


@dataclass
class _LastInput:
    """The input the last hooked layer read, and its xᵀx over real tokens.

    q/k/v (and gate/up) read the same tensor: its xᵀx is computed once per call chain. Holding a
    reference to the last input keeps the identity test sound (the tensor cannot be freed and reused).
    """

    x: torch.Tensor | None = None
    gram: torch.Tensor | None = None
    tokens: int = 0

    def reset(self) -> None:
        self.x, self.gram = None, None


# A forward pre-hook registered with_kwargs=True: (module, args, kwargs).
_PreHook = Callable[[torch.nn.Module, tuple[object, ...], dict[str, object]], None]


def _layer_input(args: tuple[object, ...], kwargs: dict[str, object]) -> object:
    return args[0] if args else kwargs.get("input", kwargs.get("x"))


class _Hooks(NamedTuple):
    """An accumulator and a pre-hook per non-embedding layer; the mask slot the forward fills; the reset to
    call after each batch."""

    accumulators: dict[str, _HessianAccumulator]
    handles: list[RemovableHandle]
    mask_in_flight: list[torch.Tensor]
    reset: Callable[[], None]


def _hooks(model: torch.nn.Module, graph: LayerGraph, layer_names: list[str],
           stop_when_all_read: bool = False) -> _Hooks:
    """With `stop_when_all_read` the batch's forward ends (_BlockDone) once every hooked layer has read its input:
    the head's Hessian needs its input, not the logits (opt-640m: 8,192 tokens × 50,272 logits, ~15 s)."""
    accumulators: dict[str, _HessianAccumulator] = {}
    mask_in_flight: list[torch.Tensor] = []
    last = _LastInput()
    read: set[str] = set()  # the layers that read their input in this batch

    def hook_for(name: str, acc: _HessianAccumulator) -> _PreHook:
        def hook(_module: torch.nn.Module, args: tuple[object, ...], kwargs: dict[str, object]) -> None:
            x = _layer_input(args, kwargs)
            if not isinstance(x, torch.Tensor):
                return
            gram, tokens = last.gram, last.tokens
            if x is not last.x or gram is None:
                rows = _real_rows(x, mask_in_flight[0]).float()
                # float32 product per batch (fast), float64 running sum across batches.
                gram, tokens = _gram_lower(rows), rows.shape[0]
                last.x, last.gram, last.tokens = x, gram, tokens
            acc.add(gram, tokens)
            read.add(name)
            if stop_when_all_read and len(read) == len(accumulators):
                raise _BlockDone

        return hook

    def reset() -> None:
        last.reset()
        read.clear()

    handles: list[RemovableHandle] = []
    for name in layer_names:
        layer = graph[name]
        if layer.role == ROLE_EMBEDDING:
            continue
        acc = accumulators[name] = _HessianAccumulator()
        handles.append(model.get_submodule(name).register_forward_pre_hook(hook_for(name, acc), with_kwargs=True))
    return _Hooks(accumulators, handles, mask_in_flight, reset)


class BlockwiseHessians(Mapping[str, np.ndarray]):
    """The Hessians of `collect_hessians`, measured one block at a time on demand, and sequentially as GPTQ does:
    a block's inputs are what the blocks before it compute with their weights as written.

    Layer -> phase: its transformer block, or the tail (the head, and any layer outside the blocks, measured
    last). Asking for a layer of a later phase runs the calibration batches from the saved outputs through the
    wanted block, and drops the Hessians held; asking for an earlier phase starts again from the embeddings
    (correct, only slower: the lowering asks in the layer map's order, which is the blocks' order). The
    quantizer hands each layer's weight as written to `write`; the blocks run between the saved outputs and
    the wanted one use those (the last block before it is run again for that: about one more forward pass in
    all). Nothing written (a caller without a quantizer): equal to `collect_hessians`' to the last bit.
    """

    def __init__(self, loaded: LoadedModel, graph: LayerGraph, calib: CalibrationSet, layer_names: list[str],
                 progress: bool = True) -> None:
        self.model, self.graph, self.calib, self.progress = loaded.model, graph, calib, progress
        self.container = container = block_container(self.model)
        self.blocks = transformer_blocks(self.model, container if graph.num_blocks else None)
        self.tail = len(self.blocks)
        names = [name for name in layer_names if graph[name].role != ROLE_EMBEDDING]
        self.phase = {name: self._phase_of(name, container) for name in names}
        self.held: dict[str, Hessian] = {}
        self.position = -1  # the last block whose outputs are saved
        self.saved: list[object] = []  # its output for each calibration batch, as the block returned it
        self.written: dict[str, np.ndarray] = {}  # a block's layer -> its weight as written ([K, N], float32)

    def _phase_of(self, name: str, container: str | None) -> int:
        block = self.graph[name].block
        inside = container is not None and name.startswith(container + ".")
        return block if block is not None and inside and block < self.tail else self.tail

    def __getitem__(self, name: str) -> Hessian:
        if name not in self.phase:
            raise KeyError(name)
        if name not in self.held:
            self._measure(self.phase[name])
        return self.held[name]

    def pop(self, name: str, default: Hessian | None = None) -> Hessian | None:
        """The layer's Hessian, no longer held (GPTQ factorises it in place, and it goes when GPTQ is done with
        it); reading it again measures its block again."""
        if name not in self.phase:
            return default
        hessian = self[name]
        del self.held[name]
        return hessian

    def __iter__(self) -> Iterator[str]:
        return iter(self.phase)

    def __len__(self) -> int:
        return len(self.phase)

    def write(self, layer: str, weight_kn: Callable[[], np.ndarray]) -> None:
        """The quantizer wrote `layer` as `weight_kn()` (dequantized, [K, N]): the blocks after its own will be
        measured with it in place of the FP32 weight (only a block's layers, of the blocks not yet run: the
        weight is only dequantized for those)."""
        phase = self._phase_of(layer, self.container) if layer in self.graph else self.tail
        if self.position < phase < self.tail:
            self.written[layer] = weight_kn()

    def _written_values(self, blocks: range) -> dict[torch.nn.Parameter, torch.Tensor]:
        """The weights as written of `blocks`' layers, as torch parameter values. A layer whose ONNX weight is not
        its torch weight (another shape, or the exporter folded something into it: further from it than any
        rounding) keeps its FP32 weight."""
        values: dict[torch.nn.Parameter, torch.Tensor] = {}
        for layer in self.graph.layers:
            if layer.block not in blocks or layer.name not in self.written:
                continue
            param = weight_param(self.model, layer)
            kn = torch.from_numpy(self.written.pop(layer.name))
            value = kn if layer.role == ROLE_CONV1D else kn.T
            if tuple(value.shape) == tuple(param.shape):
                reference = param.detach().float()
                if float(torch.linalg.vector_norm(value - reference)) < 0.5 * float(torch.linalg.vector_norm(reference)):
                    values[param] = value.to(param.dtype)
        return values

    @torch.no_grad()
    def _measure(self, phase: int) -> None:
        """Block `phase`'s Hessians (or the tail's) with its input as deployed: the blocks between the saved
        outputs and it run with their weights as written (GPTQ's sequential order: each block calibrated on what
        the quantized blocks before it compute); the measured block itself runs FP32 and the pass stops after
        it. Saved for the next block: the output of block `phase` - 1, on which the next measurement re-runs
        block `phase`, written."""
        if phase <= self.position:  # a block already passed: its input is gone, start again
            self.position, self.saved = -1, []
        self.held = {}  # the previous phase's Hessians go before this phase's are made
        # The tail (the head, layers outside the blocks) stops once its layers have read their inputs.
        accumulators, handles, mask_in_flight, reset = _hooks(self.model, self.graph,
                                                              [name for name, p in self.phase.items() if p == phase],
                                                              stop_when_all_read=phase == self.tail)
        outputs: list[object] = []

        def keep(_module: torch.nn.Module, _args: tuple[object, ...], output: object) -> None:
            outputs.append(output)

        def stop_after(_module: torch.nn.Module, _args: tuple[object, ...], output: object) -> None:
            raise _BlockDone

        if phase < self.tail:
            if phase >= 1:
                handles.append(self.blocks[phase - 1].register_forward_hook(keep))
            handles.append(self.blocks[phase].register_forward_hook(stop_after))
        batch = [0]
        label = f"Hessians, block {phase + 1} of {self.tail}" if phase < self.tail else "Hessians, head"
        written = self._written_values(range(self.position + 1, phase))
        with replaying(self.blocks[: self.position + 1], lambda: self.saved[batch[0]]), \
                replaced_weights(self.model, written):
            # no KV cache: the replayed blocks would leave holes in it
            _hooked_forward(self.model, self.calib, handles, mask_in_flight, label, self.progress, after_batch=reset,
                            before_batch=lambda index: batch.__setitem__(0, index),
                            options=forward_options(self.model))
        if phase < self.tail:
            self.position, self.saved = phase - 1, outputs
        self.held = _finished(accumulators)


def hessians_by_block(loaded: LoadedModel, graph: LayerGraph, calib: CalibrationSet, layer_names: list[str],
                      progress: bool = True) -> dict[str, Hessian] | BlockwiseHessians:
    """`collect_hessians`' result, block by block where the model has one stack of blocks (BlockwiseHessians;
    an encoder-decoder's decoder blocks would all fall to the tail, so it is measured at once)."""
    container = block_container(loaded.model) if graph.num_blocks else None
    if (container is None or getattr(loaded.model.config, "is_encoder_decoder", False)
            or not _each_block_runs_once(loaded.model, transformer_blocks(loaded.model, container), calib)):
        return collect_hessians(loaded, graph, calib, layer_names, progress)
    return BlockwiseHessians(loaded, graph, calib, layer_names, progress)


@torch.no_grad()
def _each_block_runs_once(model: torch.nn.Module, blocks: list[torch.nn.Module],
                          calib: CalibrationSet) -> bool:
    """Whether one forward calls every block once, in order: not so where blocks share weights and run
    repeatedly (ALBERT's one layer group serves all its layers), which one pass per block cannot follow."""
    calls: list[int] = []
    handles = [block.register_forward_pre_hook(lambda _m, _a, j=j: calls.append(j)) for j, block in enumerate(blocks)]
    batch = calib.batches[0]
    device = next(model.parameters()).device
    try:
        model(input_ids=batch["input_ids"][:1, :8].to(device), attention_mask=batch["attention_mask"][:1, :8].to(device),
              **forward_options(model))
    finally:
        for handle in handles:
            handle.remove()
    return calls == list(range(len(blocks)))


def collect_input_absmax(loaded: LoadedModel, graph: LayerGraph, calib: CalibrationSet, layer_names: list[str],
                         progress: bool = True) -> dict[str, npt.NDArray[np.float32]]:
    """Largest |x| per input channel [K] of each layer's input over the real calibration tokens.

    `--format dynamic` quantizes a layer's whole input with one scale at run time; a few channels
    far above the rest (BERT's FFN inputs: 28 against a median of 1.9 on MiniLM) set that scale.
    """
    model = loaded.model
    absmax: dict[str, torch.Tensor] = {}
    mask_in_flight: list[torch.Tensor] = []

    def hook_for(name: str) -> _PreHook:
        def hook(_module: torch.nn.Module, args: tuple[object, ...], kwargs: dict[str, object]) -> None:
            x = _layer_input(args, kwargs)
            if isinstance(x, torch.Tensor):
                peak = _real_rows(x, mask_in_flight[0]).float().abs().amax(dim=0)
                absmax[name] = peak if name not in absmax else torch.maximum(absmax[name], peak)

        return hook

    names = [name for name in layer_names if graph[name].role != ROLE_EMBEDDING]
    handles = [model.get_submodule(name).register_forward_pre_hook(hook_for(name), with_kwargs=True)
               for name in names]
    _hooked_forward(model, calib, handles, mask_in_flight, "activation ranges forward", progress)
    return {name: peak.cpu().numpy() for name, peak in absmax.items()}
