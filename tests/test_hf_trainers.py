"""Hugging Face's Trainer and TRL's SFTTrainer train a `get_s2ft_model` model: the
optimizer holds the deltas only, and every `checkpoint-N` folder and the final
`save_model` hold an S²FT adapter that `load_adapter` puts on a fresh base with the
trained model's logits."""

from __future__ import annotations

import copy

import pytest
import torch
from transformers import AutoTokenizer, Trainer, TrainingArguments

from s2ft_cli import get_s2ft_model, load_adapter
from s2ft_cli.adapter.format import Adapter, adapter_of

from .conftest import STORIES, batch, stories_model

TARGETS = {"v_proj": 0.5, "o_proj": 0.25, "up_proj": 0.1, "down_proj": 0.1}
STEPS = 3


def hf_trainer(kind: str, model, rows: list[dict], out: str):
    """A Trainer of ``kind`` (``transformers`` or ``trl``) for ``STEPS`` steps of 4 rows,
    saving a checkpoint at the end; every other argument at its default, as a user writes
    it (TRL's is bf16 autocast)."""
    common = dict(
        output_dir=out, per_device_train_batch_size=4, max_steps=STEPS, save_steps=STEPS,
        learning_rate=1e-2,
    )  # fmt: skip
    if kind == "transformers":
        args = TrainingArguments(**common)
        return Trainer(model=model, args=args, train_dataset=rows)
    import trl  # a test dependency (the dev extra), not the package's
    from datasets import Dataset

    tokenizer = AutoTokenizer.from_pretrained(STORIES)
    tokenizer.pad_token = tokenizer.pad_token or tokenizer.unk_token
    # on a CPU TRL's default bf16 asks for use_cpu (its error says so): what a user writes
    args = trl.SFTConfig(**common, max_length=64, use_cpu=not torch.cuda.is_available())
    dataset = Dataset.from_list([{"input_ids": row["input_ids"]} for row in rows])
    return trl.SFTTrainer(model=model, args=args, train_dataset=dataset, processing_class=tokenizer)


@pytest.mark.parametrize("kind", ["transformers", "trl"])
def test_checkpoints_and_the_final_model_hold_the_trained_adapter(kind, tmp_path):
    base = stories_model()
    model = get_s2ft_model(copy.deepcopy(base), {"targets": TARGETS, "seed": 1})
    rows = [{"input_ids": ids, "labels": ids} for ids in batch(base, 12, 20, seed=3).tolist()]
    trainer = hf_trainer(kind, model, rows, str(tmp_path / "run"))
    trainer.train()
    trainer.save_model(str(tmp_path / "final"))

    optimized_the_deltas_alone(trainer, model)
    for folder in (tmp_path / "run" / f"checkpoint-{STEPS}", tmp_path / "final"):
        holds_the_trained_adapter(model, base, folder)


def optimized_the_deltas_alone(trainer, model) -> None:
    """The trainer's optimizer holds the S² deltas and nothing else; nothing else trains."""
    deltas = {id(p) for name, p in model.named_parameters() if name.endswith(".delta")}
    optimized = {id(p) for group in trainer.optimizer.param_groups for p in group["params"]}
    assert optimized == deltas == {id(p) for p in model.parameters() if p.requires_grad}


def holds_the_trained_adapter(model, base, folder) -> None:
    """``folder`` holds the trained model's update exactly (its deltas at their rows and
    columns), and that update, loaded onto a fresh base, changes the base's logits. (The
    trained model's own logits are no reference: a Trainer under mixed precision leaves
    its forward wrapped in autocast.)"""
    saved, trained = Adapter.load(folder), adapter_of(model)
    assert saved.updates.keys() == trained.updates.keys()
    for name, update in saved.updates.items():
        assert torch.equal(update.index, trained.updates[name].index), name
        assert torch.equal(update.delta, trained.updates[name].delta), name
    ids = batch(base, size=2, length=16, seed=9)
    with torch.no_grad():
        reloaded = load_adapter(copy.deepcopy(base), folder)(ids).logits
        assert (reloaded - base(ids).logits).abs().max().item() > 1e-3  # it trained
