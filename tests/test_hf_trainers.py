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

from .conftest import STORIES, batch, logit_tol, stories_model

TARGETS = {"v_proj": 0.5, "o_proj": 0.25, "up_proj": 0.1, "down_proj": 0.1}
STEPS = 3


def hf_trainer(kind: str, model, rows: list[dict], out: str):
    """A Trainer of ``kind`` (``transformers`` or ``trl``) for ``STEPS`` steps of 4 rows,
    saving a checkpoint at the end; in fp32 (TRL's default bf16 would run the trained
    model's forward under autocast, and the comparison with a fresh fp32 base with it)."""
    common = dict(
        output_dir=out, per_device_train_batch_size=4, max_steps=STEPS, save_steps=STEPS,
        learning_rate=1e-2, report_to=[], use_cpu=True, logging_steps=1, bf16=False,
    )  # fmt: skip
    if kind == "transformers":
        args = TrainingArguments(**common)  # remove_unused_columns on, as by default
        return Trainer(model=model, args=args, train_dataset=rows)
    import trl  # a test dependency (the dev extra), not the package's
    from datasets import Dataset

    tokenizer = AutoTokenizer.from_pretrained(STORIES)
    tokenizer.pad_token = tokenizer.pad_token or tokenizer.unk_token
    args = trl.SFTConfig(**common, max_length=64)
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

    deltas = {id(p) for name, p in model.named_parameters() if name.endswith(".delta")}
    optimized = {id(p) for group in trainer.optimizer.param_groups for p in group["params"]}
    assert optimized == deltas == {id(p) for p in model.parameters() if p.requires_grad}

    ids = batch(base, size=2, length=16, seed=9)
    model.eval()
    with torch.no_grad():
        trained = model(ids).logits
        assert (trained - base(ids).logits).abs().max().item() > 1e-3  # it trained
        for folder in (tmp_path / "run" / f"checkpoint-{STEPS}", tmp_path / "final"):
            reloaded = load_adapter(copy.deepcopy(base), folder)(ids).logits
            assert (reloaded - trained).abs().max().item() <= logit_tol(trained), folder
