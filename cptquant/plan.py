"""The quantization plan: per layer bits, block size and symmetry, as a versioned JSON file.

A plan is deterministic: the same inputs give a byte-identical file (sorted keys, no timestamps).
Timings and measurements belong in the report, not here.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from .errors import CptqError
from .layer_graph import ROLE_EMBEDDING, LayerGraph
from .options import CLIP_METHODS, DEFAULT_BLOCK_SIZE, SUPPORTED_BITS, check_block_size, fitting_block_size

PLAN_VERSION = 1
HOT_ROW_BITS = 8


@dataclass
class LayerPlan:
    bits: int
    block_size: int = DEFAULT_BLOCK_SIZE
    symmetric: bool = True
    score: float | None = None  # sensitivity score from a pass, when the plan came from one
    # Embedding tables at 4 bits: these rows (token ids) are stored at 8 bits instead, in a second table.
    # Ignored at other widths. See passes/hot_rows.py.
    hot_rows: list[int] | None = None


@dataclass
class Plan:
    layers: dict[str, LayerPlan]
    method: str = "uniform"
    model: str = ""
    clip: str = "absmax"
    meta: dict[str, Any] = field(default_factory=dict)  # scores, budget, seed... never timings
    version: int = PLAN_VERSION
    # Layers whose plan-file entry gave no block_size: fitted to the layer once the model is known
    # (fit_unsized_blocks), as every plan cptquant makes is. Never written: to_json gives every layer its size.
    unsized: set[str] = field(default_factory=set, compare=False)

    def bits_of(self, name: str) -> int:
        return self.layers[name].bits

    def quantized(self) -> dict[str, LayerPlan]:
        return {name: lp for name, lp in self.layers.items() if lp.bits < 16}

    def to_json(self) -> str:
        data = {
            "version": self.version,
            "model": self.model,
            "method": self.method,
            "clip": self.clip,
            "meta": self.meta,
            "layers": {name: _layer_json(lp) for name, lp in sorted(self.layers.items())},
        }
        return json.dumps(data, indent=2, sort_keys=True) + "\n"

    def save(self, path: str | Path) -> None:
        Path(path).write_text(self.to_json())

    @classmethod
    def from_json(cls, text: str, source: str = "plan") -> Plan:
        def refuse_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:  # json keeps the last of two equal keys without a word
            seen: set[str] = set()
            for key, _ in pairs:
                if key in seen:
                    raise CptqError(f"{source} names {key!r} twice; which entry is meant is ambiguous")
                seen.add(key)
            return dict(pairs)

        try:
            data = json.loads(text, object_pairs_hook=refuse_duplicates)
        except json.JSONDecodeError as exc:
            raise CptqError(f"{source} is not valid JSON: {exc}") from None
        if not isinstance(data, dict) or not isinstance(data.get("layers"), dict):
            raise CptqError(f"{source} is not a cptquant plan (no 'layers' object)")
        for key, kind in (("method", str), ("model", str), ("clip", str), ("meta", dict)):
            if key in data and not isinstance(data[key], kind):
                raise CptqError(f"{source}: {key!r} must be a {'string' if kind is str else 'JSON object'}")
        if data.get("clip", "absmax") not in CLIP_METHODS:
            raise CptqError(f"{source}: clip {data['clip']!r} is not one of {', '.join(CLIP_METHODS)}")
        if data.get("version") != PLAN_VERSION:
            raise CptqError(f"{source} has plan version {data.get('version')!r}; this cptquant reads version {PLAN_VERSION}")
        layers = {}
        for name, entry in data["layers"].items():
            if not isinstance(entry, dict) or "bits" not in entry:
                raise CptqError(f"{source}: layer {name!r} has no 'bits'")
            unknown = set(entry) - {"bits", "block_size", "symmetric", "score", "hot_rows"}
            if unknown:
                raise CptqError(f"{source}: layer {name!r} has unknown fields {sorted(unknown)}")
            if not isinstance(entry.get("symmetric", True), bool):
                raise CptqError(f"{source}: layer {name!r} symmetric must be true or false, not {entry['symmetric']!r}")
            score = entry.get("score")
            if score is not None and (isinstance(score, bool) or not isinstance(score, (int, float))):
                raise CptqError(f"{source}: layer {name!r} score must be a number or null, not {score!r}")
            if "hot_rows" in entry:
                entry = {**entry, "hot_rows": parse_rows(entry["hot_rows"], f"{source}: layer {name!r} hot_rows")}
            layers[name] = LayerPlan(**entry)
        return cls(
            layers=layers,
            method=data.get("method", "uniform"),
            model=data.get("model", ""),
            clip=data.get("clip", "absmax"),
            meta=data.get("meta", {}),
            unsized={name for name, entry in data["layers"].items() if "block_size" not in entry},
        )

    @classmethod
    def load(cls, path: str | Path) -> Plan:
        path = Path(path)
        if path.is_dir():
            raise CptqError(f"plan file {path} is a folder, not a JSON file")
        if not path.is_file():
            raise CptqError(f"plan file not found: {path}")
        try:
            text = path.read_text(encoding="utf-8")
        except UnicodeDecodeError:
            raise CptqError(f"{path} is not a cptquant plan (not UTF-8 text)") from None
        except OSError as exc:
            raise CptqError(f"cannot read the plan file {path}: {exc.strerror or exc}") from None
        return cls.from_json(text, source=str(path))


def _layer_json(lp: LayerPlan) -> dict[str, Any]:
    entry = asdict(lp)
    if lp.hot_rows is None:
        del entry["hot_rows"]  # plans without hot rows stay as they were
    else:
        entry["hot_rows"] = format_rows(lp.hot_rows)
    return entry


def format_rows(rows: list[int]) -> str:
    """Sorted row numbers as ranges, "0-3,17,101-102": a vocabulary's worth stays one readable line."""
    parts, rows = [], sorted(set(rows))
    i = 0
    while i < len(rows):
        j = i
        while j + 1 < len(rows) and rows[j + 1] == rows[j] + 1:
            j += 1
        parts.append(str(rows[i]) if i == j else f"{rows[i]}-{rows[j]}")
        i = j + 1
    return ",".join(parts)


def parse_rows(value: object, what: str) -> list[int]:
    """`format_rows` back to a sorted list; a JSON list of ints is accepted too."""
    try:
        if isinstance(value, list):
            rows = [int(v) for v in value]
        elif isinstance(value, str):
            rows = []
            for part in filter(None, value.split(",")):
                first, _, last = part.partition("-")
                rows.extend(range(int(first), int(last or first) + 1))
        else:
            raise ValueError
    except (TypeError, ValueError):
        raise CptqError(f"{what} must be ranges like \"0-3,17\" or a list of row numbers") from None
    if any(r < 0 for r in rows):
        raise CptqError(f"{what} has a negative row number")
    return sorted(set(rows))


def uniform_plan(graph: LayerGraph, bits: int, block_size: int = DEFAULT_BLOCK_SIZE, symmetric: bool = True,
                 model: str = "") -> Plan:
    layers = {layer.name: LayerPlan(bits=bits, block_size=fitting_block_size(layer.in_features, block_size),
                                    symmetric=symmetric) for layer in graph.layers}
    return Plan(layers=layers, method=f"uniform-{bits}", model=model)


def fit_unsized_blocks(plan: Plan, graph: LayerGraph, block_size: int = DEFAULT_BLOCK_SIZE) -> Plan:
    """A plan file's layers that name no block size take `block_size` (--block-size) fitted to their input size,
    as in the plans cptquant makes; a size the file does name is the layer's own (validate_plan refuses it where
    it does not divide)."""
    for name in plan.unsized:
        if name in plan.layers and name in graph:
            plan.layers[name].block_size = fitting_block_size(graph[name].in_features, block_size)
    plan.unsized = set()
    return plan


def fill_missing_layers(plan: Plan, graph: LayerGraph, bits: int, block_size: int = DEFAULT_BLOCK_SIZE,
                        zero_points: str = "auto") -> Plan:
    """`--default-bits`: the layers a plan file leaves out get `bits`, written into the plan explicitly."""
    missing = [layer.name for layer in graph.layers if layer.name not in plan.layers]
    for name in missing:
        plan.layers[name] = LayerPlan(bits=bits, block_size=fitting_block_size(graph[name].in_features, block_size),
                                      symmetric=zero_points == "never" or (zero_points == "auto" and bits != 4))
    if missing:
        plan.meta = {**plan.meta, "default_bits": bits}
    return plan


def apply_zero_points(plan: Plan, mode: str) -> Plan:
    """Choose symmetric (no zero point) or asymmetric per layer.

    auto: zero points at 4 bits only. On MiniLM, asymmetric 4-bit raises the pooled-embedding cosine
    of an all-4-bit model from 0.956 to 0.973 for 0.016 byte per weight; at 8 bits symmetric is as good.
    """
    for lp in plan.layers.values():
        lp.symmetric = symmetric_for(lp.bits, mode)
    return plan


def symmetric_for(bits: int, zero_points: str) -> bool:
    """Whether `--zero-points` mode leaves a layer at `bits` without zero points."""
    return zero_points == "never" or (zero_points == "auto" and bits != 4)


def _some(names: list[str], keep: int = 5) -> str:
    return ", ".join(names[:keep]) + (f" (+{len(names) - keep} more)" if len(names) > keep else "")


def validate_plan(plan: Plan, graph: LayerGraph) -> None:
    """Every layer of the model must be in the plan, and every plan layer in the model, with supported
    bits and a block size that fits it. A layer left out would silently stay FP32."""
    unknown = [name for name in plan.layers if name not in graph]
    if unknown:
        raise CptqError(f"plan names {len(unknown)} layer(s) not in the model: {_some(unknown)}")
    for name, lp in plan.layers.items():
        if not isinstance(lp.bits, int) or isinstance(lp.bits, bool) or lp.bits not in SUPPORTED_BITS:
            raise CptqError(f"layer {name}: bits {lp.bits!r} not supported (use one of 16, 8, 4)")
    missing = [layer.name for layer in graph.layers if layer.name not in plan.layers]
    if missing:
        what = f"all {len(missing)}" if len(missing) == len(graph.layers) else f"{len(missing)} of the {len(graph.layers)}"
        raise CptqError(f"the plan leaves out {what} layers of the model: {_some(missing)} (give each its bits, "
                        "or --default-bits N to fill them)")
    for name, lp in plan.layers.items():
        if lp.bits == 16:
            continue
        if not isinstance(lp.block_size, int) or isinstance(lp.block_size, bool):
            raise CptqError(f"layer {name}: block size {lp.block_size!r} is not a whole number")
        try:
            check_block_size(lp.block_size)
        except CptqError as exc:
            raise CptqError(f"layer {name}: {exc}") from None
        if lp.hot_rows and lp.bits == 4:
            if graph[name].role != ROLE_EMBEDDING:
                raise CptqError(f"layer {name}: hot_rows apply to embedding tables only")
            rows = graph[name].out_features
            if max(lp.hot_rows) >= rows:
                raise CptqError(f"layer {name}: hot row {max(lp.hot_rows)} is outside the table's {rows} rows")
        in_features = graph[name].in_features
        if in_features % lp.block_size:
            raise CptqError(
                f"layer {name}: block size {lp.block_size} does not divide its input size {in_features}"
            )
