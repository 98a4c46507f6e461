"""Likelihood scoring (``s2ft eval --mode loglik``): each question's shared prefix read once
against every choice read whole, alternating in one process.

Per task, ``--rounds`` rounds each time both readings of the same records (the order
alternates between rounds); printed: the median examples/s of each, their ratio, and how
far apart their log-likelihoods and answers are (they must agree within 1e-4).

    python scripts/bench_loglik.py --model smollm2-135m-instruct --prompt-template chat
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

import torch
from rich.console import Console
from rich.table import Table

from s2ft_cli.engine.models import load_model, load_tokenizer
from s2ft_cli.evaluation import decoding
from s2ft_cli.evaluation.tasks import resolve_tasks

SHARED = Path(__file__).resolve().parents[2] / "shared"
T = TypeVar("T")
TASKS = "boolq,piqa,social_i_qa,ARC-Challenge,ARC-Easy,openbookqa,winogrande"


def alternating(rounds: int, count: int, work: Callable[[bool], T]):
    """``work(True)`` and ``work(False)``, ``rounds`` times each after a warm-up round, the
    order alternating between rounds: each one's examples/s (``count`` examples a call) and
    its last result."""
    timed: dict[bool, list[float]] = {True: [], False: []}
    results: dict[bool, T] = {}
    for k in range(rounds + 1):  # round 0 warms up
        for which in (True, False) if k % 2 else (False, True):
            start = time.perf_counter()
            results[which] = work(which)
            if k:
                timed[which].append(count / (time.perf_counter() - start))
    return timed, results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--prompt-template", default="chat", help="alpaca | chat")
    parser.add_argument("--data-dir", default=str(SHARED / "data" / "llm-adapters" / "dataset"))
    parser.add_argument("--tasks", default=TASKS)
    parser.add_argument("--limit", type=int, default=64, help="records per task")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--json", dest="json_path", help="write the measurements here")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    console = Console()
    model, tokenizer = load_model(args.model).eval(), load_tokenizer(args.model)
    table = Table(
        title=f"loglik examples/s — {args.model}, {args.limit} records, batch "
        f"{args.batch_size}, median of {args.rounds}",
        title_justify="left",
    )
    for column in ("task", "choices", "whole", "shared", "shared / whole", "max |Δ log p|"):
        table.add_column(column, justify="left" if column == "task" else "right")
    rows = []
    for task in resolve_tasks(args.tasks):
        records = json.loads((Path(args.data_dir) / task.name / "test.json").read_text())
        records = records[: args.limit]
        timed, scores = alternating(
            args.rounds, len(records),
            lambda share, records=records, task=task: decoding.answer_logliks(
                model, tokenizer, records, task, args.prompt_template, args.batch_size,
                torch.device("cpu"), share_prefixes=share,
            ),
        )  # fmt: skip
        pairs = list(zip(scores[True], scores[False], strict=True))
        gap = max(abs(a[label] - b[label]) for a, b in pairs for label in a)
        same = sum(decoding.best_label(a) == decoding.best_label(b) for a, b in pairs)
        whole, shared = statistics.median(timed[False]), statistics.median(timed[True])
        choices = statistics.mean(len(s) for s in scores[True])
        table.add_row(
            task.name, f"{choices:.1f}", f"{whole:.1f}", f"{shared:.1f}",
            f"{shared / whole:.2f}×", f"{gap:.1e}",
        )  # fmt: skip
        rows.append(
            {"task": task.name, "records": len(records), "whole_per_s": timed[False],
             "shared_per_s": timed[True], "ratio": shared / whole, "max_abs_diff": gap,
             "same_answers": same}
        )  # fmt: skip
        assert gap <= 1e-4 and same == len(records), f"{task.name}: the readings disagree"
    console.print(table)
    if args.json_path:
        Path(args.json_path).write_text(json.dumps({"args": vars(args), "tasks": rows}, indent=1))


if __name__ == "__main__":
    main()
