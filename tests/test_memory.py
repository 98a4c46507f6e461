"""`s2ft plan`: the memory plan reads no weights, counts the parameters and their state as
they are, and predicts the activations a step saves as autograd itself saves them."""

from __future__ import annotations

import pytest
import torch
from typer.testing import CliRunner

from s2ft_cli import get_s2ft_model
from s2ft_cli.cli import app
from s2ft_cli.data import Example, collate
from s2ft_cli.engine.losses import example_losses
from s2ft_cli.engine.models import load_model
from s2ft_cli.recipe import load_recipe
from s2ft_cli.training.memory import ADAMW_BYTES, GIB, plan_memory

from .test_train import recipe_file

PLAN_RECIPE = """\
model: {{name_or_path: "{model}"}}
data: {{train: {{path: "builtin:arithmetic"}}, max_seq_len: {seq}}}
s2ft: {{targets: {targets}, seed: 1}}
train: {{batch_size: {batch}}}
"""


def saved_by_autograd(recipe) -> int:
    """Bytes of the distinct non-parameter storages one training step of the recipe's
    converted model saves for backward (random weights, every token a target)."""
    model = load_model(recipe.model.name_or_path, seed=0)
    model = get_s2ft_model(model, recipe.s2ft).train()
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    storages = {}

    def pack(t):
        s = t.untyped_storage()
        if s.data_ptr() not in params:
            storages[s.data_ptr()] = s.nbytes()
        return t

    shape = (recipe.train.batch_size, recipe.data.max_seq_len)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, model.config.vocab_size, shape, generator=g)
    batch = collate([Example(row, row) for row in ids.tolist()], pad_id=0)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        example_losses(model, batch)
    return sum(storages.values())


@pytest.mark.parametrize(
    "targets",
    [
        {"o_proj": 0.25, "down_proj": 0.1},
        {"v_proj": 0.5, "o_proj": 0.25, "up_proj": 0.1},
        {"down_proj": 0.1},
    ],
    ids=["consumers", "producers", "ffn-only"],
)
@pytest.mark.parametrize("model", ["preset:tiny-llama", "preset:bench-llama"])
def test_planned_activations_are_what_autograd_saves(tmp_path, model, targets):
    batch, seq = (2, 96) if model == "preset:tiny-llama" else (1, 64)
    text = PLAN_RECIPE.format(model=model, seq=seq, targets=targets, batch=batch)
    recipe = load_recipe(recipe_file(tmp_path, text))
    planned = plan_memory(recipe).activations
    saved = saved_by_autograd(recipe)
    assert planned == pytest.approx(saved, rel=0.02)


def test_the_plan_counts_weights_and_state_without_reading_weights(tmp_path, monkeypatch):
    text = PLAN_RECIPE.format(
        model="preset:bench-llama", seq=64, targets={"o_proj": 0.05, "down_proj": 0.02}, batch=1
    )
    path = recipe_file(tmp_path, text)
    reads = []
    real = load_model

    def recording(*args, **kwargs):
        reads.append(kwargs.get("weights", True))
        return real(*args, **kwargs)

    monkeypatch.setattr("s2ft_cli.training.memory.load_model", recording)
    recipe = load_recipe(path)
    dense = plan_memory(recipe)
    assert reads == [False]
    model = get_s2ft_model(load_model("preset:bench-llama"), recipe.s2ft)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    frozen = sum(p.numel() * 4 for p in model.parameters() if not p.requires_grad)
    assert dense.trainable == trainable * ADAMW_BYTES
    assert dense.weights == frozen

    nf4 = plan_memory(load_recipe(path, ["model.quantization=nf4"]))
    linears = (
        sum(p.numel() for n, p in model.named_parameters() if ".layers." in n and "proj" in n)
        - trainable
    )
    assert dense.weights - nf4.weights == pytest.approx(linears * (4 - 4.127 / 8), rel=1e-3)

    sharded = plan_memory(load_recipe(path, ["train.distributed=fsdp"]), gpus=4)
    assert sharded.weights == dense.weights // 4 and sharded.trainable == dense.trainable // 4
    assert sharded.gathered > 0 and sharded.activations == dense.activations


def test_plan_command_prints_the_parts_and_totals(tmp_path):
    text = PLAN_RECIPE.format(
        model="preset:bench-llama2-7b-2l", seq=512, targets={"o_proj": 0.05}, batch=1
    )
    result = CliRunner().invoke(app, ["plan", str(recipe_file(tmp_path, text)), "--gpus", "2"])
    assert result.exit_code == 0, result.output
    for part in ("frozen weights", "saved activations", "total with activation checkpointing"):
        assert part in result.output
    recipe = load_recipe(recipe_file(tmp_path, text))
    total = plan_memory(recipe, gpus=2).total(False) / GIB
    assert f"{total:.2f}" in result.output
