"""A recipe's data as examples: every record checked and tokenised, the validation split,
and what became of each source's records. A malformed record stops the run with the file,
the record number and what is wrong."""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

from ..errors import S2FTError
from .batches import seeded_subset
from .records import load_records
from .templates import parse_record
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


def build_examples(
    name: str,
    records: list,
    fmt: str,
    tokenizer,
    prompt_template: str,
    max_seq_len: int,
    train_on_prompt: bool,
) -> list[Example]:
    """Validate and tokenise every record (see :mod:`.tokenization`); the first
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
            parsed.append(parse_record(record, fmt, prompt_template))
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
    train = [example for source in data.train_sources for example in examples(source)]
    if data.validation is not None:
        return Datasets(train, examples(data.validation), sources)
    return Datasets(*split_validation(train, data.val_size, seed), sources)


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
    val = seeded_subset(len(examples), val_size, seed)
    held = set(val)
    return [e for i, e in enumerate(examples) if i not in held], [examples[i] for i in val]
