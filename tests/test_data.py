"""Data: prompt, label masking, truncation, EOS, padding, record errors."""

from __future__ import annotations

import json

import pytest

from s2ft_cli import S2FTError
from s2ft_cli.data import (
    IGNORE_INDEX,
    StepPlan,
    alpaca_prompt,
    arithmetic_problems,
    build_examples,
    collate,
    epoch_order,
    load_records,
    split_validation,
)
from s2ft_cli.engine.models import char_tokenizer
from s2ft_cli.recipe import DataSource

TOK = char_tokenizer()


def examples(
    records, fmt="llm-adapters", template="alpaca", max_len=1024, on_prompt=False, tokenizer=TOK
):
    return build_examples("data.json", records, fmt, tokenizer, template, max_len, on_prompt)


def target_text(example, tokenizer=TOK):
    return tokenizer.decode([t for t in example.labels if t != IGNORE_INDEX])


def test_alpaca_prompt_is_masked_and_eos_is_learned():
    record = {"instruction": "Add 2 and 3.", "input": "", "output": "5"}
    (ex,) = examples([record])
    assert TOK.decode(ex.input_ids) == "<s>" + alpaca_prompt("Add 2 and 3.") + "5</s>"
    assert target_text(ex) == "5</s>"
    assert ex.labels[0] == IGNORE_INDEX  # BOS
    (ex,) = examples([record], on_prompt=True)
    assert target_text(ex) == alpaca_prompt("Add 2 and 3.") + "5</s>"


def test_input_field_uses_the_paper_prompt_with_input():
    (ex,) = examples([{"instruction": "Sum.", "input": "2 3", "output": "5"}])
    text = TOK.decode(ex.input_ids)
    assert "paired with an input" in text and "### Input:\n2 3\n\n### Response:\n5" in text


def test_truncation_keeps_max_seq_len():
    (ex,) = examples([{"instruction": "x" * 50, "output": "y" * 500}], max_len=300)
    assert len(ex.input_ids) == len(ex.labels) == 300


def test_records_whose_targets_are_cut_off_are_dropped():
    short, long = {"instruction": "a", "output": "b"}, {"instruction": "x" * 400, "output": "y"}
    kept = examples([short, long, short], max_len=200)
    assert len(kept) == 2 and all(target_text(e) == "b</s>" for e in kept)
    with pytest.raises(S2FTError, match="no record has a target token within max_seq_len 100"):
        examples([short, long], max_len=100)


@pytest.mark.parametrize(
    "record,message",
    [
        ({"input": "", "output": "5"}, "record 2 is malformed: it has no 'instruction' field"),
        (
            {"instruction": "q", "output": 5},
            "record 2 is malformed: field 'output' must be a string",
        ),
        (["not", "an", "object"], "record 2 is malformed: a record must be an object"),
    ],
)
def test_malformed_records_name_file_and_record(record, message):
    good = {"instruction": "q", "output": "a"}
    with pytest.raises(S2FTError, match=message):
        examples([good, record, good])


def test_chat_records_learn_the_assistant_turns_only():
    tok = char_tokenizer()
    tok.chat_template = "{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}\n{% endfor %}"
    record = {
        "messages": [
            {"role": "user", "content": "hi"},
            {"role": "assistant", "content": "hello"},
            {"role": "user", "content": "bye"},
            {"role": "assistant", "content": "ciao"},
        ]
    }
    (ex,) = examples([record], fmt="chat", tokenizer=tok)
    assert target_text(ex, tok) == "<assistant>hello\n<assistant>ciao\n</s>"
    with pytest.raises(S2FTError, match="no assistant message"):
        examples([{"messages": [{"role": "user", "content": "hi"}]}], fmt="chat", tokenizer=tok)
    with pytest.raises(S2FTError, match="has none"):
        examples([record], fmt="chat")  # no chat template


def test_instruction_records_under_the_chat_template():
    tok = char_tokenizer()
    tok.chat_template = "{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}\n{% endfor %}"
    (ex,) = examples(
        [{"instruction": "Sum.", "input": "2 3", "output": "5"}], template="chat", tokenizer=tok
    )
    assert tok.decode(ex.input_ids) == "<s><user>Sum.\n\n2 3\n<assistant>5\n</s>"
    assert target_text(ex, tok) == "<assistant>5\n</s>"


def test_text_records_and_txt_files(tmp_path):
    (tmp_path / "t.txt").write_text("first doc\nline two\n\n\nsecond doc\n")
    name, records = load_records(DataSource(path=str(tmp_path / "t.txt"), format="text"))
    assert records == [{"text": "first doc\nline two"}, {"text": "second doc"}]
    first, _ = examples(records, fmt="text")
    assert target_text(first) == "first doc\nline two</s>"


def test_json_and_jsonl_files_and_their_errors(tmp_path):
    recs = arithmetic_problems(3)
    (tmp_path / "a.json").write_text(json.dumps(recs))
    (tmp_path / "a.jsonl").write_text("\n".join(map(json.dumps, recs)))
    for f in ("a.json", "a.jsonl"):
        assert load_records(DataSource(path=str(tmp_path / f)))[1] == recs
    (tmp_path / "bad.jsonl").write_text(json.dumps(recs[0]) + "\n{oops\n")
    with pytest.raises(S2FTError, match="bad.jsonl: line 2 is not valid JSON"):
        load_records(DataSource(path=str(tmp_path / "bad.jsonl")))
    with pytest.raises(S2FTError, match="does not exist"):
        load_records(DataSource(path=str(tmp_path / "missing.json")))
    (tmp_path / "obj.json").write_text('{"a": 1}')
    with pytest.raises(S2FTError, match="must hold a JSON list"):
        load_records(DataSource(path=str(tmp_path / "obj.json")))


def test_shared_math_set_loads_unchanged():
    from .conftest import SHARED

    path = SHARED / "data" / "llm-adapters" / "ft-training_set" / "math_data.json"
    if not path.is_file():
        pytest.skip(f"{path} not present (it sits beside the repository)")
    _, records = load_records(DataSource(path=str(path), limit=50))
    assert len(examples(records)) == 50


def test_collate_pads_right_and_masks_padding():
    exs = examples([{"instruction": "a", "output": "b"}, {"instruction": "abcd", "output": "ef"}])
    batch = collate(exs, TOK.pad_token_id)
    n0, n1 = len(exs[0].input_ids), len(exs[1].input_ids)
    assert batch["input_ids"].shape == (2, max(n0, n1))
    assert batch["attention_mask"][0].sum() == n0 and batch["attention_mask"][1].sum() == n1
    assert (batch["labels"][0, n0:] == IGNORE_INDEX).all()
    assert (batch["input_ids"][0, n0:] == TOK.pad_token_id).all()


def test_validation_split_is_seeded_and_disjoint():
    exs = examples(arithmetic_problems(30))
    train, val = split_validation(exs, 5, seed=1)
    assert len(train) == 25 and len(val) == 5
    assert {id(e) for e in train}.isdisjoint({id(e) for e in val})
    assert [id(e) for e in split_validation(exs, 5, seed=1)[1]] == [id(e) for e in val]
    with pytest.raises(S2FTError, match="val_size is 30"):
        split_validation(exs, 30, seed=1)


def test_hf_format_reads_local_files_through_datasets(tmp_path):
    recs = arithmetic_problems(4)
    (tmp_path / "a.jsonl").write_text("\n".join(map(json.dumps, recs)))
    name, records = load_records(DataSource(path=str(tmp_path / "a.jsonl"), format="hf"))
    assert [r["output"] for r in records] == [r["output"] for r in recs]
    exs = examples(records, fmt="hf")
    assert target_text(exs[0]) == recs[0]["output"] + "</s>"
    chats = [
        {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]}
    ]
    (tmp_path / "c.json").write_text(json.dumps(chats))
    _, records = load_records(DataSource(path=str(tmp_path / "c.json"), format="hf"))
    with pytest.raises(S2FTError, match="chat template"):  # rows read as chat by their keys
        examples(records, fmt="hf")


@pytest.mark.parametrize("world, batch_size, grad_accum", [(1, 8, 1), (2, 2, 2), (3, 1, 2)])
def test_step_plan_takes_each_example_once_per_epoch_in_the_epoch_order(
    world, batch_size, grad_accum
):
    """Over the steps of an epoch, the micro-batches of all processes take the epoch's
    order, each example once (the remainder that fills no step is left out), and a step
    takes the same examples however it is split into processes and micro-batches."""
    examples, seed = 53, 4
    plan = StepPlan(examples, batch_size, world, grad_accum, seed)
    one = StepPlan(examples, plan.global_batch, 1, 1, seed)  # the same step, unsplit
    assert plan.steps_per_epoch == examples // (batch_size * world * grad_accum)
    for epoch in range(2):
        taken = []
        for step in range(epoch * plan.steps_per_epoch, (epoch + 1) * plan.steps_per_epoch):
            in_step = []
            for m in range(grad_accum):
                for rank in range(world):
                    ids = plan.micro_batch(step, rank, m)
                    assert len(ids) == batch_size
                    in_step += ids
            assert in_step == one.micro_batch(step, 0, 0) == plan.step_examples(step)
            taken += in_step
        order = epoch_order(examples, seed, epoch)
        assert taken == order[: len(taken)] and len(set(taken)) == len(taken)
        assert len(taken) == examples - examples % plan.global_batch
    assert plan.epoch_order(0) != plan.epoch_order(1)  # a new order each epoch
