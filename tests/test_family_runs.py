"""Every user path on the families whose weights differ most from LLaMA's (fused and
transposed weights, experts with a shared expert): `s2ft train` in one
process and under torchrun (DDP, FSDP2), `s2ft select` and the memory plan, `s2ft export`
(the adapter, merged into a plain transformers model, as PEFT LoRA), Hugging Face's
Trainer with default arguments. Each family's tiny model is saved as a model folder with
the presets' character tokenizer."""

from __future__ import annotations

import copy

import pytest
import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM, Trainer, TrainingArguments
from typer.testing import CliRunner

from s2ft_cli import get_s2ft_model, load_adapter
from s2ft_cli.cli import app
from s2ft_cli.data import collate
from s2ft_cli.engine.models import char_tokenizer
from s2ft_cli.recipe import load_recipe
from s2ft_cli.training.memory import plan_memory
from s2ft_cli.training.trainer import train

from .conftest import logit_tol
from .families import family_model, targets_of
from .test_ddp import max_diff
from .torchrun import torchrun

runner = CliRunner()

RECIPE = """\
model: {{name_or_path: {folder}}}
data: {{train: {{path: "builtin:arithmetic", limit: 48}}, val_size: 0, max_seq_len: 200,
        prompt_template: chat}}
s2ft: {{targets: {targets}, seed: 1}}
train: {{max_steps: {steps}, batch_size: 8, lr: 1.0e-2, warmup_steps: 0, eval_every: 0,
         save_every: 0, seed: 3}}
"""
CHAT = "{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}\n{% endfor %}"


def model_folder(root, model_type: str):
    """The family's tiny model and a character tokenizer with a chat template, saved."""
    folder = root / model_type
    if not folder.is_dir():
        family_model(model_type).save_pretrained(folder)
        tokenizer = char_tokenizer()
        tokenizer.chat_template = CHAT
        tokenizer.save_pretrained(folder)
    return folder


def recipe_for(tmp_path, model_type: str, steps: int = 4):
    folder = model_folder(tmp_path, model_type)
    text = RECIPE.format(folder=folder, targets=targets_of(model_type), steps=steps)
    (tmp_path / "recipe.yaml").write_text(text)
    return tmp_path / "recipe.yaml"


def invoke(*args) -> str:
    result = runner.invoke(app, [str(a) for a in args])
    assert result.exit_code == 0, result.output
    return result.output


@pytest.mark.parametrize("model_type", ["gpt2", "phi3", "qwen2_moe"])
def test_train_select_plan_and_every_export(model_type, tmp_path):
    """A run trains; select names its units; plan answers; the adapter, the merged model
    (plain transformers) and the PEFT export all give the trained logits."""
    path = recipe_for(tmp_path, model_type)
    run = tmp_path / "run"
    train(load_recipe(path, [f"output_dir={run}"]))
    listed = invoke("select", path)
    assert all(f" {role} " in listed for role in targets_of(model_type)), listed
    assert plan_memory(load_recipe(path)).total(False) > 0
    base = AutoModelForCausalLM.from_pretrained(model_folder(tmp_path, model_type)).eval()
    trained = load_adapter(copy.deepcopy(base), run / "adapter")
    ids = torch.randint(4, 100, (2, 20))
    with torch.no_grad():
        expected = trained(ids).logits
    invoke("export", run, "--merged", "--out", tmp_path / "merged")
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged").eval()
    invoke("export", run, "--format", "peft", "--out", tmp_path / "peft")
    peft = PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "peft").eval()
    for model in (merged, peft):
        with torch.no_grad():
            got = model(ids).logits
        assert (got - expected).abs().max() <= logit_tol(expected)
    assert not torch.equal(expected, base(ids).logits.detach())


@pytest.fixture(scope="module")
def experts_one_process(tmp_path_factory):
    """The reference of the torchrun runs: Qwen2-MoE's recipe in one process, batch 8."""
    root = tmp_path_factory.mktemp("experts")
    path = recipe_for(root, "qwen2_moe", steps=3)
    train(load_recipe(path, [f"output_dir={root / 'single'}"]))
    return path, root / "single"


@pytest.mark.parametrize("distributed", ["ddp", "fsdp"])
def test_torchrun_trains_experts_like_one_process(distributed, experts_one_process, tmp_path):
    """Two processes × batch 4 = one process × batch 8 on a mixture-of-experts model,
    whose ranks route their tokens to different experts."""
    path, single = experts_one_process
    result = torchrun("train", path, f"output_dir={tmp_path / 'multi'}", "train.batch_size=4",
                      f"train.distributed={distributed}")  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    assert max_diff(tmp_path / "multi" / "adapter", single / "adapter") <= 1e-4


@pytest.mark.parametrize("model_type", ["gpt2", "mixtral"])
def test_hugging_face_trainer_with_default_arguments(model_type, tmp_path):
    """transformers' Trainer as its documentation shows it, on a converted family model:
    only the deltas train, and the saved model is the S²FT adapter of what it trained."""
    model = get_s2ft_model(family_model(model_type), {"targets": targets_of(model_type)})
    rows = torch.randint(4, 100, (16, 12)).tolist()
    data = [{"input_ids": r, "labels": r} for r in rows]
    args = TrainingArguments(tmp_path / "out", max_steps=2, report_to=[], use_cpu=True)
    trainer = Trainer(model=model, args=args, train_dataset=data, data_collator=_collate)
    trainer.train()
    trainer.save_model(tmp_path / "final")
    model.eval()  # GPT-2's dropout
    with torch.no_grad():
        ids = torch.tensor(rows[:2])
        expected = model(ids).logits
        got = load_adapter(family_model(model_type), tmp_path / "final")(ids).logits
    assert (got - expected).abs().max() <= logit_tol(expected)


def _collate(rows):
    from s2ft_cli.data import Example

    return collate([Example(r["input_ids"], r["labels"]) for r in rows], pad_id=0)
