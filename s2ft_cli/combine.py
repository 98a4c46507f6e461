"""Combining adapters trained separately into one (paper §5, adapter fusion).

Every delta is scaled by its adapter's weight (default 1) and the results are added:
rows/columns that only one adapter changes are taken over, those that several change are
summed. All adapters must belong to the same base model.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from .adapter import Adapter, Update, adapter_config, matrix_record, weights_differ
from .errors import AdapterMismatchError, S2FTError
from .models import ModelShape


@dataclass(frozen=True)
class Overlap:
    """How one matrix's units were shared among the adapters combined."""

    matrix: str
    units: int  # units (heads or channels) of the combined adapter
    overlapping: int  # of those, units that two or more adapters change


def _check_same_base(adapters: list[Adapter], force: bool) -> None:
    """Same architecture and shapes always; same weights unless ``force``: the statistics
    of the matrices both adapt (by the probes where both fingerprints hold them, else by
    mean |W|, which adapters from before the probes hold alone), else the base's name."""
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
        if force:
            continue
        for matrix in sorted(shared):
            try:
                problem = weights_differ(
                    matrix,
                    matrix_record(first, matrix),
                    matrix_record(theirs, matrix),
                    ("the first's base", "the second's"),
                )
            except (KeyError, TypeError, ValueError) as err:
                raise S2FTError(
                    f"{adapters[0].source} and {other.source} cannot be compared: a fingerprint "
                    f"lacks {err} of {matrix} (damaged, or written by another version of s2ft); "
                    "re-export the adapters, or pass --force if their bases are the same model."
                ) from None
            if problem:
                raise AdapterMismatchError(
                    f"{adapters[0].source} and {other.source} were trained on different weights: "
                    f"{problem}. Combine adapters of one base, or pass --force if the bases are "
                    "copies of each other."
                )


def _merged_fingerprint(adapters: list[Adapter]) -> dict:
    """The first adapter's fingerprint with every adapter's matrices and statistics: mean
    |W| of all, probes of those whose probes match the first probes found (method, seed,
    count); a matrix without probes is then checked by its mean |W|."""
    prints = [a.config["base_model"]["fingerprint"] for a in adapters]
    probes = next((p["probes"] for p in prints if p.get("probes")), None)
    same = ("method", "seed", "count")
    matrices, means, probed = {}, {}, {}
    for fp in prints:
        matrices |= fp["matrices"]
        means |= fp["checksum"]["values"]
        theirs = fp.get("probes")
        if probes is not None and theirs and all(theirs.get(k) == probes[k] for k in same):
            probed |= theirs["values"]
    merged = {
        **prints[0],
        "matrices": dict(sorted(matrices.items())),
        "checksum": {**prints[0]["checksum"], "values": dict(sorted(means.items()))},
    }
    if probes is not None:
        merged["probes"] = {**probes, "values": dict(sorted(probed.items()))}
    return merged


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
    combined_from = [
        {"adapter": a.source, "weight": w, "targets": a.config.get("targets")}
        for a, w in zip(adapters, weights, strict=True)
    ]
    config = adapter_config(
        first.get("name_or_path", ""),
        _merged_fingerprint(adapters),
        {"strategy": "combined", "combined_from": combined_from},
        torch.float32,
    )
    return Adapter(config, updates, "The combined adapter"), overlaps
