"""The lowering passes' common base: an onnx-ir in-place pass over the sites of one `Lowering`."""

from __future__ import annotations

from collections.abc import Iterable

import onnx_ir as ir

from .context import Lowering, Site


class LoweringPass(ir.passes.InPlacePass):
    """Rewrites the sites `wanted` picks; `requires` / `ensures` check the graph around them.

    A subclass implements `wanted(site)` and `lower(site)`; it may add `check_before(site)` and
    `check_after(site)` (raise on a violated condition), which run on its sites before and after.
    """

    def __init__(self, lowering: Lowering):
        super().__init__()
        self.lowering = lowering

    def wanted(self, site: Site) -> bool:
        raise NotImplementedError

    def lower(self, site: Site) -> None:
        raise NotImplementedError

    def check_before(self, site: Site) -> None:
        pass

    def check_after(self, site: Site) -> None:
        pass

    def sites(self) -> Iterable[Site]:
        return self.lowering.select(self.wanted)

    def requires(self, model: ir.Model) -> None:
        self._check_model(model)
        for site in self.sites():
            self.check_before(site)

    def ensures(self, model: ir.Model) -> None:
        for site in self.sites():
            self.check_after(site)

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        self._check_model(model)
        sites = list(self.sites())
        for site in sites:
            self.lower(site)
        return ir.passes.PassResult(model, modified=bool(sites))

    def _check_model(self, model: ir.Model) -> None:
        if model is not self.lowering.model:
            raise ir.passes.PreconditionError(f"{type(self).__name__} lowers the model it was made for")
