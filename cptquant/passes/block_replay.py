"""Replay the unchanged front of the model when one unit's weights change (PMPQ and the oracle).

Changing the weights of a layer in block i leaves blocks 0..i-1 as they were, so their output on
every calibration batch is computed once, in the unpruned pass that also gives the base loss, and
replayed: each scored unit then runs only from its own block on. The replayed outputs are the
very tensors the unchanged model computed, so the scores equal those of full passes. Replayed
blocks are chosen evenly within a memory budget (half the model's weight bytes by default, so a
pass stays within 2x the model).
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterator, Sequence

import torch

from ..layer_graph import LayerGraph, block_container
from .common import allocation_units, transformer_blocks, weight_param
from .task_loss import TaskLoss

DEFAULT_BUDGET_FRACTION = 0.5


@contextlib.contextmanager
def replaying(blocks: Sequence[torch.nn.Module], saved_output: Callable[[], object]) -> Iterator[None]:
    """`blocks` (the first blocks of the stack) return `saved_output()` without computing: the model's next
    block gets the output the unchanged model computed for the batch in flight (also GPTQ's block-by-block
    Hessians, hessian.BlockwiseHessians)."""
    # A block may already carry an instance forward (accelerate's hooks wrap it so): put that one back, not
    # the class's.
    wrapped = {id(block): block.__dict__.get("forward") for block in blocks}
    for block in blocks:
        block.forward = lambda *_args, **_kwargs: saved_output()
    try:
        yield
    finally:
        for block in blocks:
            previous = wrapped[id(block)]
            if previous is None:
                del block.forward  # back to the class's forward
            else:
                block.forward = previous


class BlockReplay:
    """The base loss, plus `evaluate_unit(unit)`: the loss with only the unit's blocks onward recomputed."""

    def __init__(self, model: torch.nn.Module, graph: LayerGraph, loss: TaskLoss, granularity: str,
                 budget_bytes: int | None = None) -> None:
        self.model, self.loss = model, loss
        self.blocks = transformer_blocks(model, block_container(model) if graph.num_blocks else None)
        if budget_bytes is None:
            budget_bytes = int(DEFAULT_BUDGET_FRACTION * sum(p.numel() * p.element_size() for p in model.parameters()))
        self.kept = self._blocks_within(budget_bytes)
        # block -> its output per batch, as the block returned it (a tensor, or a tuple starting with one)
        self.outputs: dict[int, list[object]] = {j: [] for j in self.kept}
        self.batch = 0
        self.base_loss: float  # set by the base pass
        self.unit_start = self._base_pass(graph, granularity)

    def _blocks_within(self, budget_bytes: int) -> list[int]:
        """Which block outputs to keep: every one if they fit, else evenly spaced ending at the last."""
        n = len(self.blocks)
        hidden = getattr(getattr(self.model, "config", None), "hidden_size", None)
        if not n or not hidden:
            return []
        per_block = sum(b["input_ids"].numel() for b in self.loss.inputs) * hidden * 4
        capacity = budget_bytes // per_block
        if capacity < 1:
            return []
        stride = math.ceil(n / capacity)
        return [j for j in range(n) if (n - 1 - j) % stride == 0]

    @torch.no_grad()
    def _base_pass(self, graph: LayerGraph, granularity: str) -> dict[str, int]:
        """Run the unchanged model once: base loss, kept outputs, and the order things first happen in."""
        events: dict[tuple[str, int], int] = {}  # ("use", id(module)) / ("end", block) -> position in the first batch

        def note(key: tuple[str, int]) -> None:
            events.setdefault(key, len(events))

        layer_modules = {layer.name: self.model.get_submodule(layer.name) for layer in graph.layers}
        handles = [m.register_forward_pre_hook(lambda m, _args: note(("use", id(m)))) for m in layer_modules.values()]
        for j, block in enumerate(self.blocks):
            def after_block(_module: torch.nn.Module, _args: tuple[object, ...], output: object, j: int = j) -> None:
                note(("end", j))
                if j in self.outputs:
                    self.outputs[j].append(output)
            handles.append(block.register_forward_hook(after_block))
        try:
            self.base_loss = self.loss.evaluate(self.model)
        finally:
            for handle in handles:
                handle.remove()
        # Each unit replays up to the last kept block that ends before any use of its parameters
        # (a tied LM head's parameter is first used by the embedding, so it replays nothing).
        first_use: dict[torch.nn.Parameter, int] = {}
        for layer in graph.layers:
            position = events.get(("use", id(layer_modules[layer.name])))
            if position is not None:
                param = weight_param(self.model, layer)
                first_use[param] = min(position, first_use.get(param, position))
        starts: dict[str, int] = {}
        for unit, layers in allocation_units(graph, granularity).items():
            uses = [first_use[p] for p in (weight_param(self.model, layer) for layer in layers) if p in first_use]
            begin = min(uses, default=-1)
            replayable = [j for j in self.kept if events.get(("end", j), begin) < begin]
            starts[unit] = max(replayable, default=-1)
        return starts

    def _replaying(self, last: int) -> contextlib.AbstractContextManager[None]:
        """Blocks 0..last return the kept output of block `last` for the current batch, without computing."""
        return replaying(self.blocks[: last + 1], lambda: self.outputs[last][self.batch])

    @torch.no_grad()
    def evaluate_unit(self, unit: str) -> float:
        """Task loss of the model as it is now, given that only `unit`'s weights differ from the base pass."""
        total = 0.0
        with self._replaying(self.unit_start.get(unit, -1)):
            for index in range(len(self.loss.inputs)):
                self.batch = index
                total += self.loss.batch_weight(index) * float(self.loss.batch_loss(self.model, index))
        return total
