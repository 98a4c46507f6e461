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
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple

import torch

from .arithmetic import arithmetic_problems
from .errors import S2FTError
from .tokenization import (
    IGNORE_INDEX,
    ChatRecordError,
    Document,
    Example,
    Instruction,
    chat_examples,
    document_examples,
    instruction_examples,
)

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


def _parse(record, fmt: str, prompt_template: str) -> Instruction | Document | list[dict]:
    """A record as an instruction, a document, or a conversation (a message list; an
    instruction record under ``prompt_template: chat`` becomes a user/assistant one)."""
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
        return Instruction(alpaca_prompt(instruction, extra), output)
    if fmt == "text":
        return Document(_str_field(record, "text"))
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
        if source.split not in ("train", "test"):
            raise S2FTError(
                f"{path} has the splits train and test (held-out problems), not "
                f"{source.split!r}; set data.*.split to train or test."
            )
        return path, arithmetic_problems(source.limit or 2000, seed, source.split)
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
# Examples


def build_examples(
    name: str,
    records: list,
    fmt: str,
    tokenizer,
    prompt_template: str,
    max_seq_len: int,
    train_on_prompt: bool,
) -> list[Example]:
    """Validate and tokenise every record (see :mod:`s2ft_cli.tokenization`); the first
    malformed one stops with its number. Records whose targets lie wholly beyond
    ``max_seq_len`` are dropped (the caller can report ``len(records) - len(result)``), as
    LLM-Adapters' cut-off does."""
    expected = {
        "chat": "{'messages': [{'role': ..., 'content': ...}, ...]}",
        "text": "{'text': ...}",
    }.get(fmt, "{'instruction': ..., 'input': ... (optional), 'output': ...}")
    parsed = []
    for n, record in enumerate(records, 1):
        try:
            parsed.append(_parse(record, fmt, prompt_template))
        except ValueError as err:
            raise S2FTError(
                f"{name}: record {n} is malformed: {err}. Fix or remove it; the {fmt} format "
                f"expects {expected}."
            ) from None
    examples: list[Example | None] = [None] * len(parsed)
    instructions = [k for k, part in enumerate(parsed) if isinstance(part, Instruction)]
    made = instruction_examples(
        [parsed[k] for k in instructions], tokenizer, max_seq_len, train_on_prompt
    )
    for k, example in zip(instructions, made, strict=True):
        if example is None:
            raise S2FTError(
                f"{name}: record {k + 1}: no tokenisation of its response after its prompt "
                "decodes to the text of the whole record (the tokenizer merges characters "
                "across the boundary and changes the response when it stands alone). Start "
                "the response differently (e.g. without leading spaces)."
            )
        examples[k] = example
    documents = [k for k, part in enumerate(parsed) if isinstance(part, Document)]
    made = document_examples([parsed[k].text for k in documents], tokenizer, max_seq_len)
    for k, example in zip(documents, made, strict=True):
        examples[k] = example
    chats = [k for k, part in enumerate(parsed) if isinstance(part, list)]
    try:
        made = chat_examples([parsed[k] for k in chats], tokenizer, max_seq_len, train_on_prompt)
    except ChatRecordError as err:
        raise S2FTError(f"{name}: record {chats[err.index] + 1}: {err}.") from None
    for k, example in zip(chats, made, strict=True):
        examples[k] = example
    kept = [e for e in examples if any(label != IGNORE_INDEX for label in e.labels)]
    if not kept:
        raise S2FTError(
            f"{name}: no record has a target token within max_seq_len {max_seq_len} (the "
            "prompts fill it); raise data.max_seq_len."
        )
    return kept


@dataclass
class SourceStats:
    """What became of one data source's records."""

    name: str
    records: int
    examples: int  # kept: some target token within max_seq_len
    truncated: int  # kept, but cut at max_seq_len
    max_seq_len: int

    @property
    def note(self) -> str | None:
        """A line for the run's log when records were dropped."""
        dropped = self.records - self.examples
        if not dropped:
            return None
        return (
            f"{self.name}: {dropped} of {self.records} records have no target token within "
            f"max_seq_len {self.max_seq_len} and are skipped"
        )


class Datasets(NamedTuple):
    train: list[Example]
    validation: list[Example]
    sources: list[SourceStats]


def load_datasets(data, seed: int, tokenizer) -> Datasets:
    """A recipe's ``data:`` section as training and validation examples, tokenised and
    checked, with what became of each source's records (``seed`` draws generated records
    and the validation split)."""

    def examples(source) -> list[Example]:
        name, records = load_records(source, seed)
        kept = build_examples(
            name,
            records,
            source.format,
            tokenizer,
            data.prompt_template,
            data.max_seq_len,
            data.train_on_prompt,
        )
        truncated = sum(e.truncated for e in kept)
        sources.append(SourceStats(name, len(records), len(kept), truncated, data.max_seq_len))
        return kept

    sources: list[SourceStats] = []
    train = examples(data.train)
    if data.validation is not None:
        return Datasets(train, examples(data.validation), sources)
    return Datasets(*split_validation(train, data.val_size, seed), sources)


def epoch_order(count: int, seed: int, epoch: int) -> list[int]:
    """The seeded order in which an epoch takes the training examples."""
    g = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    return torch.randperm(count, generator=g).tolist()


@dataclass
class StepPlan:
    """Which training examples each micro-batch of each process takes at each optimizer
    step. An epoch is a seeded order of the ``examples``; step ``s`` takes the next
    ``global_batch = batch_size × world × grad_accum`` of it (an epoch's remainder is
    left out), and micro-batch ``m`` of process ``r`` is the ``m·world + r``-th slice of
    ``batch_size`` in it. So the examples of a step do not depend on how it is split."""

    examples: int
    batch_size: int
    world: int
    grad_accum: int
    seed: int
    _order: tuple[int, list[int]] = field(default=(-1, []), init=False, repr=False)

    @property
    def global_batch(self) -> int:
        return self.batch_size * self.world * self.grad_accum

    @property
    def steps_per_epoch(self) -> int:
        return self.examples // self.global_batch

    def epoch_order(self, epoch: int) -> list[int]:
        """The seeded data order of an epoch (computed once per epoch)."""
        if self._order[0] != epoch:
            self._order = (epoch, epoch_order(self.examples, self.seed, epoch))
        return self._order[1]

    def step_examples(self, step: int) -> list[int]:
        """The example ids of optimizer step ``step`` (0-based), over all processes."""
        epoch, within = divmod(step, self.steps_per_epoch)
        start = within * self.global_batch
        return self.epoch_order(epoch)[start : start + self.global_batch]

    def micro_batch(self, step: int, rank: int, m: int) -> list[int]:
        """The example ids micro-batch ``m`` of process ``rank`` takes at ``step``."""
        offset = (m * self.world + rank) * self.batch_size
        return self.step_examples(step)[offset : offset + self.batch_size]


def target_count(example: Example) -> int:
    """The tokens whose next-token loss is taken (labels shifted by one, as the loss is)."""
    return sum(label != IGNORE_INDEX for label in example.labels[1:])


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
