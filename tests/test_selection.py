"""Selection: counts, determinism, JSON round trip, validation (paper §3.2 and §4)."""

from __future__ import annotations

import pytest
import torch
from pydantic import ValidationError

from s2ft_cli import S2FTConfig, S2FTError, Selection
from s2ft_cli.engine.selection import select_units

from .conftest import tiny_model


def test_global_allocation_draws_int_ratio_layers_units_overall():
    model = tiny_model("llama-gqa-bias")  # 2 layers, 8 heads, 96 channels
    sel = select_units(model, S2FTConfig(targets={"o_proj": 0.2, "down_proj": 0.07}))
    assert sum(len(pm.get("o_proj", [])) for pm in sel.units.values()) == int(0.2 * 2 * 8)
    assert sum(len(pm.get("down_proj", [])) for pm in sel.units.values()) == int(0.07 * 2 * 96)


def test_a_cap_on_units_per_layer_keeps_the_count_and_takes_the_best_that_fit():
    """max_units_per_layer: the global draw's count, at most the cap in a layer, and the
    largest total score (weight norms here) any such choice has: every choice of 8 of the
    16 heads, 4 a layer at most, tried."""
    from itertools import combinations

    model = tiny_model("llama-gqa-bias")  # 2 layers, 8 heads, 96 channels
    targets = {"o_proj": 0.5, "down_proj": 0.04}
    config = S2FTConfig(targets=targets, strategy="weight", max_units_per_layer=4)
    capped = select_units(model, config)
    for matrix, count in (("o_proj", 8), ("down_proj", 7)):
        per_layer = [len(capped.units.get(i, {}).get(matrix, [])) for i in (0, 1)]
        assert sum(per_layer) == count and max(per_layer) <= 4
    scores = capped.scores["o_proj"].flatten()
    chosen = sum(scores[8 * i + u] for i in (0, 1) for u in capped.units[i]["o_proj"])
    best = max(
        sum(scores[list(c)])
        for c in combinations(range(16), 8)
        if sum(u < 8 for u in c) <= 4 and sum(u >= 8 for u in c) <= 4
    )
    assert torch.isclose(chosen, best)
    uncapped = select_units(model, config.model_copy(update={"max_units_per_layer": None}))
    assert max(len(uncapped.units[i]["o_proj"]) for i in (0, 1)) > 4  # the cap mattered
    with pytest.raises(S2FTError, match="raise the cap to at least 4"):
        select_units(model, config.model_copy(update={"max_units_per_layer": 3}))
    with pytest.raises(ValidationError, match="caps the global allocation"):
        S2FTConfig(targets=targets, allocation="per_layer", max_units_per_layer=3)


def test_per_layer_allocation_same_count_in_every_layer():
    model = tiny_model("llama-gqa-bias")
    sel = select_units(
        model, S2FTConfig(targets={"v_proj": 0.5, "up_proj": 0.1}, allocation="per_layer")
    )
    for layer in (0, 1):
        assert len(sel.units[layer]["v_proj"]) == 1  # int(0.5 × 2 kv heads)
        assert len(sel.units[layer]["up_proj"]) == 9  # int(0.1 × 96)


def test_layers_subset():
    model = tiny_model("qwen2")
    sel = select_units(model, S2FTConfig(targets={"o_proj": 0.5}, layers=[1]))
    assert list(sel.units) == [1] and len(sel.units[1]["o_proj"]) == 3


def test_deterministic_for_a_seed_and_uniform_over_seeds():
    model = tiny_model("llama-mha")
    cfg = S2FTConfig(targets={"down_proj": 0.1}, seed=7)
    assert select_units(model, cfg).units == select_units(model, cfg).units
    other = select_units(model, S2FTConfig(targets={"down_proj": 0.1}, seed=8))
    assert other.units != select_units(model, cfg).units
    # over many seeds every channel gets picked about equally often (random, not biased)
    counts = [0] * 80
    for seed in range(1000):
        for ids in (
            select_units(
                model, S2FTConfig(targets={"down_proj": 0.1}, seed=seed, allocation="per_layer")
            )
            .units[0]
            .values()
        ):
            for u in ids:
                counts[u] += 1
    expected = 1000 * 8 / 80
    assert min(counts) > 0.6 * expected and max(counts) < 1.4 * expected


def test_json_round_trip(tmp_path):
    model = tiny_model("qwen3")
    sel = select_units(model, S2FTConfig(targets={"v_proj": 0.5, "o_proj": 0.5}, seed=2))
    sel.adjustments.append("note")
    back = Selection.from_json(sel.to_json())
    assert back.units == sel.units and back.config == sel.config and back.shape == sel.shape
    assert back.adjustments == ["note"]
    sel.save(tmp_path / "s.json")
    assert Selection.from_json((tmp_path / "s.json").read_text()).units == sel.units


def test_summary_counts_trainable_parameters():
    model = tiny_model("qwen3")  # head_dim 12, hidden 32
    sel = select_units(
        model, S2FTConfig(targets={"k_proj": 0.5, "down_proj": 0.25}, allocation="per_layer")
    )
    total = sum(p.numel() for p in model.parameters())
    summary = sel.summary(total)
    per_layer = 1 * 12 * 32 + 16 * 32  # one kv head of k_proj, 16 channels of down_proj
    assert summary["trainable_params"] == 2 * per_layer
    assert summary["fraction"] == pytest.approx(2 * per_layer / total)


@pytest.mark.parametrize(
    "targets,message",
    [
        ({"o_prj": 0.1}, "unknown target matrix 'o_prj'"),
        ({"o_proj": 1.5}, "must be in (0, 1]"),
        ({"o_proj": 0.0}, "must be in (0, 1]"),
        (
            {"gate_proj": 0.1, "up_proj": 0.1, "down_proj": 0.1},
            "Keep two, e.g. up_proj + down_proj",
        ),
        ({}, "no target matrices"),
    ],
)
def test_invalid_config_is_refused_with_a_reason(targets, message):
    with pytest.raises(ValidationError) as err:
        S2FTConfig(targets=targets)
    assert message in str(err.value)


def test_unknown_strategy_names_the_available_ones():
    with pytest.raises(ValidationError, match="available: random"):
        S2FTConfig(targets={"o_proj": 0.1}, strategy="magic")


def test_too_small_ratio_says_the_smallest_that_works():
    model = tiny_model("mistral")  # 4 heads, 2 layers
    with pytest.raises(S2FTError, match="Use at least 0.25"):
        select_units(model, S2FTConfig(targets={"o_proj": 0.1}, allocation="per_layer"))


def test_layer_out_of_range():
    with pytest.raises(S2FTError, match="the model has 2 layers"):
        select_units(tiny_model("mistral"), S2FTConfig(targets={"o_proj": 0.5}, layers=[0, 2]))


def test_a_damaged_or_foreign_selection_is_refused(tmp_path):
    model = tiny_model("mistral")
    sel = select_units(model, S2FTConfig(targets={"o_proj": 0.5}))
    data = sel.to_dict()
    data["units"]["0"]["o_proj"] = [3, 99]
    with pytest.raises(S2FTError, match=r"distinct sorted ids in \[0, 4\)"):
        Selection.from_dict(data)
    data["units"]["0"] = {"down_proj": [1]}
    with pytest.raises(S2FTError, match="trains down_proj in layer 0, which is not among"):
        Selection.from_dict(data)
    with pytest.raises(S2FTError, match="damaged"):
        Selection.from_dict({"format": "s2ft-selection", "units": {}})
