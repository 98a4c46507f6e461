"""The tokens a model trains on are the tokens it sees at inference: real tokenizers (a
byte-level BPE with LLaMA-3's split pattern, LLaMA-2's and stories260K's sentencepiece
ones) and chat templates, including one that rewrites earlier turns."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from s2ft_cli import S2FTError
from s2ft_cli.data import alpaca_prompt, build_examples
from s2ft_cli.data.tokenization import IGNORE_INDEX, encode, prompt_ids
from s2ft_cli.evaluation.decoding import prompt_text

from . import real_tokenizers as rt
from .conftest import STORIES

RESPONSES = [
    "\nThe answer is 12.",  # BPE joins the prompt's last newline with this one
    "\n\n42",
    " 7 apples",  # a leading space
    "12 + 30 = 42. The answer is 42.",  # digits first
    "... so 5.",  # punctuation first
    ":\n\n3",
    "é, ü and 漢字",  # bytes beyond ASCII
]
INSTRUCTIONS = ["Tom has 5 apples and gets 7 more. How many apples does Tom have now?", "Sum."]


@pytest.fixture(scope="module")
def tokenizers(tmp_path_factory):
    root = tmp_path_factory.mktemp("tokenizers")
    found = {"bpe": rt.load(rt.bpe_folder(root / "bpe"))}
    if rt.LLAMA2_MODEL.is_file():
        found["llama2"] = rt.load(rt.llama2_folder(root / "llama2"))
    if STORIES.is_dir():
        found["stories260K"] = rt.load(STORIES)
    return found


@pytest.mark.parametrize("name", ["bpe", "llama2", "stories260K"])
def test_instruction_is_the_eval_prompt_then_the_response_then_eos(tokenizers, name):
    if name not in tokenizers:
        pytest.skip(f"{name} tokenizer files not present beside the repository")
    tok = tokenizers[name]
    assert tok.bos_token_id is not None and tok("a")["input_ids"][0] == tok.bos_token_id
    records = [
        {"instruction": q, "input": "", "output": r} for q in INSTRUCTIONS for r in RESPONSES
    ]
    examples = build_examples("d.json", records, "alpaca", tok, "alpaca", 4096, False)
    assert len(examples) == len(records)
    merged = 0
    for record, ex in zip(records, examples, strict=True):
        prompt = alpaca_prompt(record["instruction"])
        fed = prompt_ids(tok, [prompt_text(record, tok, "alpaca")])[0]
        assert ex.input_ids[: len(fed)] == fed  # exactly what eval and generation feed
        assert ex.input_ids[0] == tok.bos_token_id and ex.input_ids[-1] == tok.eos_token_id
        assert ex.labels[: len(fed)] == [IGNORE_INDEX] * len(fed)
        assert ex.labels[len(fed) :] == ex.input_ids[len(fed) :]
        text = tok.decode(ex.input_ids[1:-1], clean_up_tokenization_spaces=False)
        assert text == prompt + record["output"]  # no character lost or added
        whole = encode(tok, [prompt + record["output"]])[0]
        merged += whole[: len(fed) - 1] != fed[1:]
    if name == "bpe":  # the byte-level BPE merges across the boundary for some responses
        assert merged >= 2


def test_train_on_prompt_learns_all_but_bos(tokenizers):
    tok = tokenizers["bpe"]
    record = {"instruction": "Sum.", "output": "\nThe answer is 12."}
    (ex,) = build_examples("d", [record], "alpaca", tok, "alpaca", 4096, True)
    assert ex.labels[0] == IGNORE_INDEX and ex.labels[1:] == ex.input_ids[1:]


def conversation(*turns: str) -> list[dict]:
    roles = ["user", "assistant"]
    return [{"role": roles[i % 2], "content": t} for i, t in enumerate(turns)]


def spans(tok, ex) -> list[str]:
    """The runs of target tokens, decoded."""
    runs, run = [], []
    for t, label in zip(ex.input_ids, ex.labels, strict=True):
        if label == IGNORE_INDEX:
            if run:
                runs.append(run)
            run = []
        else:
            run.append(t)
    runs += [run] if run else []
    return [tok.decode(r, clean_up_tokenization_spaces=False) for r in runs]


def test_chat_learns_assistant_content_and_end_of_turn_only(tokenizers):
    tok = tokenizers["bpe"]
    messages = conversation("How many apples?", "12 apples.", "And pears?", "\nNone: 0.")
    (ex,) = build_examples("c", [{"messages": messages}], "chat", tok, "alpaca", 4096, False)
    rendered = tok.apply_chat_template(messages, tokenize=False)
    assert tok.decode(ex.input_ids, clean_up_tokenization_spaces=False) == rendered
    # LLaMA-3's template trims contents; no header, no EOS after the template's own end
    assert spans(tok, ex) == ["12 apples.<|eot_id|>", "None: 0.<|eot_id|>"]
    assert ex.input_ids.count(tok.bos_token_id) == 1 and tok.eos_token_id not in ex.input_ids


def test_instruction_under_the_chat_template_is_fed_as_eval_feeds_it(tokenizers):
    tok = tokenizers["bpe"]
    record = {"instruction": "Sum.", "input": "2 3", "output": "5"}
    (ex,) = build_examples("c", [record], "alpaca", tok, "chat", 4096, False)
    fed = prompt_ids(tok, [prompt_text(record, tok, "chat")])[0]
    assert ex.input_ids[: len(fed)] == fed
    assert ex.labels[: len(fed)] == [IGNORE_INDEX] * len(fed)
    assert spans(tok, ex) == ["5<|eot_id|>"]


def test_template_that_rewrites_earlier_turns_is_handled_exactly(tokenizers):
    tok = tokenizers["bpe"]
    tok.chat_template = rt.QWEN3_TEMPLATE
    try:
        messages = conversation(
            "q1", "<think>\nfirst thoughts\n</think>\n\na1", "q2", "<think>\nr2\n</think>\n\na2"
        )
        (ex,) = build_examples("c", [{"messages": messages}], "chat", tok, "alpaca", 4096, False)
        rendered = tok.apply_chat_template(messages, tokenize=False)
        assert "first thoughts" not in rendered  # the template dropped the earlier reasoning
        assert tok.decode(ex.input_ids[1:], clean_up_tokenization_spaces=False) == rendered
        assert spans(tok, ex) == ["a1<|im_end|>", "<think>\nr2\n</think>\n\na2<|im_end|>"]
        # every turn's targets follow exactly the generation prompt of that turn
        for k in (1, 3):
            fed = tok.apply_chat_template(messages[:k], tokenize=False, add_generation_prompt=True)
            assert rendered.startswith(fed)
    finally:
        tok.chat_template = rt.LLAMA3_TEMPLATE


def test_template_that_renders_a_prefix_differently_is_refused(tokenizers):
    tok = tokenizers["bpe"]
    tok.chat_template = rt.COUNTING_TEMPLATE
    try:
        records = [{"messages": conversation("q1", "a1")}, {"messages": conversation("q", "a")}]
        with pytest.raises(S2FTError) as err:
            build_examples("chats.jsonl", records, "chat", tok, "alpaca", 4096, False)
        message = str(err.value)
        assert "chats.jsonl: record 1" in message and "rewrites earlier turns" in message
        assert "'Turns: 1" in message and "one record per assistant turn" in message
    finally:
        tok.chat_template = rt.LLAMA3_TEMPLATE


def test_chat_with_the_sentencepiece_tokenizer(tokenizers):
    if "llama2" not in tokenizers:
        pytest.skip("LLaMA-2 tokenizer not present beside the repository")
    tok = tokenizers["llama2"]
    tok.chat_template = (  # LLaMA-2-chat's shape: [INST] ... [/INST] answer </s>
        "{% for m in messages %}{% if m['role'] == 'user' %}{{ bos_token + '[INST] ' + "
        "m['content'] + ' [/INST]' }}{% else %}{{ ' ' + m['content'] + ' ' + eos_token }}"
        "{% endif %}{% endfor %}"
    )
    messages = conversation("2 + 3?", "5", "and 4 + 4?", "8.")
    (ex,) = build_examples("c", [{"messages": messages}], "chat", tok, "alpaca", 4096, False)
    rendered = tok.apply_chat_template(messages, tokenize=False)
    assert tok.decode(ex.input_ids, clean_up_tokenization_spaces=False) == rendered
    assert [s.strip() for s in spans(tok, ex)] == ["5 </s>", "8. </s>"]
    assert ex.input_ids.count(tok.eos_token_id) == 2  # the template's own, none appended


def recipe_for(tmp_path, model: Path, data: Path, fmt: str, template="alpaca", **extra) -> Path:
    lines = [
        f"model: {{name_or_path: {model}}}",
        f"data: {{train: {{path: {data}, format: {fmt}}}, prompt_template: {template}, "
        + ", ".join(f"{k}: {v}" for k, v in extra.items())
        + "}",
        "s2ft: {targets: {o_proj: 0.5}}",
        "train: {batch_size: 2}",
        f"output_dir: {tmp_path / 'run'}",
    ]
    path = tmp_path / "r.yaml"
    path.write_text("\n".join(lines) + "\n")
    return path


def test_s2ft_data_writes_the_exact_tokens_without_loading_weights(tmp_path):
    from typer.testing import CliRunner

    from s2ft_cli.cli import app

    folder = rt.bpe_folder(tmp_path / "tokenizer")  # tokenizer files only: no weights
    assert not any(folder.glob("*.safetensors")) and not (folder / "config.json").exists()
    tok = rt.load(folder)
    records = [{"instruction": "Sum.", "input": "", "output": r} for r in RESPONSES]
    data = tmp_path / "d.json"
    data.write_text(json.dumps(records))
    result = CliRunner().invoke(
        app,
        ["data", str(recipe_for(tmp_path, folder, data, "alpaca", val_size=0)), "--show", "2",
         "--json", str(tmp_path / "out.json")],
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    assert len(re.findall(r"training example \d+:", result.output)) == 2
    assert result.output.count("[[") == 3  # each example's targets, and the legend
    rows = json.loads((tmp_path / "out.json").read_text())
    assert len(rows) == len(records)
    by_text = {}
    for row in rows:
        ids, labels = row["input_ids"], row["labels"]
        by_text[tok.decode(ids[1:-1], clean_up_tokenization_spaces=False)] = (ids, labels)
    prompt = alpaca_prompt("Sum.")
    fed = prompt_ids(tok, [prompt])[0]
    for r in RESPONSES:
        ids, labels = by_text[prompt + r]  # every text, character for character
        assert ids[: len(fed)] == fed and labels[: len(fed)] == [IGNORE_INDEX] * len(fed)
        assert labels[len(fed) :] == ids[len(fed) :] and ids[-1] == tok.eos_token_id


def test_s2ft_data_chat_records_and_statistics(tmp_path):
    from typer.testing import CliRunner

    from s2ft_cli.cli import app

    folder = rt.bpe_folder(tmp_path / "tokenizer")
    tok = rt.load(folder)
    chats = [
        {"messages": conversation("How many apples?", "12 apples.")},
        {"messages": conversation("q" * 30, "a", "And pears?", "None.")},
        {"messages": conversation("x " * 200, "too late")},  # its answer lies past max_seq_len
    ]
    data = tmp_path / "c.jsonl"
    data.write_text("\n".join(json.dumps(c) for c in chats))
    recipe = recipe_for(tmp_path, folder, data, "chat", max_seq_len=96)
    result = CliRunner().invoke(app, ["data", str(recipe), "--json", str(tmp_path / "o.json")])
    assert result.exit_code == 0, result.output
    rows = json.loads((tmp_path / "o.json").read_text())
    assert len(rows) == 2  # the third record is dropped, and said so
    # records 3, examples 2, dropped 1, truncated 0
    assert re.search(r"│\s*3\s*│\s*2\s*│\s*1\s*│\s*0\s*│", result.output), result.output
    for chat, row in zip(chats, rows, strict=False):
        rendered = tok.apply_chat_template(chat["messages"], tokenize=False)
        assert tok.decode(row["input_ids"], clean_up_tokenization_spaces=False) == rendered
        learned = [t for t in row["labels"] if t != IGNORE_INDEX]
        contents = [m["content"] for m in chat["messages"] if m["role"] == "assistant"]
        assert tok.decode(learned) == "<|eot_id|>".join(contents) + "<|eot_id|>"
    lengths = [len(r["input_ids"]) for r in rows]  # one micro-batch of 2 (epoch order)
    padding = 1 - sum(lengths) / (2 * max(lengths))
    assert f"{padding:.1%}" in result.output
