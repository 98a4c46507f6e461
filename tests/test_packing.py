"""Real-length data: `data.packing` (several whole examples per row, positions restarting
per example) is exact — an example's loss and gradient inside a pack equal it alone, on
SDPA and eager attention — and `train.group_by_length` gives batches of similar length in
a seeded order."""

from __future__ import annotations

import copy
import json
import re
import shutil

import pytest
import torch
from transformers import AutoModelForCausalLM

from s2ft_cli import S2FTError, get_s2ft_model
from s2ft_cli.data import IGNORE_INDEX, Example, StepPlan, collate, pack_examples, target_count
from s2ft_cli.engine.losses import example_losses
from s2ft_cli.recipe import load_recipe
from s2ft_cli.training.trainer import train

from .conftest import STORIES
from .test_train import max_diff, recipe_file


def examples_of(lengths: list[int], vocab: int, seed: int = 0) -> list[Example]:
    """Examples of the given lengths, a prompt (no loss) on the first third of each."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for n in lengths:
        ids = torch.randint(3, vocab, (n,), generator=g).tolist()
        out.append(Example(ids, [IGNORE_INDEX] * (n // 3) + ids[n // 3 :]))
    return out


def test_packing_keeps_every_example_whole_within_the_length():
    examples = examples_of([30, 7, 19, 25, 3, 12, 30, 9, 16], vocab=100)
    rows = pack_examples(examples, max_len=32)
    assert all(len(r.input_ids) <= 32 for r in rows)
    assert len(rows) < len(examples)  # it packs
    assert sum(target_count(r) for r in rows) == sum(target_count(e) for e in examples)
    found = []
    for row in rows:
        starts = [k for k, p in enumerate(row.position_ids) if p == 0] + [len(row.input_ids)]
        for a, b in zip(starts, starts[1:], strict=False):
            found.append((tuple(row.input_ids[a:b]), tuple(row.labels[a + 1 : b])))
            assert row.labels[a] == IGNORE_INDEX and row.position_ids[a:b] == list(range(b - a))
    expected = [(tuple(e.input_ids), tuple(e.labels[1:])) for e in examples]
    assert sorted(found) == sorted(expected)
    batch = collate(rows, pad_id=0)
    assert "attention_mask" not in batch and batch["position_ids"].shape == batch["input_ids"].shape


@pytest.fixture(scope="module")
def stories():
    """stories260K converted with trained-looking deltas, in float32."""
    if not STORIES.is_dir():
        pytest.skip(f"reference checkpoint {STORIES} not present")
    model = AutoModelForCausalLM.from_pretrained(STORIES, dtype=torch.float32)
    model = get_s2ft_model(model, {"targets": {"o_proj": 0.25, "up_proj": 0.1}, "seed": 1})
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.normal_(0, 0.05)
    return model.eval()


@pytest.mark.parametrize("attention", ["sdpa", "eager"])
def test_an_examples_loss_and_gradient_inside_a_pack_equal_it_alone(stories, attention):
    model = copy.deepcopy(stories)
    model.set_attn_implementation(attention)
    examples = examples_of([40, 23, 31, 17], vocab=model.config.vocab_size, seed=2)
    (row,) = pack_examples(examples, max_len=128)
    starts = [k for k, p in enumerate(row.position_ids) if p == 0] + [len(row.input_ids)]
    deltas = [p for p in model.parameters() if p.requires_grad]
    for k, e in enumerate(examples):
        # the pack, with the loss taken on this example's tokens only
        a, b = next(
            (a, b) for a, b in zip(starts, starts[1:], strict=False) if b - a == len(e.input_ids)
        )
        alone_in_pack = Example(
            row.input_ids,
            [lab if a <= j < b else IGNORE_INDEX for j, lab in enumerate(row.labels)],
            position_ids=row.position_ids,
        )
        packed_loss = example_losses(model, collate([alone_in_pack], pad_id=0))[0].sum()
        packed_grads = torch.autograd.grad(packed_loss, deltas)
        loss = example_losses(model, collate([e], pad_id=0))[0].sum()
        grads = torch.autograd.grad(loss, deltas)
        assert packed_loss.item() == pytest.approx(loss.item(), rel=1e-6), k
        for x, y in zip(packed_grads, grads, strict=True):  # float rounding apart
            assert (x - y).abs().max() <= 1e-5 * y.abs().max(), k


def test_group_by_length_batches_similar_lengths_in_a_seeded_order():
    g = torch.Generator().manual_seed(0)
    lengths = torch.randint(10, 600, (1000,), generator=g).tolist()

    def plan(seed, grouped=True):
        return StepPlan(1000, 4, 2, 2, seed, lengths if grouped else None)

    steps = plan(0).steps_per_epoch
    assert steps == 1000 // 16
    for epoch in (0, 1):
        order = plan(0).epoch_order(epoch)
        assert order == plan(0).epoch_order(epoch)  # deterministic under the seed
        assert len(set(order)) == 1000 == len(order)

        def padding(p, epoch=epoch):
            waste = total = 0
            for s in range(epoch * steps, (epoch + 1) * steps):
                for r in range(2):
                    for m in range(2):
                        batch = [lengths[i] for i in p.micro_batch(s, r, m)]
                        waste += max(batch) * len(batch) - sum(batch)
                        total += max(batch) * len(batch)
            return waste / total

        assert padding(plan(0)) < 0.05 < 0.3 < padding(plan(0, grouped=False))
        longest = [
            max(lengths[i] for i in plan(0).step_examples(epoch * steps + s)) for s in range(steps)
        ]
        assert longest != sorted(longest, reverse=True)  # batches shuffled, not longest first
    assert plan(0).epoch_order(0) != plan(0).epoch_order(1) != plan(1).epoch_order(1)


def test_a_packed_grouped_run_trains_and_resumes_exactly(tmp_path):
    """`s2ft train` with data.packing and train.group_by_length: 8 steps straight, and the
    same run resumed from its step-4 checkpoint, end with the same adapter; resuming
    without packing (another data order) is refused."""
    path = recipe_file(tmp_path)
    options = ["data.packing=true", "train.group_by_length=true", "train.max_steps=8"]
    options += ["train.batch_size=2", "train.eval_every=0"]
    train(load_recipe(path, [*options, f"output_dir={tmp_path / 'straight'}"]))
    run = tmp_path / "run"
    train(load_recipe(path, [*options, f"output_dir={run}"]))
    shutil.rmtree(run / "adapter")
    shutil.rmtree(run / "checkpoints" / "step-0000008")
    unpacked = [o for o in options if not o.startswith("data.packing")]
    with pytest.raises(S2FTError, match="data.packing true and train.group_by_length true"):
        train(load_recipe(path, [*unpacked, f"output_dir={run}"]), resume=True)
    train(load_recipe(path, [*options, f"output_dir={run}"]), resume=True)
    assert max_diff(run / "adapter", tmp_path / "straight" / "adapter") <= 1e-6


def test_s2ft_data_shows_the_batches_as_training_makes_them(tmp_path):
    """`s2ft data` counts padding in the training set's batches as the recipe makes them:
    packed rows, or examples grouped by length, pad less than the seeded order."""
    from typer.testing import CliRunner

    from s2ft_cli.cli import app

    path = recipe_file(tmp_path)
    g = torch.Generator().manual_seed(0)
    records = [
        {"instruction": "Repeat.", "input": "", "output": "ab " * int(n)}
        for n in torch.randint(5, 120, (96,), generator=g)
    ]
    data = tmp_path / "varied.json"
    data.write_text(json.dumps(records))

    def train_row(*options) -> tuple[str, float]:
        options = [f"data.train.path={data}", "data.val_size=0", "data.max_seq_len=512", *options]
        result = CliRunner().invoke(app, ["data", str(path), *options])
        assert result.exit_code == 0, result.output
        row = next(line for line in result.output.splitlines() if "│ train" in line)
        return row, float(re.findall(r"([\d.]+)%", row)[-1])

    plain, padding = train_row()
    grouped, grouped_padding = train_row("train.group_by_length=true")
    packed, packed_padding = train_row("data.packing=true")
    assert "packed" in packed and "packed" not in plain + grouped
    assert packed_padding < padding and grouped_padding < padding
