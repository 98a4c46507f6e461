"""Combining adapters trained separately into one (paper §5, adapter fusion).

Every delta is scaled by its adapter's weight (default 1) and the results are added:
rows/columns that only one adapter changes are taken over, those that several change are
summed. All adapters must belong to the same base model.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from .adapter import CHECKSUM_RTOL, Adapter, Update, adapter_config
from .errors import AdapterMismatchError, S2FTError
from .models import ModelShape


@dataclass(frozen=True)
class Overlap:
    """How one matrix's units were shared among the adapters combined."""

    matrix: str
    units: int  # units (heads or channels) of the combined adapter
    overlapping: int  # of those, units that two or more adapters change


def _check_same_base(adapters: list[Adapter], force: bool) -> None:
    """Same architecture and shapes always; same weights (checksums of the matrices both
    adapt, else the base's name) unless ``force``."""
    first = adapters[0].config["base_model"]["fingerprint"]
    first_name = adapters[0].config["base_model"].get("name_or_path")
    for other in adapters[1:]:
        theirs = other.config["base_model"]["fingerprint"]
        for key in ("model_type", "architectures", "shape"):
            if theirs.get(key) != first.get(key):
                raise AdapterMismatchError(
                    f"{other.source} and {adapters[0].source} belong to different base models "
                    f"({key} {theirs.get(key)} and {first.get(key)}); combine adapters of one "
                    "base."
                )
        shared = set(theirs["matrices"]) & set(first["matrices"])
        name = other.config["base_model"].get("name_or_path")
        if not shared and not force and name != first_name:
            raise AdapterMismatchError(
                f"{other.source} and {adapters[0].source} adapt no matrix in common, so their "
                f"bases' weights cannot be compared, and name different bases ({name!r} and "
                f"{first_name!r}); pass --force if they are the same model."
            )
        for matrix in shared:
            a, b = first["checksum"]["values"][matrix], theirs["checksum"]["values"][matrix]
            if not force and abs(a - b) > CHECKSUM_RTOL * abs(a):
                raise AdapterMismatchError(
                    f"{other.source} and {adapters[0].source} were trained on different weights "
                    f"(checksum of {matrix}: {b:.6g} and {a:.6g}). Combine adapters of one base, "
                    "or pass --force if the bases are copies of each other."
                )


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
    _check_same_base(adapters, force)
    adapters = [a.to("cpu") for a in adapters]  # combined on the CPU, wherever they were
    shape = ModelShape(**adapters[0].config["base_model"]["fingerprint"]["shape"])
    matrices: dict[str, list[int]] = {}
    checksums: dict[str, float] = {}
    for adapter in adapters:
        fingerprint = adapter.config["base_model"]["fingerprint"]
        matrices |= fingerprint["matrices"]
        checksums |= fingerprint["checksum"]["values"]
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
        width = shape.unit_width(name.rsplit(".", 1)[-1])
        units, counts = torch.cat([u.index // width for u, _ in parts]).unique(return_counts=True)
        # each unit's ids appear once per adapter that changes it: width times per adapter
        overlaps.append(Overlap(name, len(units), int((counts > width).sum())))
    first = adapters[0].config["base_model"]
    merged_fingerprint = {
        **first["fingerprint"],
        "matrices": dict(sorted(matrices.items())),
        "checksum": {**first["fingerprint"]["checksum"], "values": dict(sorted(checksums.items()))},
    }
    combined_from = [
        {"adapter": a.source, "weight": w, "targets": a.config.get("targets")}
        for a, w in zip(adapters, weights, strict=True)
    ]
    config = adapter_config(
        first.get("name_or_path", ""),
        merged_fingerprint,
        {"strategy": "combined", "combined_from": combined_from},
        torch.float32,
    )
    return Adapter(config, updates, "The combined adapter"), overlaps
