"""Co-permutation of coupled structures (paper §3.2).

The units of a structure — the query heads of an attention block (with their key/value
heads), the intermediate channels of an FFN — are reordered in the rows of the producers
(q/k/v, gate/up) and the columns of the consumer (o, down) together, so the network
computes the same function while every trainable matrix's selected units form one
contiguous block. With two trainable matrices A and B in a structure the order is
``only_A + both + only_B + rest``.

Grouped-query attention constrains the order: a key/value head serves a group of
consecutive query heads, so a group moves as a whole and its query heads may only be
reordered within it. An exact search finds an order whenever one exists. Only when none
does (e.g. o_proj heads spread over three partially selected groups) is a query-head
selection *regrouped*: the same number of heads is kept, packed into the groups that held
most of them (documented in docs/METHOD.md and reported in ``Selection.adjustments``).
"""

from __future__ import annotations

import random
from dataclasses import dataclass

import torch
from torch import nn

from .models import ModelShape, get_linear, unit_index
from .selection import Selection
from .targets import STRUCTURES, TARGETS, Unit, structure_matrices


def _grouped(matrix: str) -> bool:
    """Whether a matrix's units are key/value heads (groups of query heads)."""
    return TARGETS[matrix].unit is Unit.KV_HEAD


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
        if _grouped(matrix):
            return [h // self.group_size for h in self.perm[:: self.group_size]]
        return self.perm

    def original_units(self, matrix: str) -> list[int]:
        start, stop = self.blocks[matrix]
        return self.unit_perm(matrix)[start:stop]


# layer -> structure ("attention" | "ffn") -> its layout
Layout = dict[int, dict[str, StructureLayout]]


def _heads(matrix: str, units: list[int], group_size: int) -> set[int]:
    """A matrix's selected units as query heads (or channels)."""
    if _grouped(matrix):
        return {g * group_size + j for g in units for j in range(group_size)}
    return set(units)


# Unit classes with respect to two selected sets.
REST, FIRST, BOTH, SECOND = 0, 1, 2, 3
# Every shape an order can take in which both sets are contiguous, as runs of one class
# each (a run may be empty; mirror images are the same orders reversed).
PATTERNS = (
    (REST, FIRST, BOTH, SECOND, REST),  # the sets overlap
    (REST, SECOND, BOTH, SECOND, REST),  # the first lies inside the second
    (REST, FIRST, BOTH, FIRST, REST),  # the second lies inside the first
    (REST, FIRST, REST, SECOND, REST),  # the sets are disjoint
)
# Above this many groups that mix classes the exact search is skipped (regrouping leaves
# at most four such groups).
MAX_MIXED_GROUPS = 16


def _spans(pattern: tuple, start: int, classes: frozenset) -> list[tuple[int, int]]:
    """The shortest run ranges ``[s, e]``, ``s >= start``, holding every class of a group."""
    spans = []
    for s in range(start, len(pattern)):
        if pattern[s] in classes:
            seen = set()
            for e in range(s, len(pattern)):
                seen.add(pattern[e])
                if classes <= seen:
                    spans.append((s, e))
                    break
    return spans


def _search(pattern: tuple, mixed: list[frozenset], singles: frozenset) -> list | None:
    """Place the groups that mix classes, in some order, each on consecutive runs of
    ``pattern``; between them the runs passed stay open for the single-class groups, which
    need an open run of their class. Depth-first, failures memoised; ``None`` if impossible.
    Returns ``[(mixed group index, first run, last run), ...]`` in placement order."""
    full = (1 << len(mixed)) - 1
    failed = set()

    def dfs(placed: int, run: int, opened: frozenset) -> list | None:
        if placed == full:
            return [] if singles <= opened | set(pattern[run:]) else None
        if (placed, run, opened) in failed:
            return None
        for i, classes in enumerate(mixed):
            if placed >> i & 1:
                continue
            for s, e in _spans(pattern, run, classes):
                rest = dfs(placed | 1 << i, e, opened | set(pattern[run : s + 1]))
                if rest is not None:
                    return [(i, s, e), *rest]
        failed.add((placed, run, opened))
        return None

    return dfs(0, 0, frozenset())


def _order(n: int, group_size: int, first: set[int], second: set[int]) -> list[int] | None:
    """A unit order in which ``first`` and ``second`` are each contiguous and every GQA
    group stays whole, or ``None`` when no such order exists (exact, see ``_search``).

    Rest units go last where they can, so a single set gives ``selected + rest`` and two
    sets ``only_first + both + only_second + rest``.
    """

    def cls(u: int) -> int:
        return (BOTH if u in second else FIRST) if u in first else (SECOND if u in second else REST)

    groups = [range(g * group_size, (g + 1) * group_size) for g in range(n // group_size)]
    group_classes = [frozenset(map(cls, members)) for members in groups]
    mixed = [g for g, c in enumerate(group_classes) if len(c) > 1]
    if len(mixed) > MAX_MIXED_GROUPS:
        return None
    singles = frozenset(c for cs in group_classes if len(cs) == 1 for c in cs)
    for pattern in PATTERNS:
        plan = _search(pattern, [group_classes[g] for g in mixed], singles)
        if plan is None:
            continue
        # the timeline: open runs between the placed groups, and the placed groups
        timeline, run = [], 0
        for i, s, e in plan:
            timeline += [("open", k) for k in range(run, s + 1)]
            timeline.append(("mixed", mixed[i], s, e))
            run = e
        timeline += [("open", k) for k in range(run, len(pattern))]
        slots = {}
        for c in singles:  # rest in the last open run of its class, the others in the first
            fits = [
                t for t, item in enumerate(timeline) if item[0] == "open" and pattern[item[1]] == c
            ]
            slots[c] = fits[-1] if c == REST else fits[0]
        order: list[int] = []
        for t, item in enumerate(timeline):
            if item[0] == "open":
                order += [
                    u
                    for g, cs in enumerate(group_classes)
                    if len(cs) == 1 and slots[next(iter(cs))] == t
                    for u in groups[g]
                ]
            else:
                _, g, s, e = item
                run_of = {}
                for k in range(s, e + 1):
                    run_of.setdefault(pattern[k], k)
                order += sorted(groups[g], key=lambda u: (run_of[cls(u)], u))
        if _contiguous(order, first) and _contiguous(order, second):
            return order
    return None


def _contiguous(order: list[int], units: set[int]) -> tuple[int, int] | None:
    """``[start, stop)`` of ``units`` in ``order`` if they are contiguous, else ``None``."""
    pos = [i for i, u in enumerate(order) if u in units]
    if pos and pos[-1] - pos[0] + 1 != len(pos):
        return None
    return (pos[0], pos[-1] + 1) if pos else (0, 0)


def _regroup(
    heads: set[int], n: int, group_size: int, avoid: int | None, tiebreak: list[int]
) -> set[int]:
    """Pack ``len(heads)`` query heads into as few GQA groups as possible.

    Groups holding most of the selected heads are filled first, ties broken by
    ``tiebreak`` (a seeded random order of the units, so no group or head is favoured);
    at most one group stays partial, and it is not ``avoid`` (the partial group of the
    other query-head matrix of the same structure, which could not share it).
    """
    count = {g: sum(h // group_size == g for h in heads) for g in range(n // group_size)}
    ranked = sorted(count, key=lambda g: (-count[g], tiebreak[g * group_size]))
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
        out |= set(sorted(members, key=lambda h: (h not in heads, tiebreak[h]))[:rest])
    return out


def _partial_group(heads: set[int], group_size: int) -> int | None:
    groups = {h // group_size for h in heads}
    partial = [g for g in groups if sum(h // group_size == g for h in heads) < group_size]
    return partial[0] if len(partial) == 1 else None


def _plan_structure(
    units: dict[str, list[int]], n: int, group_size: int, seed: int = 0
) -> tuple[StructureLayout, dict[str, list[int]]]:
    """Order one structure so every trainable matrix is contiguous, regrouping a
    query-head selection only when no order exists (see module docstring)."""
    tiebreak = random.Random(seed).sample(range(n), n)
    matrices = list(units)
    heads = {m: _heads(m, ids, group_size) for m, ids in units.items()}
    regroupable = [m for m in matrices if not _grouped(m) and group_size > 1]
    attempts: list[list[str]] = [[]] + [[m] for m in regroupable]
    if len(regroupable) == 2:
        attempts.append(regroupable)
    for regroup in attempts:
        trial = dict(heads)
        avoid = None
        for m in regroup:
            trial[m] = _regroup(heads[m], n, group_size, avoid, tiebreak)
            avoid = _partial_group(trial[m], group_size)
        sets = [trial[m] for m in matrices] + [set()] * (2 - len(matrices))
        order = _order(n, group_size, sets[0], sets[1])
        if order is None:
            continue
        blocks = {m: _contiguous(order, trial[m]) for m in matrices}
        for m in matrices:
            if _grouped(m):
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
        for structure in STRUCTURES:
            members = {m: ids for m, ids in per_matrix.items() if TARGETS[m].structure == structure}
            if not members:
                continue
            n, group = shape.layout_units(structure)
            seed = selection.config.seed * 100_003 + layer
            layout[layer][structure], realised = _plan_structure(members, n, group, seed)
            units[layer].update(realised)
            for m, ids in realised.items():
                if ids != members[m]:
                    adjustments.append(
                        f"layer {layer} {m}: query heads {members[m]} cannot form one contiguous "
                        f"block (beside {', '.join(k for k in members if k != m) or 'nothing'}) "
                        f"with every GQA group of {group} heads kept whole; regrouped to {ids}"
                    )
    adjusted = Selection(
        shape=shape,
        config=selection.config,
        units=units,
        adjustments=adjustments,
        scores=selection.scores,
        scored=selection.scored,
    )
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
            for matrix in structure_matrices(structure):
                perm = plan.unit_perm(matrix)
                _permute_units(
                    get_linear(model, layer, matrix),
                    _inverse(perm) if inverse else perm,
                    shape.unit_width(matrix),
                    TARGETS[matrix].consumer,
                )
