"""Data: records from files or hubs -> tokenised, label-masked examples -> padded batches.

Formats: ``llm-adapters`` / ``alpaca`` (JSON or JSONL records with ``instruction``, optional
``input``, ``output``; the paper's training sets), ``chat`` (records with ``messages``),
``text`` (records with ``text``, or a ``.txt`` file of blank-line separated documents) and
``hf`` (any Hugging Face ``datasets`` source: a hub name or a local data file; each row is
read as one of the other formats by its keys). ``builtin:arithmetic`` generates small
arithmetic word problems in the LLM-Adapters format, so the quickstart needs no download.

Every record is checked before training; a malformed one stops the run with the file, the
record number and what is wrong.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path

import torch

from .errors import S2FTError

# The Alpaca prompt the paper's training and evaluation use (Stanford Alpaca / LLM-Adapters).
ALPACA_PROMPT = (
    "Below is an instruction that describes a task. Write a response that appropriately "
    "completes the request.\n\n### Instruction:\n{instruction}\n\n### Response:\n"
)
ALPACA_PROMPT_WITH_INPUT = (
    "Below is an instruction that describes a task, paired with an input that provides "
    "further context. Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"
)
FORMATS = ("llm-adapters", "alpaca", "chat", "text", "hf")
BUILTIN_PREFIX = "builtin:"
IGNORE_INDEX = -100


def user_message(instruction: str, input: str = "") -> str:
    """An instruction record's user turn under ``prompt_template: chat``."""
    return f"{instruction}\n\n{input}" if input else instruction


def alpaca_prompt(instruction: str, input: str = "") -> str:
    """The prompt of an instruction record, up to and including ``### Response:``."""
    if input:
        return ALPACA_PROMPT_WITH_INPUT.format(instruction=instruction, input=input)
    return ALPACA_PROMPT.format(instruction=instruction)


# ---------------------------------------------------------------------------------------
# Records


def arithmetic_problems(count: int, seed: int = 0) -> list[dict]:
    """Arithmetic word problems with worked answers, in the LLM-Adapters format."""
    rng = random.Random(seed)
    names = ["Tom", "Mia", "Sam", "Ava", "Leo", "Zoe", "Ben", "Ivy"]
    things = ["apples", "books", "coins", "stickers", "marbles", "shells"]
    records = []
    for _ in range(count):
        who, what = rng.choice(names), rng.choice(things)
        a, b = rng.randint(2, 60), rng.randint(2, 40)
        kind = rng.choice(["add", "sub", "mul"])
        if kind == "add":
            q = f"{who} has {a} {what} and gets {b} more. How many {what} does {who} have now?"
            work, ans = f"{a} + {b} = {a + b}", a + b
        elif kind == "sub":
            a, b = max(a, b), min(a, b)
            q = f"{who} has {a} {what} and gives away {b}. How many {what} are left?"
            work, ans = f"{a} - {b} = {a - b}", a - b
        else:
            a, b = a % 12 + 2, b % 9 + 2
            q = f"{who} has {a} bags with {b} {what} in each. How many {what} are there?"
            work, ans = f"{a} * {b} = {a * b}", a * b
        records.append(
            {
                "instruction": q,
                "input": "",
                "output": f"{work}. The answer is {ans}.",
                "answer": str(ans),
            }
        )
    return records


def read_record_file(path: Path) -> list:
    """The records of a JSON list, a JSONL file or a ``.txt`` file of documents."""
    if path.suffix == ".txt":
        docs = [d.strip() for d in path.read_text().split("\n\n")]
        return [{"text": d} for d in docs if d]
    if path.suffix == ".jsonl":
        records = []
        for n, line in enumerate(path.read_text().splitlines(), 1):
            if not line.strip():
                continue
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError as err:
                raise S2FTError(
                    f"{path}: line {n} is not valid JSON ({err}); fix or remove that line (a "
                    ".jsonl file holds one JSON record per line)."
                ) from None
        return records
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise S2FTError(
            f"{path} is not valid JSON ({err}); give a JSON list of records or a .jsonl file "
            "with one record per line."
        ) from None
    if not isinstance(data, list):
        raise S2FTError(
            f"{path} must hold a JSON list of records, not a {type(data).__name__}; wrap the "
            "records in [...] or write one record per line to a .jsonl file."
        )
    return data


def _read_hf(path: str, subset: str | None, split: str) -> list:
    try:
        import datasets
    except ImportError:
        raise S2FTError("format: hf needs the `datasets` package: pip install datasets.") from None
    local = Path(path)
    try:
        if local.is_file():
            builder = {
                ".json": "json",
                ".jsonl": "json",
                ".csv": "csv",
                ".parquet": "parquet",
                ".txt": "text",
            }.get(local.suffix)
            if builder is None:
                raise S2FTError(f"{path}: format hf reads .json, .jsonl, .csv, .parquet or .txt.")
            ds = datasets.load_dataset(builder, data_files=str(local), split=split)
        else:
            ds = datasets.load_dataset(path, subset, split=split)
    except (FileNotFoundError, ValueError, ConnectionError, OSError) as err:
        raise S2FTError(f"Could not load the dataset {path!r} (split {split!r}): {err}") from None
    return list(ds)


@dataclass
class Segment:
    """A piece of an example's text and whether the loss is taken on it."""

    text: str
    target: bool


def _str_field(record: dict, key: str, required: bool = True) -> str:
    value = record.get(key, None if required else "")
    if value is None and not required:
        return ""
    if not isinstance(value, str):
        raise ValueError(
            f"field {key!r} must be a string, got {type(value).__name__}"
            if key in record
            else f"it has no {key!r} field"
        )
    return value


def _segments(record, fmt: str, prompt_template: str) -> list[Segment] | list[dict]:
    """An instruction or text record as segments; a chat record, or an instruction record
    under ``prompt_template: chat``, as a message list."""
    if not isinstance(record, dict):
        raise ValueError(f"a record must be an object, got {type(record).__name__}")
    if fmt == "hf":
        fmt = "chat" if "messages" in record else "text" if "text" in record else "alpaca"
    if fmt in ("llm-adapters", "alpaca"):
        instruction = _str_field(record, "instruction")
        extra, output = _str_field(record, "input", required=False), _str_field(record, "output")
        if prompt_template == "chat":
            return [
                {"role": "user", "content": user_message(instruction, extra)},
                {"role": "assistant", "content": output},
            ]
        return [Segment(alpaca_prompt(instruction, extra), False), Segment(output, True)]
    if fmt == "text":
        return [Segment(_str_field(record, "text"), True)]
    messages = record.get("messages")
    if not isinstance(messages, list) or not messages:
        raise ValueError("it needs a non-empty 'messages' list")
    for m in messages:
        if (
            not isinstance(m, dict)
            or not isinstance(m.get("content"), str)
            or m.get("role") not in ("system", "user", "assistant")
        ):
            raise ValueError(
                "each message needs a 'role' (system, user or assistant) and a string 'content'"
            )
    if not any(m["role"] == "assistant" for m in messages):
        raise ValueError("it has no assistant message to learn from")
    return messages


def load_records(source, seed: int = 0) -> tuple[str, list]:
    """Read a data source (a recipe's ``data.train`` / ``data.validation``): its name for
    messages, and its raw records."""
    path = source.path
    if path.startswith(BUILTIN_PREFIX):
        name = path[len(BUILTIN_PREFIX) :]
        if name != "arithmetic":
            raise S2FTError(f"Unknown built-in dataset {path!r}; available: builtin:arithmetic.")
        return path, arithmetic_problems(source.limit or 2000, seed)
    if source.format == "hf":
        records = _read_hf(path, source.subset, source.split)
    else:
        file = Path(path)
        if not file.is_file():
            raise S2FTError(
                f"Data file {file} does not exist. Check data.*.path (relative paths in a recipe "
                "resolve against its folder, those given on the command line against the "
                "current folder)."
            )
        records = read_record_file(file)
    if source.limit is not None:
        records = records[: source.limit]
    if not records:
        raise S2FTError(f"{path} holds no records.")
    return path, records


# ---------------------------------------------------------------------------------------
# Tokenisation


@dataclass
class Example:
    input_ids: list[int]
    labels: list[int]


def require_chat_template(tokenizer) -> None:
    """Refuse the chat prompt template for a tokenizer that has no chat template."""
    if not getattr(tokenizer, "chat_template", None):
        raise S2FTError(
            "prompt_template: chat (or chat records) needs a tokenizer with a chat template; "
            "this tokenizer has none. Use prompt_template: alpaca or a chat model's tokenizer."
        )


def _chat_segments(messages: list[dict], tokenizer) -> list[Segment]:
    """Split a rendered chat into segments at message boundaries: assistant turns are
    targets. Each boundary is where the template renders the conversation so far."""
    require_chat_template(tokenizer)
    segments, done = [], ""
    for i, message in enumerate(messages):
        text = tokenizer.apply_chat_template(messages[: i + 1], tokenize=False)
        segments.append(Segment(text[len(done) :], message["role"] == "assistant"))
        done = text
    return segments


def bos_token_id(tokenizer) -> int | None:
    """The BOS id when the tokenizer itself puts one in front of a text, else None."""
    probe = tokenizer("a")["input_ids"]
    return tokenizer.bos_token_id if probe[:1] == [tokenizer.bos_token_id] else None


def _assemble(
    segments: list[Segment],
    prefix_ids: list[list[int]],
    tokenizer,
    bos: int | None,
    max_seq_len: int,
    train_on_prompt: bool,
) -> Example:
    """Token ids and labels of one example from the ids of its growing text prefixes."""
    ids: list[int] = []
    labels: list[int] = []
    for seg, upto in zip(segments, prefix_ids, strict=True):
        new = upto[len(ids) :]
        ids += new
        labels += new if (seg.target or train_on_prompt) else [IGNORE_INDEX] * len(new)
    if bos is not None and (not ids or ids[0] != bos):
        ids, labels = [bos] + ids, [IGNORE_INDEX] + labels
    if tokenizer.eos_token_id is not None:
        ids, labels = ids + [tokenizer.eos_token_id], labels + [tokenizer.eos_token_id]
    return Example(ids[:max_seq_len], labels[:max_seq_len])


def tokenize(
    all_segments: list[list[Segment]],
    tokenizer,
    max_seq_len: int,
    train_on_prompt: bool,
    chunk: int = 1024,
) -> list[Example]:
    """Token ids and labels of each example: BOS if the tokenizer uses one, the segments,
    EOS; labels are -100 outside target segments (unless ``train_on_prompt``); truncated to
    ``max_seq_len``. Segment boundaries come from tokenising the growing prefixes of the
    text (in batches), so tokens merged across a boundary are kept as the tokenizer makes
    them."""
    prefixes = []
    for segments in all_segments:
        text = ""
        for seg in segments:
            text += seg.text
            prefixes.append(text)
    ids = []
    for i in range(0, len(prefixes), chunk):
        ids += tokenizer(prefixes[i : i + chunk], add_special_tokens=False, verbose=False)[
            "input_ids"
        ]
    bos = bos_token_id(tokenizer)
    examples, at = [], 0
    for segments in all_segments:
        examples.append(
            _assemble(
                segments, ids[at : at + len(segments)], tokenizer, bos, max_seq_len, train_on_prompt
            )
        )
        at += len(segments)
    return examples


def build_examples(
    name: str,
    records: list,
    fmt: str,
    tokenizer,
    prompt_template: str,
    max_seq_len: int,
    train_on_prompt: bool,
) -> list[Example]:
    """Validate and tokenise every record; the first malformed one stops with its number.
    Records whose targets lie wholly beyond ``max_seq_len`` are dropped (the caller can
    report ``len(records) - len(result)``), as LLM-Adapters' cut-off does."""
    expected = {
        "chat": "{'messages': [{'role': ..., 'content': ...}, ...]}",
        "text": "{'text': ...}",
    }.get(fmt, "{'instruction': ..., 'input': ... (optional), 'output': ...}")
    all_segments = []
    for n, record in enumerate(records, 1):
        try:
            parts = _segments(record, fmt, prompt_template)
        except ValueError as err:
            raise S2FTError(
                f"{name}: record {n} is malformed: {err}. Fix or remove it; the {fmt} format "
                f"expects {expected}."
            ) from None
        if isinstance(parts[0], dict):
            parts = _chat_segments(parts, tokenizer)
        all_segments.append(parts)
    examples = tokenize(all_segments, tokenizer, max_seq_len, train_on_prompt)
    kept = [e for e in examples if any(label != IGNORE_INDEX for label in e.labels)]
    if not kept:
        raise S2FTError(
            f"{name}: no record has a target token within max_seq_len {max_seq_len} (the "
            "prompts fill it); raise data.max_seq_len."
        )
    return kept


def split_validation(
    examples: list[Example], val_size: int, seed: int
) -> tuple[list[Example], list[Example]]:
    """Carve ``val_size`` examples out of the training set (seeded)."""
    if val_size == 0:
        return examples, []
    if val_size >= len(examples):
        raise S2FTError(
            f"data.val_size is {val_size} but the training set has only {len(examples)} "
            "records; lower val_size or give data.validation."
        )
    order = torch.randperm(len(examples), generator=torch.Generator().manual_seed(seed))
    val = set(order[:val_size].tolist())
    return ([e for i, e in enumerate(examples) if i not in val], [examples[i] for i in sorted(val)])


def collate(examples: list[Example], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-pad to the longest example of the batch (dynamic padding)."""
    width = max(len(e.input_ids) for e in examples)
    ids = torch.full((len(examples), width), pad_id, dtype=torch.long)
    labels = torch.full((len(examples), width), IGNORE_INDEX, dtype=torch.long)
    mask = torch.zeros((len(examples), width), dtype=torch.long)
    for i, e in enumerate(examples):
        n = len(e.input_ids)
        ids[i, :n] = torch.tensor(e.input_ids)
        labels[i, :n] = torch.tensor(e.labels)
        mask[i, :n] = 1
    return {"input_ids": ids, "labels": labels, "attention_mask": mask}


def calibration_batches(
    examples: list[Example], samples: int, batch_size: int, seed: int, pad_id: int
) -> list[dict[str, torch.Tensor]]:
    """A seeded draw of ``samples`` examples (in their order in the set), in padded batches:
    what the data-driven selection strategies measure on (``s2ft.calibration``)."""
    order = torch.randperm(len(examples), generator=torch.Generator().manual_seed(seed))
    chosen = [examples[i] for i in sorted(order[:samples].tolist())]
    return [collate(chosen[i : i + batch_size], pad_id) for i in range(0, len(chosen), batch_size)]
