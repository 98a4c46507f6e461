"""Co-permutation of coupled structures (paper §3.2).

The units of a structure — the query heads of an attention block (with their key/value
heads), the intermediate channels of an FFN — are reordered in the rows of the producers
(q/k/v, gate/up) and the columns of the consumer (o, down) together, so the network
computes the same function while every trainable matrix's selected units form one
contiguous block. With two trainable matrices A and B in a structure the order is
``only_A + both + only_B + rest``.

Grouped-query attention constrains the order: a key/value head serves a group of
consecutive query heads, so a group moves as a whole and its query heads may only be
reordered within it. A query-head selection that touches more partially selected groups
than one layout can join (at most one at each end of the block) is *regrouped*: the same
number of heads is kept, packed into the groups that held most of them (documented in
the README and reported in ``Selection.adjustments``).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from .models import CONSUMERS, ModelShape, get_linear, structure_of, unit_index
from .selection import Selection

# Matrices whose units are key/value heads (groups of query heads).
GROUP_MATRICES = ("k_proj", "v_proj")


@dataclass
class StructureLayout:
    """The order of one structure's units after co-permutation.

    ``perm[i]`` is the original id of the unit now at position ``i`` (query heads for
    attention, channels for the FFN); ``blocks[matrix]`` is the contiguous ``[start, stop)``
    of the matrix's trainable units in its own unit space (key/value heads for k/v).
    """

    perm: list[int]
    group_size: int
    blocks: dict[str, tuple[int, int]]

    def unit_perm(self, matrix: str) -> list[int]:
        """The permutation in the matrix's own unit space."""
        if matrix in GROUP_MATRICES:
            return [h // self.group_size for h in self.perm[:: self.group_size]]
        return self.perm

    def original_units(self, matrix: str) -> list[int]:
        start, stop = self.blocks[matrix]
        return self.unit_perm(matrix)[start:stop]


# layer -> structure ("attention" | "ffn") -> its layout
Layout = dict[int, dict[str, StructureLayout]]


def _heads(matrix: str, units: list[int], group_size: int) -> set[int]:
    """A matrix's selected units as query heads (or channels)."""
    if matrix in GROUP_MATRICES:
        return {g * group_size + j for g in units for j in range(group_size)}
    return set(units)


def _order(n: int, group_size: int, first: set[int], second: set[int]) -> list[int] | None:
    """A unit order in which ``first`` and ``second`` are contiguous, ``first`` leading,
    groups kept whole; ``None`` when the group constraint makes that impossible.

    Units are classed 1 (only first), 2 (both), 3 (only second) or rest. A group that mixes
    selected and rest units can only stand at either end of the selected run, with its rest
    units facing outwards; the other groups are ordered by their class range.
    """

    def cls(u: int) -> int | None:
        if u in first:
            return 2 if u in second else 1
        return 3 if u in second else None

    spans, mixed, idle = [], [], []
    for g in range(n // group_size):
        members = range(g * group_size, (g + 1) * group_size)
        classes = [c for c in map(cls, members) if c is not None]
        if not classes:
            idle.append(g)
        elif len(classes) < group_size:
            mixed.append(g)
        else:
            spans.append(g)
    if len(mixed) > 2:
        return None

    def span(g: int) -> tuple[int, int]:
        classes = [c for c in map(cls, range(g * group_size, (g + 1) * group_size)) if c]
        return min(classes), max(classes)

    middle = sorted(spans, key=lambda g: (*span(g), g))
    if len(mixed) == 2:
        ends = [(mixed[0], mixed[1]), (mixed[1], mixed[0])]
    elif mixed:
        ends = [(mixed[0], None), (None, mixed[0])]
    else:
        ends = [(None, None)]
    for left, right in ends:
        seq = ([left] if left is not None else []) + middle + ([right] if right is not None else [])
        if all(span(a)[1] <= span(b)[0] for a, b in zip(seq, seq[1:], strict=False)):
            break
    else:
        return None

    def within(g: int, rest_first: bool) -> list[int]:
        members = range(g * group_size, (g + 1) * group_size)
        rest_key = 0 if rest_first else 4
        return sorted(members, key=lambda u: (cls(u) or rest_key, u))

    order = []
    for g in seq:
        order += within(g, rest_first=(g == left))
    for g in idle:
        order += range(g * group_size, (g + 1) * group_size)
    return order


def _contiguous(order: list[int], units: set[int]) -> tuple[int, int] | None:
    pos = sorted(i for i, u in enumerate(order) if u in units)
    if pos and pos[-1] - pos[0] + 1 != len(pos):
        return None
    return (pos[0], pos[-1] + 1) if pos else (0, 0)


def _regroup(heads: set[int], n: int, group_size: int, avoid: int | None) -> set[int]:
    """Pack ``len(heads)`` query heads into as few GQA groups as possible.

    Groups holding most of the selected heads are filled first (ties: lower id); at most
    one group stays partial, and it is not ``avoid`` (the partial group of the other
    query-head matrix of the same structure, which could not share it).
    """
    count = {g: sum(h // group_size == g for h in heads) for g in range(n // group_size)}
    ranked = sorted(count, key=lambda g: (-count[g], g))
    full, rest = divmod(len(heads), group_size)
    chosen = ranked[:full]
    partial = None
    if rest:
        candidates = [g for g in ranked[full:] if g != avoid]
        if candidates:
            partial = candidates[0]
        else:  # only `avoid` is left: make it full and the weakest full group partial
            partial, chosen = chosen[-1], chosen[:-1] + [avoid]
    out = {g * group_size + j for g in chosen for j in range(group_size)}
    if partial is not None:
        members = range(partial * group_size, (partial + 1) * group_size)
        out |= set(sorted(members, key=lambda h: (h not in heads, h))[:rest])
    return out


def _partial_group(heads: set[int], group_size: int) -> int | None:
    groups = {h // group_size for h in heads}
    partial = [g for g in groups if sum(h // group_size == g for h in heads) < group_size]
    return partial[0] if len(partial) == 1 else None


def _plan_structure(
    units: dict[str, list[int]],
    n: int,
    group_size: int,
) -> tuple[StructureLayout, dict[str, list[int]]]:
    """Order one structure so every trainable matrix is contiguous, regrouping a
    query-head selection only when no order exists (see module docstring)."""
    matrices = list(units)
    heads = {m: _heads(m, ids, group_size) for m, ids in units.items()}
    regroupable = [m for m in matrices if m not in GROUP_MATRICES and group_size > 1]
    attempts: list[list[str]] = [[]] + [[m] for m in regroupable]
    if len(regroupable) == 2:
        attempts.append(regroupable)
    for regroup in attempts:
        trial = dict(heads)
        avoid = None
        for m in regroup:
            trial[m] = _regroup(heads[m], n, group_size, avoid)
            avoid = _partial_group(trial[m], group_size)
        sets = [trial[m] for m in matrices] + [set()] * (2 - len(matrices))
        order = _order(n, group_size, sets[0], sets[1]) or _order(n, group_size, sets[1], sets[0])
        blocks = {m: _contiguous(order, trial[m]) for m in matrices} if order else {}
        if not blocks or None in blocks.values():  # no order, or (never expected) a gap
            continue
        for m in GROUP_MATRICES:
            if m in blocks:
                blocks[m] = (blocks[m][0] // group_size, blocks[m][1] // group_size)
        layout = StructureLayout(perm=order, group_size=group_size, blocks=blocks)
        return layout, {m: sorted(layout.original_units(m)) for m in matrices}
    raise AssertionError(f"no contiguous layout for {units} (n={n}, group={group_size})")


def plan_layout(selection: Selection) -> tuple[Layout, Selection]:
    """The co-permutation of every layer, and the selection it realises (regrouped where
    a GQA layout required it, with one line per change in ``adjustments``)."""
    shape = selection.shape
    layout: Layout = {}
    units: dict[int, dict[str, list[int]]] = {}
    adjustments = list(selection.adjustments)
    for layer, per_matrix in sorted(selection.units.items()):
        layout[layer], units[layer] = {}, {}
        for structure in ("attention", "ffn"):
            members = {m: ids for m, ids in per_matrix.items() if structure_of(m) == structure}
            if not members:
                continue
            n = shape.num_heads if structure == "attention" else shape.intermediate_size
            group = shape.group_size if structure == "attention" else 1
            layout[layer][structure], realised = _plan_structure(members, n, group)
            units[layer].update(realised)
            for m, ids in realised.items():
                if ids != members[m]:
                    adjustments.append(
                        f"layer {layer} {m}: query heads {members[m]} touch more partially "
                        f"selected GQA groups (of {group} heads) than one contiguous block can "
                        f"join; regrouped to {ids}"
                    )
    adjusted = Selection(shape=shape, config=selection.config, units=units, adjustments=adjustments)
    return layout, adjusted


# ---------------------------------------------------------------------------------------
# Applying a layout to the weights


def _permute_units(linear: nn.Module, perm: list[int], width: int, consumer: bool) -> None:
    """Reorder a linear layer's units (``width`` rows or columns each) in place."""
    index = unit_index(perm, width, device=linear.weight.device)
    with torch.no_grad():
        w = linear.weight
        w.copy_(w[:, index] if consumer else w[index])
        if not consumer and linear.bias is not None:
            linear.bias.copy_(linear.bias[index])


def _inverse(perm: list[int]) -> list[int]:
    inv = [0] * len(perm)
    for i, p in enumerate(perm):
        inv[p] = i
    return inv


def apply_layout(
    model: nn.Module, layout: Layout, shape: ModelShape, inverse: bool = False
) -> None:
    """Co-permute every structure of ``layout`` in the model's weights (or undo it).

    Every producer and the consumer of a structure move together, trainable or not, so
    the model computes the same function. Per-head norms (Qwen3's q/k norms) act on each
    head alike and need no change.
    """
    for layer, structures in layout.items():
        for structure, plan in structures.items():
            if structure == "attention":
                members = {
                    "q_proj": plan.perm,
                    "o_proj": plan.perm,
                    "k_proj": plan.unit_perm("k_proj"),
                    "v_proj": plan.unit_perm("v_proj"),
                }
            else:
                members = {m: plan.perm for m in ("gate_proj", "up_proj", "down_proj")}
            for matrix, perm in members.items():
                _permute_units(
                    get_linear(model, layer, matrix),
                    _inverse(perm) if inverse else perm,
                    shape.unit_width(matrix),
                    matrix in CONSUMERS,
                )
