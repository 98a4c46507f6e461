"""Scoring outputs and reporting results: ``results.json``, ``predictions.jsonl`` (their
tables: :mod:`s2ft_cli.tables`).

``results.json`` holds ``{"tasks": {name: {"accuracy", "correct", "n", "ci95"}}, "groups":
{group: {"accuracy", "n", "tasks"}}}``; ``ci95`` is a task's 95 % Wilson interval, a group's
accuracy the mean of its tasks' accuracies (the paper's "Avg."). ``predictions.jsonl`` holds
one object per example with ``task``, ``prompt``, ``output``, ``prediction``, ``answer`` and
``correct``; re-scoring it needs only ``task``, ``output`` and ``answer`` of each line.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

from ..errors import S2FTError
from ..files import atomic_write_text
from .tasks import GROUPS, TASKS, Task, task_named

RESULTS = "results.json"
PREDICTIONS = "predictions.jsonl"


def score(rows: list[dict], source: str, task: Task | None = None) -> list[dict]:
    """Each row (``task``, ``output``, ``answer``, anything else) with its extracted
    ``prediction`` and whether it is ``correct``; a malformed row stops with its number.
    Rows without ``task`` are of ``task`` when one is given."""
    scored = []
    for n, row in enumerate(rows, 1):
        try:
            if not isinstance(row, dict):
                raise ValueError(f"it must be an object, got {type(row).__name__}")
            if task is not None:
                row = {"task": task.name} | row
            missing = [k for k in ("task", "output", "answer") if k not in row]
            if missing:
                raise ValueError(f"it has no {', '.join(map(repr, missing))}")
            if not isinstance(row["output"], str):
                raise ValueError("'output' must be a string")
            row_task = task_named(row["task"])
            gold = row_task.gold(row["answer"])
        except (ValueError, S2FTError) as err:
            raise S2FTError(
                f"{source}: line {n} cannot be scored: {err}. Each line needs 'task' (one of "
                f"{', '.join(TASKS)}), 'output' (the model's text) and 'answer' (the gold answer)."
            ) from None
        prediction = row_task.extract(row["output"])
        correct = row_task.is_correct(prediction, gold)
        if isinstance(prediction, float) and not math.isfinite(prediction):
            prediction = None  # a number too long for a float: never correct, not JSON
        scored.append(row | {"task": row_task.name, "prediction": prediction, "correct": correct})
    return scored


def wilson_interval(correct: int, n: int, z: float = 1.96) -> tuple[float, float]:
    """The 95 % (``z`` = 1.96) Wilson score interval of an accuracy of ``correct`` / ``n``:
    unlike the normal approximation it stays within [0, 1] and is sound near 0 and 1."""
    if n == 0:
        return 0.0, 1.0
    p = correct / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z / (1 + z * z / n) * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    return max(0.0, min(p, centre - half)), min(1.0, max(p, centre + half))  # rounding


def summarize(scored: list[dict]) -> dict:
    """Per-task accuracy and per-group averages of scored rows, tasks in canonical order."""
    counts: dict[str, list[int]] = {}
    for row in scored:
        tally = counts.setdefault(row["task"], [0, 0])
        tally[0] += bool(row["correct"])
        tally[1] += 1
    tasks = {
        name: {
            "accuracy": counts[name][0] / counts[name][1],
            "correct": counts[name][0],
            "n": counts[name][1],
            "ci95": list(wilson_interval(*counts[name])),
        }
        for name in TASKS
        if name in counts
    }
    groups = {}
    for group, members in GROUPS.items():
        present = [m for m in members if m in tasks]
        if present:
            groups[group] = {
                "accuracy": sum(tasks[m]["accuracy"] for m in present) / len(present),
                "n": sum(tasks[m]["n"] for m in present),
                "tasks": present,
            }
    return {"tasks": tasks, "groups": groups}


def writable_folder(out: Path) -> None:
    """Make ``out`` (with its parents) or refuse it, naming the reason."""
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise S2FTError(
            f"Cannot use {out} for results ({err.strerror or err}); give --out a folder that "
            "can be created and written."
        ) from None
    if not os.access(out, os.W_OK):
        raise S2FTError(f"Cannot write to {out}; give --out a folder you can write to.")


def write_results(out: Path, results: dict, predictions: list[dict]) -> None:
    """``results.json`` and ``predictions.jsonl`` in ``out``, each written atomically."""
    writable_folder(out)
    lines = "".join(json.dumps(p, ensure_ascii=False) + "\n" for p in predictions)
    atomic_write_text(out / PREDICTIONS, lines)
    atomic_write_text(out / RESULTS, json.dumps(results, indent=1) + "\n")


def read_predictions(path: Path) -> list[dict]:
    """The lines of a ``predictions.jsonl`` file (blank lines skipped)."""
    if not path.is_file():
        raise S2FTError(
            f"{path} does not exist; give a predictions.jsonl written by s2ft eval (or any "
            "JSONL file whose lines hold task, output and answer)."
        )
    rows = []
    for n, line in enumerate(path.read_text().splitlines(), 1):
        if line.strip():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as err:
                raise S2FTError(f"{path}: line {n} is not valid JSON ({err}).") from None
    if not rows:
        raise S2FTError(f"{path} holds no predictions.")
    return rows


def score_file(path: Path, out: Path, task: Task | None = None) -> dict:
    """Re-score saved outputs without a model (lines without ``task`` are of ``task``);
    writes both files to ``out``."""
    scored = score(read_predictions(path), str(path), task)
    results = {**summarize(scored), "settings": {"score_only": str(path)}}
    write_results(out, results, scored)
    return results
