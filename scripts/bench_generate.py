"""Greedy generation (``s2ft eval``'s default mode): s2ft's own decoding loop (the prompts'
common beginning read once, finished rows leaving the batch) against transformers'
``generate``, alternating in one process.

Per task, ``--rounds`` rounds each time both loops on the same prompts (the order
alternates between rounds); printed: the median examples/s of each, their ratio, and how
many outputs differ (none may).

    python scripts/bench_generate.py --model smollm2-135m-instruct --prompt-template chat
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

import torch
from bench_loglik import alternating  # this folder: the same alternating rounds
from rich.console import Console
from rich.table import Table

from s2ft_cli.data import prompt_ids
from s2ft_cli.engine.models import load_model, load_tokenizer
from s2ft_cli.evaluation import decoding
from s2ft_cli.evaluation.tasks import resolve_tasks
from s2ft_cli.recipe import EvalSection

SHARED = Path(__file__).resolve().parents[2] / "shared"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--prompt-template", default="chat", help="alpaca | chat")
    parser.add_argument("--data-dir", default=str(SHARED / "data" / "llm-adapters" / "dataset"))
    parser.add_argument("--tasks", default="boolq,ARC-Easy,gsm8k")
    parser.add_argument("--limit", type=int, default=64, help="records per task")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--json", dest="json_path", help="write the measurements here")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    console = Console()
    model, tokenizer = load_model(args.model).eval(), load_tokenizer(args.model)
    settings = EvalSection(batch_size=args.batch_size, max_new_tokens=args.max_new_tokens)
    table = Table(
        title=f"greedy generation examples/s — {args.model}, {args.limit} records, batch "
        f"{args.batch_size}, {args.max_new_tokens} new tokens, median of {args.rounds}",
        title_justify="left",
    )
    for column in ("task", "generate", "own loop", "own / generate", "outputs differing"):
        table.add_column(column, justify="left" if column == "task" else "right")
    rows = []
    for task in resolve_tasks(args.tasks):
        records = json.loads((Path(args.data_dir) / task.name / "test.json").read_text())
        records = records[: args.limit]
        texts = [decoding.prompt_text(r, tokenizer, args.prompt_template) for r in records]
        prompts = prompt_ids(tokenizer, texts)
        timed, outputs = alternating(
            args.rounds, len(records),
            lambda own, prompts=prompts, task=task: decoding.generate(
                model, tokenizer, prompts, settings, task, torch.device("cpu"), own_loop=own
            ),
        )  # fmt: skip
        differing = sum(a != b for a, b in zip(outputs[True], outputs[False], strict=True))
        reference, own = statistics.median(timed[False]), statistics.median(timed[True])
        table.add_row(
            task.name, f"{reference:.1f}", f"{own:.1f}", f"{own / reference:.2f}×",
            str(differing),
        )  # fmt: skip
        rows.append(
            {"task": task.name, "records": len(records), "generate_per_s": timed[False],
             "own_loop_per_s": timed[True], "ratio": own / reference,
             "outputs_differing": differing}
        )  # fmt: skip
        assert differing == 0, f"{task.name}: the loops' outputs differ"
    console.print(table)
    if args.json_path:
        Path(args.json_path).write_text(json.dumps({"args": vars(args), "tasks": rows}, indent=1))


if __name__ == "__main__":
    main()
