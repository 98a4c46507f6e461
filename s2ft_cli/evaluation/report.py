"""Scoring outputs and reporting results: ``results.json``, ``predictions.jsonl``, tables.

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

from rich.table import Table

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


def _percent(x: float) -> str:
    return f"{100 * x:.1f}"


def _with_interval(r: dict) -> str:
    """An accuracy with its 95 % interval, e.g. ``56.6 (52.2–60.9)``."""
    if "ci95" not in r:  # results written before intervals were recorded
        return _percent(r["accuracy"])
    low, high = r["ci95"]
    return f"{_percent(r['accuracy'])} ({_percent(low)}–{_percent(high)})"


def results_table(title: str, results: dict) -> Table:
    """One model's accuracy per task, then each group's average (and speed when timed)."""
    timing = results.get("timing", {})
    table = Table(title=title, title_justify="left")
    columns = ("task", "n", "correct", "accuracy % (95% CI)")
    for col in columns + (("examples/s",) if timing else ()):
        table.add_column(col, justify="left" if col == "task" else "right")
    for name, r in results["tasks"].items():
        speed = (f"{timing[name]['examples_per_s']:.1f}",) if name in timing else ()
        table.add_row(name, str(r["n"]), str(r["correct"]), _with_interval(r), *speed)
    if results["groups"]:
        table.add_section()
    for group, g in results["groups"].items():
        blank = ("",) if timing else ()
        table.add_row(f"{group} (avg)", str(g["n"]), "", _percent(g["accuracy"]), *blank)
    return table


def comparison_table(named: dict[str, dict]) -> Table:
    """Accuracy per task (rows), with its 95 % interval, for several models or adapters
    (columns)."""
    table = Table(
        title="accuracy % (95% confidence interval) by adapter",
        title_justify="left",
        caption="intervals: Wilson score intervals over the task's n examples",
        caption_justify="left",
    )
    table.add_column("task")
    table.add_column("n", justify="right")
    for name in named:
        table.add_column(name, justify="right")
    first = next(iter(named.values()))
    for task in first["tasks"]:
        cells = [_with_interval(r["tasks"][task]) for r in named.values()]
        table.add_row(task, str(first["tasks"][task]["n"]), *cells)
    if first["groups"]:
        table.add_section()
    for group in first["groups"]:
        averages = (_percent(r["groups"][group]["accuracy"]) for r in named.values())
        table.add_row(f"{group} (avg)", str(first["groups"][group]["n"]), *averages)
    return table
