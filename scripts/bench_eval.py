"""Evaluation throughput: examples/s of `s2ft eval` at several batch sizes, per task and mode.

Each (mode, batch size) runs the same examples ``--repeats`` times after a one-batch warm-up;
the median examples/s is reported with its ratio to the first batch size. Defaults: the
shared stories260K checkpoint and LLM-Adapters test sets beside the repository.

    python scripts/bench_eval.py --limit 200 --batch-sizes 1,16
"""

from __future__ import annotations

import argparse
import statistics
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table

from s2ft_cli.evaluation.runner import Evaluator, TestSet, load_test_sets
from s2ft_cli.recipe import EvalSection

SHARED = Path(__file__).resolve().parents[2] / "shared"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=str(SHARED / "models" / "stories260K"))
    parser.add_argument("--data-dir", default=str(SHARED / "data" / "llm-adapters" / "dataset"))
    parser.add_argument("--tasks", default="boolq,gsm8k")
    parser.add_argument("--modes", default="generate,loglik")
    parser.add_argument("--batch-sizes", default="1,16")
    parser.add_argument("--limit", type=int, default=200)
    parser.add_argument("--max-new-tokens", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--prompt-template", default="alpaca", help="alpaca | chat")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    console = Console()
    quiet = Console(quiet=True)
    sizes = [int(b) for b in args.batch_sizes.split(",")]

    table = Table(
        title=f"s2ft eval examples/s — {Path(args.model).name}, --limit {args.limit}, "
        f"max_new_tokens {args.max_new_tokens}, median of {args.repeats}",
        title_justify="left",
    )
    for col in ("task", "mode", *(f"batch {b}" for b in sizes), f"batch {sizes[-1]} / {sizes[0]}"):
        table.add_column(col, justify="left" if col in ("task", "mode") else "right")
    evaluator = None
    for mode in args.modes.split(","):
        speeds: dict[str, list[float]] = {}
        for size in sizes:
            settings = EvalSection(
                tasks=[args.tasks],
                data_dir=args.data_dir,
                mode=mode,
                batch_size=size,
                limit=args.limit,
                max_new_tokens=args.max_new_tokens,
            )
            sets, _ = load_test_sets(settings)
            if mode == "loglik":
                sets = [s for s in sets if s.task.kind == "label"]
            if evaluator is None:
                evaluator = Evaluator(
                    args.model, settings, "float32", args.prompt_template, console=quiet
                )
            evaluator.settings = settings
            evaluator.run([TestSet(t.task, t.path, t.records[:size]) for t in sets], "warm-up")
            runs = [evaluator.run(sets, "none")[0]["timing"] for _ in range(args.repeats)]
            for test in sets:
                median = statistics.median(r[test.task.name]["examples_per_s"] for r in runs)
                speeds.setdefault(test.task.name, []).append(median)
                console.print(f"{mode} batch {size} {test.task.name}: {median:.1f} examples/s")
        for task, row in speeds.items():
            cells = [f"{s:.1f}" for s in row]
            table.add_row(task, mode, *cells, f"{row[-1] / row[0]:.2f}×")
    console.print(table)


if __name__ == "__main__":
    main()
