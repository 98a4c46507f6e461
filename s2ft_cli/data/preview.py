"""``s2ft data``: what a recipe trains on, seen before training (tokenizer and data only).

Examples are shown as the model receives them, special tokens included, with the target
tokens (those the loss is taken on) marked; the statistics say what became of the
records, how long the examples are, what share of their tokens are targets and what
share of a micro-batch is padding at the recipe's batch size.
"""

from __future__ import annotations

import json
import statistics
from dataclasses import dataclass

from rich.console import Console
from rich.text import Text

from ..files import atomic_write_text
from ..tables import examples_table, records_table
from .batches import training_plan
from .examples import Datasets
from .tokenization import IGNORE_INDEX, Example

TARGET_STYLE = "bold green"
OPEN, CLOSE = "[[", "]]"  # marks of target tokens where the console shows no colour


@dataclass
class SetStats:
    """Token statistics of a set of examples."""

    examples: int
    tokens: int
    targets: int
    shortest: int
    median: float
    longest: int
    padding: float  # share of padding in its micro-batches of the recipe's batch size

    @classmethod
    def of(cls, examples: list[Example], batch_size: int, order: list[int]) -> SetStats:
        lengths = [len(e.input_ids) for e in examples]
        targets = sum(sum(label != IGNORE_INDEX for label in e.labels) for e in examples)
        padded = real = 0
        for i in range(0, len(order) - batch_size + 1, batch_size):
            widths = [lengths[k] for k in order[i : i + batch_size]]
            padded += max(widths) * len(widths)
            real += sum(widths)
        return cls(
            examples=len(examples),
            tokens=sum(lengths),
            targets=targets,
            shortest=min(lengths, default=0),
            median=statistics.median(lengths) if lengths else 0,
            longest=max(lengths, default=0),
            padding=1 - real / padded if padded else 0.0,
        )


def marked(tokenizer, example: Example, colour: bool) -> Text:
    """The example's text with its target tokens marked: in colour, or between
    ``[[`` and ``]]``. Runs are cut out of the decoded prefixes, so a tokenizer that
    drops a word-boundary marker at the start of a text loses no space at a run's edge."""
    text = Text()
    flags = [label != IGNORE_INDEX for label in example.labels]
    done, start = "", 0
    for end in range(1, len(flags) + 1):
        if end < len(flags) and flags[end] == flags[start]:
            continue
        upto = tokenizer.decode(example.input_ids[:end], clean_up_tokenization_spaces=False)
        piece = upto[len(done) :]
        if flags[start]:
            text.append(piece, TARGET_STYLE) if colour else text.append(f"{OPEN}{piece}{CLOSE}")
        else:
            text.append(piece)
        done, start = upto, end
    return text


def show(
    console: Console,
    tokenizer,
    data: Datasets,
    count: int,
    batch_size: int,
    seed: int,
    pack_len: int | None = None,
    group_by_length: bool = False,
):
    """Print ``count`` training examples, then the statistics of the sets; the training
    set's as training batches it: packed into rows of ``pack_len`` tokens (data.packing)
    and in the first epoch's order, grouped by length if asked (one process)."""
    colour = console.is_terminal and not console.no_color
    legend = "green" if colour else f"between {OPEN} and {CLOSE}"
    for k, example in enumerate(data.train[:count]):
        n_targets = sum(label != IGNORE_INDEX for label in example.labels)
        cut = ", truncated at max_seq_len" if example.truncated else ""
        console.rule(
            f"training example {k + 1}: {len(example.input_ids)} tokens, {n_targets} targets{cut}"
        )
        console.print(marked(tokenizer, example, colour), highlight=False, markup=False)
    if count:
        console.print(f"(target tokens {legend})", highlight=False)

    console.print(records_table(data.sources))
    if any(s.records > s.examples for s in data.sources):
        console.print(
            "dropped: no target token within max_seq_len; truncated: kept, cut at max_seq_len",
            highlight=False,
        )

    sets = []
    for name, examples in {"train": data.train, "validation": data.validation}.items():
        if not examples:
            continue
        label, order = name, list(range(len(examples)))
        if name == "train":
            examples, plan = training_plan(
                examples, pack_len, batch_size, 1, 1, seed, group_by_length
            )
            order = plan.epoch_order(0)
            if pack_len:
                label = f"train, packed ({len(examples):,} rows)"
        sets.append((label, SetStats.of(examples, batch_size, order)))
    console.print(examples_table(batch_size, sets))
    console.print(
        "targets: share of the tokens the loss is taken on; padding: share of padding in the "
        "micro-batches (training: in the first epoch's order"
        + (", grouped by length" if group_by_length else "")
        + ")",
        highlight=False,
    )


def write_json(path, examples: list[Example]) -> None:
    """``[{"input_ids": [...], "labels": [...]}, ...]``, written atomically."""
    rows = [{"input_ids": e.input_ids, "labels": e.labels} for e in examples]
    atomic_write_text(path, json.dumps(rows))
