"""Combining adapters trained separately into one (paper §5, adapter fusion).

Every delta is scaled by its adapter's weight (default 1) and the results are added:
rows/columns that only one adapter changes are taken over, those that several change are
summed. All adapters must belong to the same base model.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import torch

from ..engine.shapes import ModelShape, units_of
from ..errors import S2FTError
from .fingerprint import Fingerprint
from .format import Adapter, Update, adapter_config


@dataclass(frozen=True)
class Overlap:
    """How one matrix's units were shared among the adapters combined."""

    matrix: str
    units: int  # units (heads or channels) of the combined adapter
    overlapping: int  # of those, units that two or more adapters change


def _fingerprints(adapters: list[Adapter]) -> list[Fingerprint]:
    """Each adapter's base fingerprint, read."""
    prints = []
    for a in adapters:
        try:
            prints.append(Fingerprint.from_dict(a.config["base_model"]["fingerprint"]))
        except (KeyError, TypeError, ValueError) as err:
            raise S2FTError(
                f"{a.source} cannot be compared with the others: its fingerprint lacks {err} "
                "(damaged, or written by another version of s2ft); re-export the adapter."
            ) from None
    return prints


def _check_same_base(adapters: list[Adapter], prints: list[Fingerprint], force: bool) -> None:
    """Every adapter's base is the first's (``Fingerprint.check_same_base``)."""
    first = adapters[0]
    for other, fingerprint in zip(adapters[1:], prints[1:], strict=True):
        sources = (first.source, other.source)
        names = tuple(a.config["base_model"].get("name_or_path") for a in (first, other))
        prints[0].check_same_base(fingerprint, sources, names, force)


def combine(
    adapters: list[Adapter], weights: list[float] | None = None, force: bool = False
) -> tuple[Adapter, list[Overlap]]:
    """One adapter equal to ``Σ weight_i · adapter_i``, and per matrix how many units
    overlapped."""
    if len(adapters) < 2:
        raise S2FTError("Combining needs at least two adapters.")
    weights = [1.0] * len(adapters) if weights is None else list(weights)
    if not all(math.isfinite(w) for w in weights):
        raise S2FTError(f"The weights {weights} must be finite numbers.")
    if len(weights) != len(adapters):
        raise S2FTError(
            f"{len(weights)} weights for {len(adapters)} adapters; give one weight per adapter "
            "(e.g. --weights 0.5,0.5)."
        )
    prints = _fingerprints(adapters)
    _check_same_base(adapters, prints, force)
    adapters = [a.to("cpu") for a in adapters]  # combined on the CPU, wherever they were
    shape = ModelShape(**adapters[0].config["base_model"]["fingerprint"]["shape"])
    updates: dict[str, Update] = {}
    overlaps: list[Overlap] = []
    for name in sorted({n for a in adapters for n in a.updates}):
        parts = [
            (a.updates[name], w)
            for a, w in zip(adapters, weights, strict=True)
            if name in a.updates
        ]
        axes = {u.axis for u, _ in parts}
        if len(axes) > 1:
            raise S2FTError(f"The adapters change {name} along different axes; they are damaged.")
        axis = axes.pop()
        index, inverse = torch.cat([u.index for u, _ in parts]).unique(return_inverse=True)
        dim = 0 if axis == "rows" else 1
        size = list(parts[0][0].delta.shape)
        size[dim] = len(index)
        delta = torch.zeros(size, dtype=torch.float32)
        at = 0
        for u, w in parts:
            where = inverse[at : at + len(u.index)]
            delta.index_add_(dim, where, w * u.delta.float())
            at += len(u.index)
        updates[name] = Update(axis, index, delta)
        changed_by = [set(units_of(shape, name, u.index)) for u, _ in parts]
        units = set().union(*changed_by)
        shared = sum(sum(unit in c for c in changed_by) > 1 for unit in units)
        overlaps.append(Overlap(name, len(units), shared))
    first = adapters[0].config["base_model"]
    combined_from = [
        {"adapter": a.source, "weight": w, "targets": a.config.get("targets")}
        for a, w in zip(adapters, weights, strict=True)
    ]
    config = adapter_config(
        first.get("name_or_path", ""),
        Fingerprint.merged(prints).to_dict(),
        {"strategy": "combined", "combined_from": combined_from},
        torch.float32,
    )
    return Adapter(config, updates, "The combined adapter"), overlaps


def combine_directories(
    paths: list[Path], out: Path, weights: list[float] | None = None, force: bool = False
) -> list[Overlap]:
    """``s2ft combine``: read the adapter directories, combine them, write the result to
    ``out``; per matrix how many units overlapped."""
    combined, overlaps = combine([Adapter.load(path) for path in paths], weights, force)
    combined.save(out)
    return overlaps
