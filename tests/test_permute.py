"""Co-permutation layouts: contiguous blocks, whole GQA groups, exact inverse (paper §3.2)."""

from __future__ import annotations

import copy
import itertools
import random

import pytest
import torch

from s2ft_cli import S2FTConfig
from s2ft_cli.engine.models import load_model
from s2ft_cli.engine.permute import (
    StructureLayout,
    _contiguous,
    _order,
    _plan_part,
    _plan_structure,
    apply_layout,
    plan_layout,
)
from s2ft_cli.engine.selection import select_units
from s2ft_cli.engine.shapes import Part

from .conftest import tiny_model

# matrices whose units are key/value heads (stated here, not read from targets.TARGETS)
GROUP_MATRICES = ("k_proj", "v_proj")

ATTENTION_PAIRS = [
    ("o_proj",),
    ("q_proj",),
    ("v_proj",),
    ("v_proj", "o_proj"),
    ("q_proj", "o_proj"),
    ("k_proj", "q_proj"),
    ("k_proj", "v_proj"),
]


def plan(units, n, group):
    """One part's layout as a structure's (blocks: one per part)."""
    order, blocks, realised = _plan_part(units, n, group)
    return StructureLayout(order, group, {m: [b] for m, b in blocks.items()}), realised


def check_layout(layout, realised, requested, n, group):
    assert sorted(layout.perm) == list(range(n))
    for j in range(n // group):  # GQA groups move whole
        assert len({h // group for h in layout.perm[j * group : (j + 1) * group]}) == 1
    for m, ids in realised.items():
        ((start, stop),) = layout.blocks[m]
        assert sorted(layout.unit_perm(m)[start:stop]) == ids  # the block is the selection
        assert len(ids) == len(requested[m])  # regrouping keeps the count


@pytest.mark.parametrize("n_kv,group", [(1, 8), (2, 4), (4, 2), (8, 1), (3, 4), (8, 4)])
def test_random_attention_selections_always_lay_out(n_kv, group):
    rng = random.Random(n_kv * 100 + group)
    n = n_kv * group
    for _ in range(150):
        pair = rng.choice(ATTENTION_PAIRS)
        units = {}
        for m in pair:
            space = n_kv if m in GROUP_MATRICES else n
            units[m] = sorted(rng.sample(range(space), rng.randint(1, space)))
        layout, realised = plan(units, n, group)
        check_layout(layout, realised, units, n, group)
        if group == 1 or n_kv == 1:  # MHA and MQA never need regrouping
            assert realised == units


def _exists_by_brute_force(n, group, first, second):
    """Try every order of the groups and of the units inside each group."""
    groups = [list(range(g * group, (g + 1) * group)) for g in range(n // group)]
    inner = [list(itertools.permutations(m)) for m in groups]
    for group_order in itertools.permutations(range(len(groups))):
        for choice in itertools.product(*[inner[g] for g in group_order]):
            order = [u for part in choice for u in part]
            if all(_contiguous(order, s) is not None for s in (first, second)):
                return True
    return False


@pytest.mark.parametrize("n_kv,group", [(2, 3), (3, 2), (4, 2), (2, 4)])
def test_regrouping_happens_exactly_when_no_order_exists(n_kv, group):
    rng = random.Random(7 * n_kv + group)
    n = n_kv * group
    for _ in range(120):
        first = set(rng.sample(range(n), rng.randint(1, n)))
        second = set(rng.sample(range(n), rng.randint(0, n)))
        found = _order(n, group, first, second)
        assert (found is not None) == _exists_by_brute_force(n, group, first, second)
        if found is not None:
            assert _contiguous(found, first) is not None
            assert _contiguous(found, second) is not None


@pytest.mark.parametrize(
    "units,n,group",
    [
        ({"q_proj": [1, 2], "o_proj": [5, 6]}, 8, 2),  # disjoint blocks with a gap
        ({"v_proj": [0], "o_proj": [2, 4]}, 8, 2),  # o heads beside v's group
        ({"v_proj": [0, 1], "o_proj": [0, 3]}, 4, 2),  # o inside v
    ],
)
def test_selections_that_fit_are_never_regrouped(units, n, group):
    layout, realised = plan(units, n, group)
    assert realised == units
    check_layout(layout, realised, units, n, group)


def test_two_partial_groups_are_joined_without_regrouping():
    # o_proj heads 3 and 4 sit in groups 0 and 1 (group size 4): one block 3..4 exists
    layout, realised = plan({"o_proj": [3, 4]}, 16, 4)
    assert realised == {"o_proj": [3, 4]}


def test_three_partial_groups_are_regrouped_and_reported():
    model = load_model("preset:tiny-llama")  # 8 query heads in 4 GQA groups of 2
    selection = select_units(model, S2FTConfig(targets={"o_proj": 0.3}))
    selection.units = {0: {"o_proj": [1, 3, 5]}, 1: {"o_proj": [1, 2]}}
    _, adjusted = plan_layout(selection)
    # layer 1: heads 1 and 2 sit at the ends of groups 0 and 1: one block, kept as is.
    assert adjusted.units[1] == {"o_proj": [1, 2]}
    # layer 0: heads 1, 3, 5 touch three partial groups: packed into one full group and one
    # more head, keeping two of the three heads (the most any packing can keep)
    ids = adjusted.units[0]["o_proj"]
    assert len(ids) == 3 and len({h // 2 for h in ids}) == 2 and len(set(ids) & {1, 3, 5}) == 2
    assert len(adjusted.adjustments) == 1
    assert adjusted.adjustments[0].startswith("layer 0 o_proj: query heads [1, 3, 5]")
    assert f"regrouped to {ids}" in adjusted.adjustments[0]
    # deterministic for a seed
    assert plan_layout(selection)[1].units == adjusted.units


def test_ffn_pairs_are_only_a_both_only_b_rest():
    units = {"up_proj": [1, 4, 6, 9], "down_proj": [4, 9, 12]}
    layout, realised = plan(units, 16, 1)
    assert realised == units
    assert layout.perm[:5] == [1, 6, 4, 9, 12]  # only up, both, only down
    assert layout.blocks == {"up_proj": [(0, 4)], "down_proj": [(2, 5)]}


def test_experts_are_laid_out_each_in_its_own_range():
    """A mixture-of-experts FFN is co-permuted expert by expert: no channel leaves its
    expert, each expert's selected channels are contiguous (a block per expert, empty
    where none is selected) and the pair order holds inside each."""
    parts = [Part(0, 8), Part(8, 8), Part(16, 8), Part(24, 4)]  # 3 experts, a shared one
    units = {"up_proj": [1, 4, 9, 27], "down_proj": [4, 6, 9, 10, 24]}
    layout, realised = _plan_structure(units, parts)
    assert realised == units
    for part in parts:
        span = range(part.start, part.start + part.count)
        assert sorted(layout.perm[part.start : part.start + part.count]) == list(span)
    assert layout.blocks["up_proj"] == [(0, 2), (8, 9), (16, 16), (24, 25)]
    assert layout.blocks["down_proj"] == [(1, 3), (8, 10), (16, 16), (25, 26)]
    assert layout.perm[:3] == [1, 4, 6] and layout.perm[8:10] == [9, 10]


@pytest.mark.parametrize("arch", ["llama-gqa-bias", "qwen2", "qwen3"])
def test_inverse_layout_restores_weights_exactly(arch):
    model = tiny_model(arch)
    original = copy.deepcopy(model.state_dict())
    for targets in ({"v_proj": 0.5, "o_proj": 0.4}, {"gate_proj": 0.2, "down_proj": 0.3}):
        selection = select_units(model, S2FTConfig(targets=targets))
        layout, _ = plan_layout(selection)
        apply_layout(model, layout, selection.shape)
        changed = [k for k, v in model.state_dict().items() if not torch.equal(v, original[k])]
        assert changed  # the layout moved something
        apply_layout(model, layout, selection.shape, inverse=True)
        for k, v in model.state_dict().items():
            assert torch.equal(v, original[k]), k


def test_all_attention_pairs_on_every_gqa_shape_keep_logits():
    """Exhaustive over small selections: every pair, every layout, same function."""
    model = tiny_model("mistral").eval()  # 4 heads, 2 kv heads
    ids = torch.randint(0, 97, (1, 8))
    with torch.no_grad():
        ref = model(ids).logits
    for pair in ATTENTION_PAIRS:
        for sizes in itertools.product(*[range(1, 3) for _ in pair]):
            m = copy.deepcopy(model)
            cfg = S2FTConfig(
                targets={
                    p: s / (2 if p in GROUP_MATRICES else 4)
                    for p, s in zip(pair, sizes, strict=True)
                },
                allocation="per_layer",
                seed=sum(sizes),
            )
            selection = select_units(m, cfg)
            layout, _ = plan_layout(selection)
            apply_layout(m, layout, selection.shape)
            with torch.no_grad():
                assert (m(ids).logits - ref).abs().max() <= 1e-5 * max(1, ref.abs().max())
