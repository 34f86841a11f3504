"""What the lowering passes share: the planned layers' weight uses, the names taken, and what was written.

A `Site` is one use of a planned layer's weight (a MatMul, Gemm or Gather reading it). Passes find their
sites here, replace the site's consumer node, and add initializers and constant nodes through the
`Lowering`, which remembers which layer and use each belongs to. The last pass (`finish.py`) orders the
file by that: every layer's tensors together, in layer-map order, whatever order the passes ran in.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
import onnx_ir as ir

from ...plan import LayerPlan, Plan
from ...quant.storage import FORMAT_QDQ, shares_tied_table
from ...quant.weight_quantizers import RoundToNearest
from ..layer_map import WeightUse

MS_DOMAIN = "com.microsoft"
# The attribute values the passes write (onnx_ir.convenience.convert_attribute takes these and more).
AttrValue = int | float | str | Sequence[int] | ir.TensorProtocol
Key = tuple[int, int, int]  # (layer's place in the layer map, use, creation order): where it goes in the file


@dataclass(frozen=True)
class KernelChoice:
    """How each layer's 4/8-bit MatMul weights are written: `default` (a --format), or per layer.
    `reduce_range`: DynamicQuantizeMatMul's int8 weights within ±63, for CPUs whose int8 GEMM saturates."""

    default: str = FORMAT_QDQ
    per_layer: Mapping[str, str] = field(default_factory=dict)
    reduce_range: bool = False

    def format_of(self, layer: str) -> str:
        return self.per_layer.get(layer, self.default)


@dataclass
class Site:
    layer: str
    use_index: int
    order: int  # the layer's place in the layer map
    base: str  # prefix of the names written for it: the layer, or "layer.i" when it has several uses
    plan: LayerPlan
    use: WeightUse
    node: ir.Node  # the consumer: passes replace it (Gemm -> MatMul -> kernel) and update this
    gemm: GemmView | None = None  # set by the Gemm pass: how its weight reads as [K, N]
    input_scale: np.ndarray | None = None  # the kernel's weight is diag(s) W: its input must be X / s
    # What the passes wrote for this use, read into the layer's record at the end:
    kernels: list[str] = field(default_factory=list)  # what ORT must run on it
    nbytes: int = 0
    mse: float | None = None
    block_size: int | None = None
    algorithm: str | None = None
    outlier_channels: int | None = None
    hot_rows: int | None = None
    # A tied LM head that reads its token embedding's codes (set when the Lowering is made), and the
    # tables that embedding's Gather wrote, which the head then reads (set by the Gather pass).
    table_site: Site | None = None
    tables: list[WrittenTable] = field(default_factory=list)

    @property
    def bits(self) -> int:
        return self.plan.bits


@dataclass(frozen=True)
class GemmView:
    """How a lowered Gemm's stored weight B reads as the MatMul's [K, N]: transposed when transB, times alpha.
    Applied when the weight is read, so that no site holds a copy of it between passes (one per Gemm was
    1.5 GB resident on a 2.6 GB decoder)."""

    trans_b: bool
    alpha: float


@dataclass
class WrittenTable:
    """One GatherBlockQuantized table as written: its rows of the full table (None: all, in order), bits,
    and the codes [rows, hidden bytes], FP16 scales [rows, blocks] and packed zero points it reads."""

    rows: np.ndarray | None
    bits: int
    block_size: int
    codes: ir.Value
    scales: ir.Value
    zero_points: ir.Value | None


def tied_table_sites(sites: Sequence[Site], kernels: KernelChoice) -> None:
    """Point each LM head that reads a token embedding's weight (a tie: the same initializer, through a
    Transpose) at that embedding's site when both are planned alike at 4 or 8 bits and the head's format
    runs MatMulNBits, which can read the table's codes (quant/storage.TiedHead)."""
    tables = {site.use.initializer: site for site in sites if site.use.op_type == "Gather"}
    for site in sites:
        table = tables.get(site.use.initializer)
        if (site.use.op_type == "MatMul" and site.use.via_transpose and table is not None and site.bits < 16
                and (table.bits, table.plan.block_size, table.plan.symmetric)
                == (site.bits, site.plan.block_size, site.plan.symmetric)
                and shares_tied_table(kernels.format_of(site.layer))):
            site.table_site = table


def name_of(item: ir.Value | ir.Node | None) -> str:
    """The name of a value or node the lowering reads or writes: the exporter names every one, and the
    names written are made from them."""
    if item is None or item.name is None:
        raise ValueError(f"the lowering expects a named value or node, found {item!r}")
    return item.name


def tensor_of(value: ir.Value | None) -> ir.TensorProtocol:
    """The tensor an initializer holds (a weight, bias or factor the lowering reads or wrote)."""
    if value is None or value.const_value is None:
        raise ValueError(f"the lowering expects an initializer with its tensor, found {value!r}")
    return value.const_value


def input_of(node: ir.Node, index: int) -> ir.Value:
    """`node`'s input `index`, which the lowering needs present (ONNX allows an omitted optional input)."""
    value = node.inputs[index]
    if value is None:
        raise ValueError(f"node {node.name}: input {index} is missing")
    return value


class Names:
    """Unique names, as the file's: a taken name gets _1, _2... (names stay taken once given)."""

    def __init__(self, graph: ir.Graph):
        self.taken = {node.name for node in graph if node.name is not None} | set(graph.initializers)
        self.taken |= {value.name for node in graph for value in node.outputs if value.name is not None}

    def unique(self, base: str) -> str:
        name, i = base, 1
        while name in self.taken:
            name, i = f"{base}_{i}", i + 1
        self.taken.add(name)
        return name


def make_node(op: str, inputs: Sequence[ir.Value | None], outputs: Sequence[str], name: str, domain: str = "",
              **attributes: AttrValue) -> ir.Node:
    """A node with its attributes in name order (onnx.helper's order: the same bytes as before)."""
    attrs = [ir.convenience.convert_attribute(key, value) for key, value in sorted(attributes.items())]
    return ir.Node(domain, op, list(inputs), attrs, outputs=[ir.Value(name=out) for out in outputs], name=name)


class Lowering:
    """The model being lowered, its sites, and the bookkeeping every pass shares."""

    def __init__(self, model: ir.Model, uses: Mapping[str, Sequence[WeightUse]], plan: Plan,
                 kernels: KernelChoice = KernelChoice(), quantizer: RoundToNearest | None = None,
                 smoothing: Mapping[str, np.ndarray] | None = None):
        self.model, self.graph, self.plan, self.kernels = model, model.graph, plan, kernels
        self.quantizer = quantizer or RoundToNearest()
        self.smoothing = dict(smoothing or {})
        self.names = Names(self.graph)
        nodes = {node.name: node for node in self.graph}
        self.sites: list[Site] = []
        self.layers: dict[str, list[Site]] = {}
        self.fp32_bytes: dict[str, int] = {}
        counted: set[str] = set()
        for order, (layer, layer_uses) in enumerate(uses.items()):
            lp = plan.layers.get(layer)
            if lp is None:
                continue
            sites = [Site(layer, i, order, layer if len(layer_uses) == 1 else f"{layer}.{i}", lp, use, nodes[use.node])
                     for i, use in enumerate(layer_uses)]
            self.layers[layer] = sites
            self.sites += sites
            # Every stored copy, once: a tied LM head's weight is its embedding's, counted there.
            stored = {use.initializer for use in layer_uses} - counted
            counted |= stored
            self.fp32_bytes[layer] = sum(4 * tensor_of(self.initializer(name)).size for name in stored)
        tied_table_sites(self.sites, kernels)
        self._seq = 0
        self.created: list[tuple[Key, ir.Value]] = []  # initializers the passes added
        self.constant_nodes: list[tuple[Key, ir.Node]] = []  # nodes that read initializers only
        self.owned: dict[str, list[str]] = {layer: [] for layer in self.layers}  # the layer's stored weight
        self.derived: dict[str, list[str]] = {layer: [] for layer in self.layers}  # computed from it, folded
        self.factors: list[tuple[Site, ir.Value, str]] = []  # float32 factors for FP16 storage, and their name
        self._shapes: dict[tuple[int, ...], ir.Value] = {}

    # --- finding things -----------------------------------------------------------------------

    def select(self, wanted: Callable[[Site], bool]) -> Iterator[Site]:
        return (site for site in self.sites if wanted(site))

    def initializer(self, name: str) -> ir.Value:
        return self.graph.initializers[name]

    def array(self, name: str) -> np.ndarray:
        tensor = tensor_of(self.initializer(name))
        if isinstance(tensor, ir.ExternalTensor):  # a large model's weight, memory-mapped: copied, then unmapped,
            values = np.array(tensor.numpy())  # so that one weight at a time is resident
            tensor.release()
            return values
        return tensor.numpy()

    def weight_seen_by_consumer(self, site: Site) -> np.ndarray:
        weight = self.array(site.use.initializer)
        return weight.T if site.use.via_transpose else weight

    def weight_kn(self, site: Site) -> np.ndarray:
        """A MatMul site's weight as [K, N] (a lowered Gemm's as its `GemmView` reads it)."""
        weight = self.weight_seen_by_consumer(site)
        if site.gemm is None:
            return weight
        weight_kn: np.ndarray = (weight.T if site.gemm.trans_b else weight) * np.float32(site.gemm.alpha)
        return weight_kn

    # --- writing ------------------------------------------------------------------------------

    def key(self, site: Site) -> Key:
        """The next place in `site`'s share of the file."""
        self._seq += 1
        return site.order, site.use_index, self._seq

    def add_initializer(self, site: Site, name: str, tensor: ir.TensorProtocol, owned: bool = True,
                        key: Key | None = None) -> ir.Value:
        """Register `tensor` under the unique version of `name`. `owned`: part of the layer's stored weight,
        which the graph check follows to its kernel (index tables and smoothing factors are not)."""
        name = self.names.unique(name)
        tensor.name = name
        value = ir.Value(name=name, const_value=tensor)
        self.graph.register_initializer(value)
        self.created.append((key or self.key(site), value))
        if owned:
            self.owned[site.layer].append(name)
        return value

    def key_of(self, value: ir.Value) -> Key:
        return next(key for key, created in self.created if created is value)

    def drop_initializer(self, value: ir.Value) -> None:
        """Remove an initializer a pass added and no node reads any more."""
        name = name_of(value)
        self.graph.initializers.pop(name)
        self.created = [(key, created) for key, created in self.created if created is not value]
        for names in self.owned.values():
            if name in names:
                names.remove(name)

    def add_constant_node(self, site: Site, node: ir.Node, derived: bool = False, key: Key | None = None,
                          first: bool = False) -> ir.Value:
        """Insert a node that reads initializers (and earlier such nodes) only: after the last of them, or
        `first`; `finish` puts them all at the front in file order. `derived`: its output is computed from
        the layer's weight (ORT must fold it away)."""
        previous = [n for _, n in self.constant_nodes if n.graph is self.graph]
        if first or not previous:
            self.graph.insert_before(self.graph[0], node)
        else:
            self.graph.insert_after(previous[-1], node)
        self.constant_nodes.append((key or self.key(site), node))
        if derived:
            self.derived[site.layer].append(name_of(node.outputs[0]))
        return node.outputs[0]

    def shape(self, site: Site, dims: tuple[int, ...]) -> ir.Value:
        """One int64 shape initializer per distinct shape (filed with the first site that needs it)."""
        if dims not in self._shapes:
            name = "cptq.shape_" + "x".join(map(str, dims))
            self._shapes[dims] = self.add_initializer(site, name, ir.tensor(np.array(dims, np.int64)), owned=False)
        return self._shapes[dims]

    def replace(self, old: ir.Node | Sequence[ir.Node], new_nodes: Sequence[ir.Node]) -> None:
        """Put `new_nodes` where `old` (a node, or a chain of them) was; the last new node's outputs take over
        the last old node's, names included."""
        chain = [old] if isinstance(old, ir.Node) else list(old)
        self.graph.insert_before(chain[0], list(new_nodes))
        for before, after in zip(chain[-1].outputs, new_nodes[-1].outputs):
            take_over(before, after)
        self.graph.remove(chain, safe=True)


def take_over(before: ir.Value, after: ir.Value) -> None:
    """`after` replaces `before` everywhere, graph outputs included, with its name, type and shape."""
    after.name, after.type, after.shape, after.doc_string = before.name, before.type, before.shape, before.doc_string
    after.metadata_props.update(before.metadata_props)
    before.replace_all_uses_with(after, replace_graph_outputs=True)
