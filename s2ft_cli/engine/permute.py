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

from .selection import Selection
from .shapes import ModelShape, Part, matrix_of, stored_axis, structure_slots, unit_index
from .targets import STRUCTURES, TARGETS, Unit


def _grouped(matrix: str) -> bool:
    """Whether a matrix's units are key/value heads (groups of query heads)."""
    return TARGETS[matrix].unit is Unit.KV_HEAD


@dataclass
class StructureLayout:
    """The order of one structure's units after co-permutation.

    ``perm[i]`` is the original id of the unit now at position ``i`` (query heads for
    attention, channels for the FFN: of every expert in turn in a mixture-of-experts
    layer, each expert's staying in its range); ``blocks[matrix]`` holds, per part of the
    structure (``ModelShape.parts``: one, or one per expert), the contiguous
    ``[start, stop)`` of the matrix's trainable units in its own unit space (key/value
    heads for k/v).
    """

    perm: list[int]
    group_size: int
    blocks: dict[str, list[tuple[int, int]]]

    def unit_perm(self, matrix: str) -> list[int]:
        """The permutation in the matrix's own unit space."""
        if _grouped(matrix):
            return [h // self.group_size for h in self.perm[:: self.group_size]]
        return self.perm

    def original_units(self, matrix: str) -> list[int]:
        perm = self.unit_perm(matrix)
        return [perm[i] for start, stop in self.blocks[matrix] for i in range(start, stop)]


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


def _plan_part(
    units: dict[str, list[int]], n: int, group_size: int, seed: int = 0
) -> tuple[list[int], dict[str, tuple[int, int]], dict[str, list[int]]]:
    """Order one part of a structure (``n`` units, ids from 0) so every trainable matrix
    is contiguous, regrouping a query-head selection only when no order exists (see the
    module docstring): the order, each matrix's block in its own unit space, and the units
    realised."""
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
        plan = StructureLayout(order, group_size, {m: [b] for m, b in blocks.items()})
        return order, blocks, {m: sorted(plan.original_units(m)) for m in matrices}
    raise AssertionError(f"no contiguous layout for {units} (n={n}, group={group_size})")


def _plan_structure(
    units: dict[str, list[int]], parts: list[Part], seed: int = 0
) -> tuple[StructureLayout, dict[str, list[int]]]:
    """Order a structure part by part (a part's units stay in its range); a part without
    selected units keeps its order."""
    perm: list[int] = []
    blocks: dict[str, list[tuple[int, int]]] = {m: [] for m in units}
    realised: dict[str, list[int]] = {m: [] for m in units}
    group = parts[0].group
    for part in parts:
        end = part.start + part.count
        local = {
            m: [u - part.start for u in ids if part.start <= u < end] for m, ids in units.items()
        }
        offset = part.start
        if not any(local.values()):
            perm += range(part.start, end)
            for m in units:
                start = offset // group if _grouped(m) else offset
                blocks[m].append((start, start))
            continue
        order, part_blocks, part_units = _plan_part(local, part.count, part.group, seed)
        perm += [offset + u for u in order]
        for m in units:
            shift = offset // group if _grouped(m) else offset
            start, stop = part_blocks[m]
            blocks[m].append((shift + start, shift + stop))
            realised[m] += [shift + u for u in part_units[m]]
    return StructureLayout(perm, group, blocks), realised


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
            parts = shape.parts(structure)
            seed = selection.config.seed * 100_003 + layer
            layout[layer][structure], realised = _plan_structure(members, parts, seed)
            units[layer].update(realised)
            for m, ids in realised.items():
                if ids != members[m]:
                    adjustments.append(
                        f"layer {layer} {m}: query heads {members[m]} cannot form one contiguous "
                        f"block (beside {', '.join(k for k in members if k != m) or 'nothing'}) "
                        f"with every GQA group of {parts[0].group} heads kept whole; regrouped "
                        f"to {ids}"
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


@dataclass
class Reorder:
    """How co-permutation reorders one stored tensor: along ``axis`` (``rows``/``cols``
    of its :class:`~.shapes.Matrix`; ``flat`` for a bias or a follower, ``list`` for a
    module list), position ``i`` holds what was at ``index[i]``."""

    axis: str
    index: torch.Tensor


def _source(perm: list[int], first: int, count: int) -> list[int]:
    """A slot's local units in the order ``perm`` (a role's whole unit space) gives them."""
    local = [perm[first + i] - first for i in range(count)]
    assert sorted(local) == list(range(count)), "a unit left its part"
    return local


def _set(reorders: dict, name: str, axis: str, length: int, dest, src) -> None:
    index = reorders.setdefault(name, Reorder(axis, torch.arange(length))).index
    index[dest] = src


def reorders(model: nn.Module, layout: Layout, shape: ModelShape) -> dict[str, Reorder]:
    """Every stored tensor co-permutation reorders, by name: each slot's weight (adapters'
    names: a module path, an experts tensor's path) along the axis its units lie on, the
    producers' biases, and what follows the heads (``Family.followers``). Every role of a
    structure moves, trainable or not, so the model computes the same function."""
    family = shape.family
    out: dict[str, Reorder] = {}
    shapes: dict[str, tuple[int, ...]] = {}  # each weight's Matrix shape, read once
    for layer, structures in layout.items():
        for structure, plan in structures.items():
            for slot in structure_slots(shape, layer, structure):
                src = _source(plan.unit_perm(slot.role), slot.first, slot.count)
                dest, src = slot.ids(range(slot.count)), slot.ids(src)
                if slot.name not in shapes:
                    shapes[slot.name] = tuple(matrix_of(model, slot.name).shape)
                axis = stored_axis(slot.place, slot.axis)
                length = shapes[slot.name][0 if axis == "rows" else 1]
                shift = 0
                if slot.expert is not None:
                    shift = slot.expert * (length // shape.num_experts)
                _set(out, slot.name, axis, length, dest + shift, src + shift)
                bias = getattr(model.get_submodule(slot.path), slot.place.bias, None)
                if bias is not None and not TARGETS[slot.role].consumer:
                    shift = 0 if slot.expert is None else slot.expert * bias.shape[-1]
                    name = f"{slot.path}.{slot.place.bias}"
                    _set(out, name, "flat", bias.numel(), dest + shift, src + shift)
            if structure != "attention":
                continue
            for unit, paths in family.followers.items():
                role = "q_proj" if unit == Unit.QUERY_HEAD.value else "k_proj"
                perm = plan.unit_perm(role)
                for path in paths:
                    name = f"{family.layers}.{layer}.{path}"
                    try:
                        follower = model.get_submodule(name)
                        axis, length = "list", len(follower)
                    except AttributeError:
                        try:
                            length = model.get_parameter(name).numel()
                        except AttributeError:
                            continue  # absent from this model (e.g. qk norms off)
                        axis = "flat"
                    width, rest = divmod(length, len(perm))
                    assert not rest, f"{name} does not divide into {len(perm)} units"
                    dest = unit_index(range(len(perm)), width)
                    _set(out, name, axis, length, dest, unit_index(perm, width))
    return out


@torch.no_grad()
def apply_layout(
    model: nn.Module, layout: Layout, shape: ModelShape, inverse: bool = False
) -> None:
    """Co-permute every structure of ``layout`` in the model's weights (or undo it): each
    tensor of :func:`reorders`. Per-head norms shared by all heads (Qwen3's, Gemma 3's)
    act on each head alike and need no change."""
    for name, reorder in reorders(model, layout, shape).items():
        index = torch.argsort(reorder.index) if inverse else reorder.index
        if reorder.axis == "list":
            modules = model.get_submodule(name)
            items = list(modules)
            for i, j in enumerate(index.tolist()):
                modules[i] = items[j]
        elif reorder.axis == "flat":
            flat = model.get_parameter(name).view(-1)
            flat.copy_(flat[index.to(flat.device)])
        else:
            matrix = matrix_of(model, name)
            dim = 0 if reorder.axis == "rows" else 1
            matrix.copy_(dim, torch.arange(len(index)), matrix.select(dim, index))
