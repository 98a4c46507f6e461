"""`s2ft plan`: the memory plan reads no weights, counts the parameters and their state as
they are, and predicts the activations a step saves as autograd itself saves them."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM
from typer.testing import CliRunner

from s2ft_cli import get_s2ft_model
from s2ft_cli.cli import app
from s2ft_cli.data import Example, collate
from s2ft_cli.engine.losses import example_losses
from s2ft_cli.engine.models import load_model
from s2ft_cli.recipe import load_recipe
from s2ft_cli.training.memory import ADAMW_BYTES, GIB, plan_memory

from .families import FAMILY_CONFIGS
from .test_train import recipe_file

PLAN_RECIPE = """\
model: {{name_or_path: "{model}"}}
data: {{train: {{path: "builtin:arithmetic"}}, max_seq_len: {seq}}}
s2ft: {{targets: {targets}, seed: 1}}
train: {{batch_size: {batch}}}
"""


def saved_by_autograd(model, batch_size: int, seq_len: int) -> int:
    """Bytes of the distinct non-parameter storages one training step of a converted
    model saves for backward (random tokens, every one a target; several rows padded as
    training batches are: the last a few tokens shorter)."""
    model.train()
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    storages = {}

    def pack(t):
        s = t.untyped_storage()
        if s.data_ptr() not in params:
            storages[s.data_ptr()] = s.nbytes()
        return t

    g = torch.Generator().manual_seed(0)
    ids = torch.randint(3, model.config.vocab_size, (batch_size, seq_len), generator=g)
    rows = ids.tolist()
    if batch_size > 1:
        rows[-1] = rows[-1][:-3]
    batch = collate([Example(row, row) for row in rows], pad_id=0)
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
    model = get_s2ft_model(load_model(recipe.model.name_or_path, seed=0), recipe.s2ft)
    saved = saved_by_autograd(model, batch, seq)
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
    assert sharded.activations == dense.activations
    # the root unit (embeddings, final norm, head) whole, two layers and a layer's buffer
    root = sum(p.numel() * 4 for n, p in model.named_parameters() if ".layers." not in n)
    layer = max(sum(p.numel() * 4 for p in layer.parameters()) for layer in model.model.layers)
    assert sharded.gathered == root + 3 * layer and sharded.gathering == 2 * root

    # FSDP2 over the 4-bit base; with offload the shards and AdamW live in CPU memory
    both = ["train.distributed=fsdp", "model.quantization=nf4"]
    sharded_nf4 = plan_memory(load_recipe(path, both), gpus=4)
    assert sharded_nf4.weights == nf4.weights // 4 and sharded_nf4.gathered < sharded.gathered
    offload = plan_memory(load_recipe(path, [*both, "train.fsdp_offload=true"]), gpus=4)
    assert offload.weights == offload.trainable == 0
    assert (
        offload.total(False)
        == sharded_nf4.total(False) - sharded_nf4.weights - sharded_nf4.trainable
    )
    assert any("fsdp_offload" in note for note in offload.notes)


@pytest.mark.parametrize("method", ["lora", "full"])
def test_lora_and_full_plans_count_what_they_train_and_save(tmp_path, method):
    """The same run planned as LoRA (PEFT, the rank matching S²FT's trainable count on the
    target matrices) or full fine-tuning: the parameters, their state and the activations a
    real step of that model saves."""
    from peft import LoraConfig, get_peft_model

    targets = {"o_proj": 0.25, "down_proj": 0.1}
    text = PLAN_RECIPE.format(model="preset:tiny-llama", seq=96, targets=targets, batch=2)
    recipe = load_recipe(recipe_file(tmp_path, text))
    plan = plan_memory(recipe, method=method)
    model = load_model("preset:tiny-llama", seed=0)
    if method == "lora":
        s2ft = get_s2ft_model(load_model("preset:tiny-llama"), recipe.s2ft)
        matched = sum(p.numel() for p in s2ft.parameters() if p.requires_grad)
        c = model.config
        per_rank = c.num_hidden_layers * (2 * c.hidden_size + c.intermediate_size + c.hidden_size)
        rank = round(matched / per_rank)
        assert f"LoRA r={rank} on mlp.down_proj, self_attn.o_proj" in plan.notes[0]
        config = LoraConfig(r=rank, target_modules=["o_proj", "down_proj"])
        model = get_peft_model(model, config).get_base_model()
        state = ADAMW_BYTES
        # S²FT on the last layer only: LoRA there too, at the rank matching that count
        last = load_recipe(tmp_path / "recipe.yaml", ["s2ft.layers=[1]"])
        s2ft = get_s2ft_model(load_model("preset:tiny-llama"), last.s2ft)
        last = plan_memory(last, method=method)
        one_layer = sum(p.numel() for p in s2ft.parameters() if p.requires_grad)
        rank = round(one_layer / (per_rank / c.num_hidden_layers))
        assert f"LoRA r={rank} " in last.notes[0]
        assert last.trainable == rank * per_rank // c.num_hidden_layers * ADAMW_BYTES
    else:
        model.requires_grad_(True)
        state = 4 * 4  # fp32 model: weight, gradient, two moments
    trained = [p for p in model.parameters() if p.requires_grad]
    assert plan.trainable == sum(p.numel() for p in trained) * state
    frozen = sum(p.numel() * 4 for p in model.parameters() if not p.requires_grad)
    assert plan.weights == frozen
    assert plan.activations == pytest.approx(saved_by_autograd(model, 2, 96), rel=0.02)
    s2ft_plan = plan_memory(recipe)
    assert s2ft_plan.total(False) < plan.total(False)  # leaner than both
    # under DDP the gradients once more, in DDP's buckets
    ddp = plan_memory(recipe, gpus=2, method=method)
    gradient = 4  # fp32 LoRA weights, fp32 model
    assert ddp.trainable - plan.trainable == sum(p.numel() for p in trained) * gradient
    result = CliRunner().invoke(app, ["plan", str(tmp_path / "recipe.yaml"), "--method", method])
    assert result.exit_code == 0, result.output
    named = {"lora": "trained with LoRA", "full": "fully fine-tuned"}[method]
    assert named in result.output and plan.notes[0] in " ".join(result.output.split())


def test_what_cannot_be_planned_is_refused_naming_what_can(tmp_path):
    """LoRA of a mixture-of-experts model (full fine-tuning of it is planned), full
    fine-tuning of a 4-bit base, a method s2ft does not know."""
    from .families import family_config

    def plan(model, *args):
        text = PLAN_RECIPE.format(model=model, seq=16, targets={"down_proj": 0.1}, batch=1)
        return CliRunner().invoke(app, ["plan", str(recipe_file(tmp_path, text)), *args])

    family_config("qwen3_moe").save_pretrained(tmp_path / "moe")
    result = plan(tmp_path / "moe", "--method", "lora")
    assert result.exit_code == 1 and "does not plan a mixture-of-experts" in result.output
    assert plan(tmp_path / "moe", "--method", "full").exit_code == 0
    result = plan("preset:tiny-llama", "model.quantization=nf4", "--method", "full")
    assert result.exit_code == 1 and "no quantized base" in result.output
    result = plan("preset:tiny-llama", "--method", "dora")
    assert result.exit_code == 1 and "plans s2ft, lora, full" in result.output


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


@pytest.mark.parametrize("model_type", list(FAMILY_CONFIGS))
def test_traced_activations_are_what_every_family_saves(model_type):
    """The fake-tensor trace counts what a real step of each family's decoder saves: within
    2% for dense families, within 15% for mixture-of-experts layers, which the trace routes
    evenly while a real router does not."""
    from s2ft_cli.engine.families import FAMILIES
    from s2ft_cli.training.activations import trace_saved

    from .families import family_config, family_model, targets_of

    targets = {"targets": targets_of(model_type)}
    saved = saved_by_autograd(get_s2ft_model(family_model(model_type), targets), 2, 24)
    with torch.device("meta"):
        meta = AutoModelForCausalLM.from_config(family_config(model_type))
    loss = 2 * 24 * meta.config.hidden_size * 4  # d(loss)/d(hidden), as memory.py adds it
    traced = trace_saved(get_s2ft_model(meta, targets), 2, 24).total + loss
    rel = 0.15 if FAMILIES[model_type].moe else 0.02
    assert traced == pytest.approx(saved, rel=rel)
