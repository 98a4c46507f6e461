"""Real-length data: target tokens per second and padding share of S²FT training steps on
LLM-Adapters' math_data.json tokenised with the LLaMA-2 tokenizer, batched three ways:

* ``padded``: today's batching, examples in a seeded order, each batch padded to its
  longest example;
* ``grouped``: ``train.group_by_length`` (batches of similar length, in a shuffled order);
* ``packed``: ``data.packing`` (whole examples packed into rows of ``--pack-len`` tokens,
  attending only to themselves).

The three trainers run in one process, their steps alternating (the machine's speed
drifts), on the bench-llama shape (12 layers, hidden 768, vocab 32000 as LLaMA-2's);
ratios are against ``padded``, medians over the steps' rounds.

    python scripts/bench_data.py --json docs/results/bench_data_cpu.json   # CPU, 8 rounds
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
MATH = REPO.parent / "shared" / "data" / "llm-adapters" / "ft-training_set" / "math_data.json"
WAYS = ("padded", "grouped", "packed")


def llama2_tokenizer(folder: Path):
    """The LLaMA-2 sentencepiece tokenizer, in the folder the tests build for it."""
    sys.path.insert(0, str(REPO))
    from s2ft_cli.engine.models import load_tokenizer
    from tests.real_tokenizers import llama2_folder

    return load_tokenizer(str(llama2_folder(folder)))


def trainer_for(way: str, args, datasets, out: str):
    from rich.console import Console

    from s2ft_cli.recipe import Recipe
    from s2ft_cli.training.trainer import Trainer

    recipe = Recipe.model_validate(
        {
            "model": {"name_or_path": args.model, "dtype": "float32"},
            "data": {
                "train": str(MATH),
                "max_seq_len": args.pack_len,
                "packing": way == "packed",
            },
            "s2ft": {"targets": {"o_proj": 0.05, "down_proj": 0.02}},
            "train": {
                "batch_size": args.pack_rows if way == "packed" else args.batch,
                "max_steps": args.rounds + 1,
                "group_by_length": way == "grouped",
                "lr": 1e-5,
                "warmup_steps": 0,
                "device": "cpu",
                "seed": 0,
            },
            "output_dir": out,
        }
    )
    trainer = Trainer(recipe, console=Console(quiet=True), datasets=datasets)
    trainer.setup()
    return trainer


def padding_share(trainer, steps: range) -> float:
    """Padded positions over all positions of the given steps' micro-batches."""
    padded = total = 0
    for step in steps:
        for m in range(trainer.plan.grad_accum):
            rows = [
                len(trainer.train_set[i].input_ids) for i in trainer.plan.micro_batch(step, 0, m)
            ]
            padded += max(rows) * len(rows) - sum(rows)
            total += max(rows) * len(rows)
    return padded / total


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="preset:bench-llama")
    ap.add_argument("--batch", type=int, default=16, help="examples per batch (padded, grouped)")
    ap.add_argument("--pack-len", type=int, default=512, help="tokens per packed row")
    ap.add_argument("--pack-rows", type=int, default=6, help="packed rows per batch")
    ap.add_argument("--rounds", type=int, default=8)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--json", dest="json_path")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    from s2ft_cli.data import Datasets, build_examples, load_records
    from s2ft_cli.data.batches import target_count
    from s2ft_cli.recipe import DataSource

    with tempfile.TemporaryDirectory() as tmp:
        tokenizer = llama2_tokenizer(Path(tmp) / "tokenizer")
        name, records = load_records(DataSource(path=str(MATH)), seed=0)
        examples = build_examples(
            name, records, "llm-adapters", tokenizer, "alpaca", args.pack_len, False
        )
        lengths = [len(e.input_ids) for e in examples]
        datasets = Datasets(examples, [], [])
        trainers = {w: trainer_for(w, args, datasets, f"{tmp}/{w}") for w in WAYS}
        speed = {w: [] for w in WAYS}  # target tokens per second, one per round
        for step in range(args.rounds + 1):
            for way, trainer in trainers.items():
                targets = sum(
                    target_count(trainer.train_set[i]) for i in trainer.plan.step_examples(step)
                )
                start = time.perf_counter()
                trainer.train_step(step)
                if step:  # the first round warms up
                    speed[way].append(targets / (time.perf_counter() - start))
        shares = {w: padding_share(t, range(1, args.rounds + 1)) for w, t in trainers.items()}
        for trainer in trainers.values():
            trainer.cleanup()

    ratios = {
        w: statistics.median(a / b for a, b in zip(speed[w], speed["padded"], strict=True))
        for w in WAYS
    }
    mean = statistics.mean(lengths)
    print(
        f"math_data.json: {len(examples)} examples, LLaMA-2 tokenizer, {mean:.0f} tokens on "
        f"average ({min(lengths)}–{max(lengths)}); {args.model} fp32, {args.threads} threads, "
        f"{args.rounds} rounds"
    )
    print(f"{'batching':10s} {'target tok/s':>13s} {'padding':>8s} {'× padded':>9s}")
    for w in WAYS:
        print(f"{w:10s} {statistics.median(speed[w]):13.0f} {shares[w]:8.1%} {ratios[w]:9.2f}")
    if args.json_path:
        result = {
            "settings": vars(args),
            "examples": len(examples),
            "mean_tokens": statistics.mean(lengths),
            "target_tokens_per_s": speed,
            "padding_share": shares,
            "median_ratio_vs_padded": ratios,
        }
        Path(args.json_path).write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
