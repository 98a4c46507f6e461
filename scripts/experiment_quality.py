"""Does S²FT fine-tune better? S²FT against PEFT LoRA and full fine-tuning on
SmolLM2-135M-Instruct, in the paper's two regimes (commonsense, arithmetic), with a
learning-rate grid per method, seeds, 95% intervals, forgetting and cost (issue 28; the
plan, the tables and what they say: docs/EXPERIMENTS.md).

Every method trains through ``s2ft train``'s own loop (``Trainer``; LoRA and full
fine-tuning as ``scripts/baselines.py`` methods) on the same data, prompt (the model's chat
template), steps and batches, and is evaluated by the same ``s2ft eval`` code on the same
seeded test subsets. Stages, each a list of jobs recorded in the JSON file as it finishes
(a finished job is never redone; one a stop interrupts is redone from its start), run a
regime at a time (its grid, then its finals) so that one regime's tables are whole before
the next regime starts, the base model after the first regime:

1. ``grid``: each method's learning rates, one seed, scored by validation loss; a grid
   whose best rate is at its edge is extended past it (``GRID_EXTENSION``);
2. ``final``: each method at its best rate and every seed of its plan: the regime's test
   sets, the other regime's (seed 0) and the loss of held-out English prose. Seed 0 at the
   best rate is the grid's run: its trained weights, kept from the grid (``--models``,
   deleted once used), are evaluated instead of being trained again;
3. ``base``: the base model on both regimes' tests and the prose.

    python scripts/experiment_quality.py             # the study (≈ 14 hours here)
    python scripts/experiment_quality.py --smoke     # every stage, a step each, minutes
    python scripts/experiment_quality.py --smoke --model DIR  # the same on another model
    python scripts/experiment_quality.py --report    # the tables from the JSON file only
    python scripts/experiment_quality.py --check grid/commonsense/s2ft-r/0.001  # rerun, compare
"""

from __future__ import annotations

import argparse
import functools
import gzip
import json
import math
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from rich.console import Console

from s2ft_cli import merge_adapter
from s2ft_cli.data import Datasets, load_datasets
from s2ft_cli.engine.models import load_model, load_tokenizer
from s2ft_cli.evaluation.runner import Evaluator, TestSet, load_test_sets
from s2ft_cli.files import atomic_write_file, atomic_write_text
from s2ft_cli.recipe import EvalSection, load_recipe
from s2ft_cli.training.methods import S2FT
from s2ft_cli.training.trainer import Trainer, token_loss_sums

REPO = Path(__file__).resolve().parents[1]
DATA = REPO.parent / "shared" / "data" / "llm-adapters" / "dataset"
MODEL = "smollm2-135m-instruct"
PAIR = {"o_proj": 0.1, "down_proj": 0.05}  # S²FT's budget: 2,322,432 weights (1.7%)


# the seven commonsense sets here (HellaSwag, the paper's eighth, has no test file)
COMMONSENSE = [
    "boolq",
    "piqa",
    "social_i_qa",
    "winogrande",
    "ARC-Challenge",
    "ARC-Easy",
    "openbookqa",
]


@dataclass(frozen=True)
class Regime:
    recipe: str
    steps: int
    tasks: list[str]  # the test sets
    max_new_tokens: int


REGIMES = {
    "commonsense": Regime("recipes/smollm2-commonsense.yaml", 250, COMMONSENSE, 32),
    "arithmetic": Regime("recipes/smollm2-math.yaml", 160, ["math"], 192),
}
# method -> learning rates of the grid, seeds of the final runs, recipe overrides
METHODS = {
    "s2ft-r": ([5e-4, 1e-3, 2e-3], 3, {"s2ft.strategy": "random"}),
    "s2ft-a": ([5e-4, 1e-3, 2e-3], 1, {"s2ft.strategy": "activation"}),
    "lora-matched": ([2e-4, 5e-4, 1e-3], 3, {}),
    "lora-16": ([2e-4, 5e-4, 1e-3], 1, {}),
    "full": ([1e-5, 3e-5, 1e-4], 3, {}),
}
# LoRA on o_proj + down_proj with S²FT's weights: r·(576 + 576) + r·(1536 + 576) per layer,
# × 30 layers = 97,920·r; r = 24 gives 2,350,080 (S²FT: 2,322,432)
MATCHED_RANK = 24
# a grid whose best rate is its highest (lowest) did not bracket the optimum: one more rate,
# that one times (divided by) the factor, is tried, while the best is at an edge, at most
# the count's times; the same rule for every method
GRID_EXTENSION = {"factor": 2.0, "at_most": 2}
# every run's data.seed: the seeds vary the selection, initialisation and order over one
# split of the training data into training and validation examples
SPLIT_SEED = 0
TEST_SIZE = 385  # a 95% interval of at most ±5 points at any accuracy (or the whole set)
PROSE_CHUNKS, PROSE_TOKENS = 64, 256
# what a training run costs, as recorded
COST = ("trainable", "steps", "tokens", "train_seconds", "peak_mem_gb", "lr", "seed")


def training_method(method: str):
    from baselines import FullFineTuning, LoRA

    if method.startswith("s2ft"):
        return S2FT()
    if method == "lora-matched":
        return LoRA(r=MATCHED_RANK, alpha=2 * MATCHED_RANK, targets=list(PAIR))
    if method == "lora-16":
        return LoRA(r=16, alpha=32)
    return FullFineTuning(scope="all")


def merged(method: str, model):
    """The fine-tuned model as plain weights in the base's layout."""
    if method.startswith("s2ft"):
        return merge_adapter(model)
    if method.startswith("lora"):
        return model.merge_and_unload()
    return model


def subset(count: int, size: int) -> list[int]:
    """A test set's seeded subset: ``size`` of its ``count`` records (line numbers from 0,
    in file order), or all of them."""
    return sorted(random.Random(0).sample(range(count), min(size, count)))


def floors(sets: list[TestSet]) -> dict[str, dict[str, float]]:
    """What answering without reading the question scores on each choice task's subset:
    ``chance`` (a label drawn uniformly from the question's choices) and ``majority`` (the
    subset's most common gold answer, always)."""
    chance, majority = {}, {}
    for test in sets:
        task = test.task
        if task.kind == "number" or not test.records:
            continue
        offered = [  # a letter task (AQuA) offers A to E
            len(task.candidates(r["instruction"])) if task.kind == "label" else 5
            for r in test.records
        ]
        chance[task.name] = statistics.mean(1 / n for n in offered)
        golds = Counter(str(task.gold(r["answer"])) for r in test.records)
        majority[task.name] = max(golds.values()) / len(test.records)
    return {"chance": chance, "majority": majority}


def environment(threads: int) -> dict:
    """What the figures were measured with."""
    import platform
    from importlib.metadata import version

    machine = {"python": platform.python_version(), "machine": platform.machine()}
    machine |= {"cpus": os.cpu_count(), "threads": threads}
    return machine | {p: version(p) for p in ("torch", "transformers", "peft")}


# ------------------------------------------------------------------------------ data
class Study:
    """The settings of one study (full or smoke), its data and its record."""

    def __init__(self, args):
        self.args, self.smoke, self.model = args, args.smoke, args.model
        self.console = Console(width=160)
        self.tokenizer = load_tokenizer(self.model)
        self.path = Path(args.out)
        self.models = Path(args.models)  # the grid's trained weights, until the finals use them
        self.outputs = self.models.parent / f"{self.path.stem}_outputs"  # every generated answer
        self.record = json.loads(self.path.read_text()) if self.path.is_file() else {}
        self.record.setdefault("jobs", {})
        recorded = self.record.get("settings", {}).get("model", self.model)
        if recorded != self.model:
            raise SystemExit(f"{self.path} records {recorded}: add --model {recorded}")
        methods = {k: {"lrs": v[0], "seeds": v[1], "overrides": v[2]} for k, v in METHODS.items()}
        self.record["settings"] = {
            "model": self.model,
            "smoke": self.smoke,
            "regimes": {k: vars(v) for k, v in REGIMES.items()},
            "methods": methods,
            "s2ft_targets": PAIR,
            "lora_matched_rank": MATCHED_RANK,
            "test_size": TEST_SIZE,
            "grid_extension": GRID_EXTENSION,
            "test_subsets": "sorted(random.Random(0).sample(range(n), min(test_size, n))), "
            "n the test file's records",
            "prose": f"pydoc_data.topics, {PROSE_CHUNKS} seeded chunks of {PROSE_TOKENS} tokens",
            "environment": environment(args.threads),
        }
        self._data: dict[str, Datasets] = {}
        self.picked: dict[str, list[int]] = {}  # per test set, the subset's records in its file
        self.evaluator: Evaluator | None = None
        self.regimes = args.regimes.split(",") if args.regimes else list(REGIMES)
        self.methods = args.methods.split(",") if args.methods else list(METHODS)
        floor_of = {regime: floors(self.test_sets(regime)) for regime in REGIMES}
        self.record["settings"]["floors"] = floor_of

    def steps(self, regime: str) -> int:
        return 1 if self.smoke else REGIMES[regime].steps

    def recipe(self, regime: str, method: str, lr: float, seed: int, out: Path):
        overrides = {
            **METHODS[method][2], "s2ft.targets": json.dumps(PAIR), "s2ft.seed": seed,
            "train.seed": seed, "data.seed": SPLIT_SEED, "train.lr": lr,
            "train.max_steps": self.steps(regime), "train.batch_size": 2 if self.smoke else 8,
            "train.group_by_length": "true", "train.eval_every": 0, "train.save_every": 0,
            "model.name_or_path": self.model, "output_dir": str(out),
        }  # fmt: skip
        return load_recipe(
            REPO / REGIMES[regime].recipe, [f"{k}={v}" for k, v in overrides.items()]
        )

    def datasets(self, regime: str) -> Datasets:
        """The regime's training set and validation split (the learning-rate grid's)."""
        if regime not in self._data:
            path = REPO / REGIMES[regime].recipe
            extra = [f"data.seed={SPLIT_SEED}"]
            if self.smoke:  # a few records of each source
                sources = [
                    {"path": s.path, "limit": 8} for s in load_recipe(path).data.train_sources
                ]
                extra += [f"data.train={json.dumps(sources)}", "data.val_size=4"]
            recipe = load_recipe(path, extra)
            self._data[regime] = load_datasets(recipe.data, recipe.data_seed, self.tokenizer)
        return self._data[regime]

    @functools.cache  # noqa: B019 (one Study a process)
    def test_sets(self, regime: str) -> list[TestSet]:
        """Seeded subsets of the regime's test sets: TEST_SIZE examples or the whole set,
        read once."""
        r = REGIMES[regime]
        settings = EvalSection(tasks=r.tasks, data_dir=str(DATA))
        sets, _ = load_test_sets(settings)
        chosen = []
        for test in sets:
            picked = subset(len(test.records), 1 if self.smoke else TEST_SIZE)
            self.picked[test.task.name] = picked
            chosen.append(TestSet(test.task, test.path, [test.records[i] for i in picked]))
        return chosen

    @functools.cached_property
    def prose(self) -> list:
        """Held-out English prose: seeded chunks of Python's own documentation text
        (``pydoc_data.topics``), each scored whole (every token a target)."""
        from pydoc_data.topics import topics

        from s2ft_cli.data import Example

        text = "\n\n".join(topics[k] for k in sorted(topics))
        ids = self.tokenizer(text, add_special_tokens=False)["input_ids"]
        count, width = (2, 32) if self.smoke else (PROSE_CHUNKS, PROSE_TOKENS)
        starts = sorted(random.Random(0).sample(range(0, len(ids) - width, width), count))
        return [Example(ids[s : s + width], ids[s : s + width]) for s in starts]

    # -------------------------------------------------------------------------- record
    def done(self, job: str) -> bool:
        """Recorded; for a final run, also at its method's best rate (a grid extended
        after it may have chosen another)."""
        if job not in self.record["jobs"]:
            return False
        if not job.startswith("final/"):
            return True
        _, regime, method, _ = job.split("/")
        if not grid_complete(self, regime, method):
            return False
        return self.record["jobs"][job]["lr"] == best_lr(self.record, regime, method)

    def save(self, job: str, result: dict) -> None:
        """Record a job's result; a final run it replaces (at a rate its grid no longer
        chooses) moves to ``superseded``, under its name and rate."""
        old = self.record["jobs"].get(job)
        if old is not None and old.get("lr") != result.get("lr"):
            self.record.setdefault("superseded", {})[f"{job}@{old['lr']:g}"] = old
        self.record["jobs"][job] = result
        atomic_write_text(self.path, json.dumps(self.record, indent=1))

    def weights(self, regime: str, method: str, lr: float) -> Path:
        """Where the grid keeps a run's trained weights (the merged model's state)."""
        return self.models / f"{regime}-{method}-{lr:g}.pt"

    def prune(self) -> None:
        """Delete the kept weights no final run will read: a rate that lost its grid, or
        the winner once its seed-0 final is recorded."""
        for regime in self.regimes:
            for method in self.methods:
                complete = grid_complete(self, regime, method)
                used = self.done(final_job(regime, method, 0))
                best = best_lr(self.record, regime, method) if complete else None
                for lr in lrs(self, regime, method):
                    if used or (complete and lr != best):
                        self.weights(regime, method, lr).unlink(missing_ok=True)


# ------------------------------------------------------------------------------ jobs
def train(study: Study, regime: str, method: str, lr: float, seed: int):
    """One training run (its files in a temporary folder); the merged model and its cost."""
    (REPO / "runs").mkdir(exist_ok=True)  # a full fine-tuning's checkpoint: 1.6 GB
    with tempfile.TemporaryDirectory(dir=REPO / "runs") as out:
        recipe = study.recipe(regime, method, lr, seed, Path(out) / "run")
        trainer = Trainer(
            recipe, console=Console(quiet=True), method=training_method(method),
            datasets=Datasets(study.datasets(regime).train, [], []),
        )  # fmt: skip
        try:
            trainer.setup()
            start = time.perf_counter()
            last = trainer.train()
            seconds = time.perf_counter() - start
        finally:
            trainer.cleanup()
    steps = trainer.total_steps
    tokens = sum(trainer.counts[i][1] for s in range(steps) for i in trainer.plan.step_examples(s))
    trainable = sum(p.numel() for p in trainer.params)
    peak = last.get("peak_mem_gb")
    cost = dict(zip(COST, (trainable, steps, tokens, seconds, peak, lr, seed), strict=True))
    return merged(method, trainer.model).eval(), cost


def prose_loss(study: Study, model) -> float:
    total, count = token_loss_sums(model, study.prose, study.tokenizer.pad_token_id, 8)
    return total / count


def evaluate(study: Study, model, regime: str, job: str) -> dict:
    """Accuracy (with 95% intervals) on the regime's test subsets, by the paper's
    extraction of generated answers, and each example's outcome (``correct_each``: a 0 or 1
    per example of the subset, in its order) for the paired comparisons. Every output,
    extracted answer and gold answer goes to ``study.outputs`` (gzipped JSON lines, one file
    per job and regime; ``s2ft eval --score-only`` reads them unzipped)."""
    settings = EvalSection(
        tasks=REGIMES[regime].tasks, data_dir=str(DATA), batch_size=32,
        max_new_tokens=4 if study.smoke else REGIMES[regime].max_new_tokens,
    )  # fmt: skip
    if study.evaluator is None:  # one evaluator (tokenizer, processes), its model swapped
        quiet = Console(quiet=True)
        study.evaluator = Evaluator(
            study.model, settings, "float32", "chat", console=quiet, model=model
        )
    study.evaluator.settings = settings
    study.evaluator.model = model.to(study.evaluator.procs.device).eval()
    results, scored = study.evaluator.run(study.test_sets(regime), regime)
    lines = (
        json.dumps({k: v for k, v in row.items() if k != "prompt"} | {"record": record})
        for row in scored
        for record in [study.picked[row["task"]][row["index"]]]  # its place in the test file
    )
    packed = gzip.compress("\n".join(lines).encode() + b"\n")
    path = study.outputs / f"{job.replace('/', '-')}-{regime}.jsonl.gz"
    atomic_write_file(path, lambda f: f.write(packed), binary=True)
    for name, task in results["tasks"].items():
        task["correct_each"] = "".join(str(int(r["correct"])) for r in scored if r["task"] == name)
    return {"tasks": results["tasks"], "timing": results["timing"]}


def grid_job(regime: str, method: str, lr: float) -> str:
    return f"grid/{regime}/{method}/{lr:g}"


def final_job(regime: str, method: str, seed: int) -> str:
    return f"final/{regime}/{method}/{seed}"


def runs_by_method(record: dict, stage: str, regime: str) -> dict[str, list[dict]]:
    """The recorded jobs of a stage (``grid``, ``final``) in a regime, per method."""
    out: dict[str, list[dict]] = {}
    for name, result in record["jobs"].items():
        if name.startswith(f"{stage}/{regime}/"):
            out.setdefault(name.split("/")[2], []).append(result)
    return out


def lowest_loss_rate(runs: list[dict]) -> float:
    """Of grid runs, the rate with the lowest validation loss (a tie: the lowest rate)."""
    return min(sorted(runs, key=lambda r: r["lr"]), key=lambda r: r["val_loss"])["lr"]


def lrs(study: Study, regime: str, method: str) -> list[float]:
    """The method's grid in the regime, ascending: its planned rates, and one rate past
    the edge for each time the recorded runs put the best there (``GRID_EXTENSION``); the
    last rate may be still to run."""
    rates = list(METHODS[method][0][:2] if study.smoke else METHODS[method][0])
    for _ in range(GRID_EXTENSION["at_most"]):
        runs = [study.record["jobs"].get(grid_job(regime, method, lr)) for lr in rates]
        if None in runs:
            break
        best = lowest_loss_rate(runs)
        if best == rates[-1]:
            rates.append(best * GRID_EXTENSION["factor"])
        elif best == rates[0]:
            rates.insert(0, best / GRID_EXTENSION["factor"])
        else:
            break
    return rates


def grid_complete(study: Study, regime: str, method: str) -> bool:
    return all(
        grid_job(regime, method, lr) in study.record["jobs"] for lr in lrs(study, regime, method)
    )


def best_lr(record: dict, regime: str, method: str) -> float | None:
    """The rate the method's recorded grid runs choose (its final runs', once the grid is
    whole: ``grid_complete``); None if none is recorded."""
    runs = runs_by_method(record, "grid", regime).get(method)
    return lowest_loss_rate(runs) if runs else None


def jobs(study: Study) -> list[tuple[str, Callable[[], dict]]]:
    """Every job of the study in order, as (name, work)."""
    other = {"commonsense": "arithmetic", "arithmetic": "commonsense"}

    def grid(regime: str, method: str, lr: float) -> dict:
        model, cost = train(study, regime, method, lr, 0)
        val = study.datasets(regime).validation
        total, count = token_loss_sums(model, val, study.tokenizer.pad_token_id, 8)
        state = model.state_dict()
        kept = study.weights(regime, method, lr)
        atomic_write_file(kept, lambda f: torch.save(state, f), binary=True)
        return cost | {"val_loss": total / count}

    def final(regime: str, method: str, seed: int) -> dict:
        lr = best_lr(study.record, regime, method)
        kept = study.weights(regime, method, lr)
        if seed == 0 and kept.is_file():  # the grid's run: the same training
            model = load_model(study.model).eval()
            model.load_state_dict(torch.load(kept, weights_only=True))
            ran = study.record["jobs"][grid_job(regime, method, lr)]
            cost = {k: ran[k] for k in COST} | {"from_grid": True}
        else:
            model, cost = train(study, regime, method, lr, seed)
        name = final_job(regime, method, seed)
        result = cost | {regime: evaluate(study, model, regime, name)}
        if seed == 0:
            result[other[regime]] = evaluate(study, model, other[regime], name)
        return result | {"prose_loss": prose_loss(study, model)}

    def base() -> dict:
        model = load_model(study.model).eval()
        return {r: evaluate(study, model, r, "base") for r in REGIMES} | {
            "prose_loss": prose_loss(study, model)
        }

    out = []
    for k, regime in enumerate(study.regimes):
        for method in study.methods:
            for lr in lrs(study, regime, method):
                work = functools.partial(grid, regime, method, lr)
                out.append((grid_job(regime, method, lr), work))
        for method in study.methods:
            for seed in range(1 if study.smoke else METHODS[method][1]):
                work = functools.partial(final, regime, method, seed)
                out.append((final_job(regime, method, seed), work))
        if k == 0:
            out.append(("base", base))
    return out


# ------------------------------------------------------------------------------ report
def average(result: dict) -> float:
    tasks = result["tasks"]
    return 100 * statistics.mean(t["accuracy"] for t in tasks.values())


def cell(values: list[float], digits: int = 1) -> str:
    """A mean ± standard deviation over seeds (one seed: its value)."""
    if len(values) == 1:
        return f"{values[0]:.{digits}f}"
    return f"{statistics.mean(values):.{digits}f} ± {statistics.stdev(values):.{digits}f}"


def finals(record: dict, regime: str) -> dict[str, list[dict]]:
    """The regime's final runs per method at the rate its grid now chooses (one a grown
    grid has outdated waits to be run again), the base model first (as a one-run method)."""
    out = {"base": [record["jobs"]["base"]]} if "base" in record["jobs"] else {}
    for method, runs in runs_by_method(record, "final", regime).items():
        best = best_lr(record, regime, method)
        if current := [r for r in runs if best in (None, r.get("lr"))]:
            out[method] = current
    return out


Table = tuple[str, list[str], list[list[str]]]  # title, columns, rows


def grid_table(record: dict, regime: str) -> Table | None:
    """The regime's learning-rate grid: each run's validation loss and cost, each method's
    lowest loss so far marked."""
    rows = []
    for method, runs in runs_by_method(record, "grid", regime).items():
        best = lowest_loss_rate(runs)
        for r in sorted(runs, key=lambda r: r["lr"]):
            rows.append([
                method, f"{r['lr']:g}", f"{r['val_loss']:.4f}", "best" if r["lr"] == best else "",
                f"{r['train_seconds']:.0f}", f"{r['peak_mem_gb'] or math.nan:.2f}",
            ])  # fmt: skip
    if not rows:
        return None
    title = f"{regime}: learning-rate grid (seed 0, validation loss)"
    return title, ["method", "lr", "val loss", "", "train s", "peak GB"], rows


def tables(record: dict) -> list[Table]:
    """Per regime: the learning-rate grid; accuracy (each task and the average, mean ± std
    over seeds); forgetting (the other regime's average, the prose loss) and cost; S²FT-R
    paired with every other method."""
    out = []
    for regime in REGIMES:
        other = next(r for r in REGIMES if r != regime)
        if grid := grid_table(record, regime):
            out.append(grid)
        runs_of = finals(record, regime)
        if len(runs_of) <= ("base" in runs_of):
            continue
        names = list(next(iter(runs_of.values()))[0][regime]["tasks"])
        accuracy, forgetting = [], []
        for method, runs in runs_of.items():
            accuracy.append(
                [method, str(len(runs))]
                + [cell([100 * r[regime]["tasks"][n]["accuracy"] for r in runs]) for n in names]
                + [cell([average(r[regime]) for r in runs])]
            )
            crossed = [average(r[other]) for r in runs if other in r]
            trained = "steps" in runs[0]
            forgetting.append([
                method, cell(crossed) if crossed else "-", cell([r["prose_loss"] for r in runs], 3),
                f"{runs[0]['trainable']:,}" if trained else "0",
                str(runs[0]["steps"]) if trained else "-",
                f"{runs[0]['tokens']:,}" if trained else "-",
                f"{statistics.mean(r['train_seconds'] for r in runs):.0f}" if trained else "-",
                f"{statistics.mean(r['peak_mem_gb'] or math.nan for r in runs):.2f}"
                if trained else "-",
            ])  # fmt: skip
        accuracy += floor_rows(record, regime, names)
        out.append(
            (f"{regime}: accuracy %, mean ± std over seeds", ["method", "seeds", *names,
             "average"], accuracy)
        )  # fmt: skip
        columns = ["method", f"{other} avg %", "prose loss", "trainable", "steps", "tokens",
                   "train s", "peak GB"]  # fmt: skip
        out.append((f"{regime}: forgetting and cost", columns, forgetting))
        if REFERENCE in runs_of:
            out.append(paired(runs_of, regime, other))
    return out


REFERENCE = "s2ft-r"  # the method the paired table compares every other one with


def outcomes(runs: list[dict], regime: str) -> dict[str, torch.Tensor] | None:
    """Per task, the outcome (0 or 1) of each test example in each run (seed) evaluated on
    ``regime``, as runs × examples; None if no run was."""
    tested = [r[regime]["tasks"] for r in runs if regime in r]
    if not tested:
        return None
    return {
        task: torch.tensor([[float(c) for c in t[task]["correct_each"]] for t in tested]).double()
        for task in tested[0]
    }


def paired_difference(a: dict, b: dict, rounds: int = 2000) -> tuple[float, float, float]:
    """The difference of two methods' average accuracy (over seeds, then over tasks, as the
    paper averages), in points, with a 95% interval from a two-level paired bootstrap: each
    round draws each method's seeds with replacement, then every task's test examples, the
    same ones for both methods. A method of one seed adds no seed variation (its seeds'
    spread is unknown): read its interval as a lower bound on the uncertainty."""
    generator = torch.Generator().manual_seed(0)
    point, totals = 0.0, torch.zeros(rounds, dtype=torch.float64)
    for task in a:
        mine, theirs = a[task], b[task]  # seeds × examples

        def drawn(runs: torch.Tensor) -> torch.Tensor:  # rounds × examples
            picks = torch.randint(len(runs), (rounds, len(runs)), generator=generator)
            return runs[picks].mean(1)

        d = drawn(mine) - drawn(theirs)
        examples = torch.randint(d.shape[1], (rounds, d.shape[1]), generator=generator)
        totals += d.gather(1, examples).mean(1)
        point += (mine.mean() - theirs.mean()).item()
    totals /= len(a)
    low, high = torch.quantile(totals, torch.tensor([0.025, 0.975], dtype=torch.float64))
    return 100 * point / len(a), 100 * low.item(), 100 * high.item()


def paired(runs_of: dict[str, list[dict]], regime: str, other: str) -> Table:
    """S²FT-R minus every other method on the same test examples: the regime's average
    (every seed) and the other regime's (seed 0)."""
    rows = []
    mine = {tested: outcomes(runs_of[REFERENCE], tested) for tested in (regime, other)}
    for method, runs in runs_of.items():
        if method == REFERENCE:
            continue
        row = [method]
        for tested in (regime, other):
            theirs = outcomes(runs, tested)
            if mine[tested] is None or theirs is None:
                row += ["-", "-"]
                continue
            delta, low, high = paired_difference(mine[tested], theirs)
            row += [f"{delta:+.1f}", f"[{low:+.1f}, {high:+.1f}]"]
        rows.append(row)
    title = (f"{regime}: {REFERENCE} minus each method, points of average accuracy "
             "(95% interval: paired bootstrap over seeds and test examples)")  # fmt: skip
    return title, ["method", f"{regime} Δ", "95% CI", f"{other} Δ", "95% CI"], rows


def floor_levels(record: dict, regime: str, names: list[str]) -> dict[str, float]:
    """Each floor's average accuracy (%) over the tasks ``names``, where it covers them all."""
    floors = record.get("settings", {}).get("floors", {}).get(regime, {})
    return {
        floor: 100 * statistics.mean(scores[n] for n in names)
        for floor, scores in floors.items()
        if scores and set(names) <= set(scores)
    }


def floor_rows(record: dict, regime: str, names: list[str]) -> list[list[str]]:
    """The accuracy table's rows for answering without reading the question (no model, no
    seeds): chance and the majority answer, on the choice tasks."""
    levels = floor_levels(record, regime, names)
    rows = []
    for floor, scores in record.get("settings", {}).get("floors", {}).get(regime, {}).items():
        if scores:
            cells = [f"{100 * scores[n]:.1f}" if n in scores else "-" for n in names]
            mean = f"{levels[floor]:.1f}" if floor in levels else "-"
            rows.append([floor, "-", *cells, mean])
    return rows


def markdown(table: Table) -> str:
    title, columns, rows = table
    lines = [f"**{title}**", "", "| " + " | ".join(columns) + " |"]
    lines.append("|---|" + "---:|" * (len(columns) - 1))
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def plot(record: dict, path: Path) -> Path | None:
    """Accuracy against forgetting, per regime: each method's average on its own regime's
    tests (mean ± std over seeds) against the change, from the base model, of the other
    regime's average (seed 0) and of the prose loss."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    shown = [r for r in REGIMES if len(finals(record, r)) > 1 and "base" in record["jobs"]]
    if not shown:
        return None
    base = record["jobs"]["base"]
    # a colour and a marker per method, the same in every panel; a legend, not labels
    # beside the points, which overlap where methods coincide
    style = {m: (f"C{i}", "osD^vP"[i % 6]) for i, m in enumerate(["base", *METHODS])}
    fig, axes = plt.subplots(len(shown), 2, figsize=(11, 4.2 * len(shown)), squeeze=False)
    for (left, right), regime in zip(axes, shown, strict=True):
        other = next(r for r in REGIMES if r != regime)
        runs_of = finals(record, regime)
        names = list(next(iter(runs_of.values()))[0][regime]["tasks"])
        for method, runs in runs_of.items():
            own = [average(r[regime]) for r in runs]
            y, err = statistics.mean(own), statistics.stdev(own) if len(own) > 1 else 0.0
            crossed = [average(r[other]) - average(base[other]) for r in runs if other in r]
            prose = [r["prose_loss"] - base["prose_loss"] for r in runs]
            for ax, x in ((left, crossed), (right, prose)):
                if x:
                    color, marker = style[method]
                    ax.errorbar(statistics.mean(x), y, yerr=err, color=color, marker=marker,
                                linestyle="none", capsize=3, label=method, alpha=0.85)  # fmt: skip
        left.set_xlabel(f"{other} average: change from the base model (points)")
        right.set_xlabel("held-out prose loss: change from the base model (nats/token)")
        for ax in (left, right):
            ax.set_ylabel(f"{regime} average accuracy (%)")
            ax.grid(alpha=0.3)
            for floor, level in floor_levels(record, regime, names).items():
                ax.axhline(level, color="grey", linestyle="--", linewidth=0.8)
                ax.annotate(floor, (0, level), xycoords=("axes fraction", "data"), xytext=(4, 2),
                            textcoords="offset points", fontsize=7, color="grey")  # fmt: skip
        left.set_title(f"trained on {regime}: forgetting {other}", fontsize=10)
        right.set_title(f"trained on {regime}: forgetting English prose", fontsize=10)
    fig.suptitle(
        f"{record['settings']['model']}: accuracy against forgetting (error bars: std over seeds)"
    )
    handles, labels = axes[0][1].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=len(labels), frameon=False)
    fig.tight_layout(rect=(0, 0.04, 1, 1))
    atomic_write_file(path, lambda f: fig.savefig(f, dpi=110, format="png"), binary=True)
    plt.close(fig)
    return path


def show(table: Table, console: Console) -> None:
    """Print a table: its first column (what a row is) left, the figures right."""
    from rich.table import Table as RichTable

    title, columns, rows = table
    shown = RichTable(title=title, title_justify="left")
    for k, column in enumerate(columns):
        shown.add_column(column, justify="right" if k else "left")
    for row in rows:
        shown.add_row(*row)
    console.print(shown)


def report(record: dict, console: Console, out: Path) -> None:
    """Print the tables; write them as Markdown (``out``'s ``.md``) and the plot (``.png``)."""
    made = tables(record)
    for table in made:
        show(table, console)
    if made:
        atomic_write_text(out.with_suffix(".md"), "\n".join(markdown(t) for t in made))
        console.print(f"tables written to {out.with_suffix('.md')}", highlight=False)
    if plot(record, out.with_suffix(".png")):
        console.print(f"plot written to {out.with_suffix('.png')}", highlight=False)


# what a rerun measures anew rather than reproduces
MEASURED = {"train_seconds", "peak_mem_gb", "job_seconds", "timing", "from_grid", "ci95"}
# a rerun's losses may move in their last digits: two threads sum in an order of their own
LOSS_RTOL = 1e-6


def figures(result: dict, prefix: str = "") -> dict:
    """A job's recorded figures as flat ``path: value`` pairs, the measured ones left out."""
    flat = {}
    for key, value in result.items():
        if key in MEASURED:
            continue
        if isinstance(value, dict):
            flat |= figures(value, f"{prefix}{key}/")
        else:
            flat[prefix + key] = value
    return flat


def check(study: Study, job: str) -> bool:
    """Run a recorded job again, from the record's settings, in a scratch copy of the record
    (no kept weights: a seed-0 final trains again), and print every recorded figure beside
    the rerun's; True if all are the same (a loss to ``LOSS_RTOL``)."""
    if job not in study.record["jobs"]:
        raise SystemExit(
            f"{job!r} is not in {study.path}; recorded: {', '.join(study.record['jobs'])}"
        )
    (REPO / "runs").mkdir(exist_ok=True)
    with tempfile.TemporaryDirectory(dir=REPO / "runs") as scratch:
        copy = Path(scratch) / "record.json"
        others = {k: v for k, v in study.record["jobs"].items() if k != job}
        copy.write_text(json.dumps(study.record | {"jobs": others}))
        models = str(Path(scratch) / "models")
        subprocess.run(job_command(job, str(copy), models, study), check=True)
        again = figures(json.loads(copy.read_text())["jobs"][job])
    rows, same = compare(figures(study.record["jobs"][job]), again)
    columns = ["figure", "recorded", "rerun", ""]
    show((f"{job}: recorded against rerun", columns, rows), study.console)
    return same


def compare(recorded: dict, again: dict) -> tuple[list[list[str]], bool]:
    """Recorded figures beside a rerun's, a row each, and whether all are the same: exactly,
    but for a loss, to ``LOSS_RTOL``."""
    rows, same = [], []
    for path in sorted(recorded.keys() | again.keys()):
        was, now = recorded.get(path), again.get(path)
        close = isinstance(was, float) and isinstance(now, float) and "loss" in path
        close = close and math.isclose(was, now, rel_tol=LOSS_RTOL)
        verdict = "same" if was == now else f"within {LOSS_RTOL:g}" if close else "[red]differs[/]"
        same.append(was == now or close)
        if path.endswith("correct_each") and was and now and len(was) == len(now):
            differing = sum(a != b for a, b in zip(was, now, strict=True))
            was, now = f"{len(was)} outcomes", f"{differing} differ"
        rows.append([path, str(was), str(now), verdict])
    return rows, all(same)


def job_command(job: str, out: str, models: str, study: Study) -> list[str]:
    """The command that runs one job in a process of its own."""
    command = [sys.executable, __file__, "--job", job, "--out", out, "--models", models]
    command += ["--threads", str(study.args.threads), "--model", study.model]
    return command + ["--smoke"] * study.smoke


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--smoke", action="store_true", help="every stage, a step each")
    ap.add_argument("--report", action="store_true", help="print the tables, run nothing")
    ap.add_argument("--out", help="the JSON record (default docs/results/quality.json)")
    ap.add_argument("--regimes", help=f"a subset of {','.join(REGIMES)} (default all)")
    ap.add_argument("--methods", help=f"a subset of {','.join(METHODS)} (default all)")
    ap.add_argument("--models", help="where the grid keeps trained weights for the finals "
                    "(default runs/quality_models; beside any other --out)")  # fmt: skip
    ap.add_argument("--check", metavar="JOB", help="run a recorded job again and compare its "
                    "figures with the record's, e.g. grid/commonsense/s2ft-r/0.001")  # fmt: skip
    ap.add_argument("--model", default=MODEL, help="the model studied (default %(default)s; "
                    "a small one with its tokenizer checks the script quickly)")  # fmt: skip
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--job", help=argparse.SUPPRESS)
    args = ap.parse_args()
    record = REPO / "docs" / "results" / "quality.json"
    smoke_out = REPO / "runs" / "quality_smoke.json"  # a smoke run is no result
    args.out = args.out or str(smoke_out if args.smoke else record)
    out = Path(args.out)  # the record's weights in runs/, any other's beside it
    kept = REPO / "runs" / "quality_models" if out == record else out.parent / f"{out.stem}_models"
    args.models = args.models or str(kept)
    torch.set_num_threads(args.threads)
    study = Study(args)
    if args.check:
        sys.exit(0 if check(study, args.check) else 1)
    if args.job:  # one job, in this process (started by the loop below)
        start = time.perf_counter()
        work = dict(jobs(study))[args.job]
        study.save(args.job, work() | {"job_seconds": time.perf_counter() - start})
        return
    last = None
    while not args.report:  # the list again after every job: a grid may have grown
        todo = dict(jobs(study))
        name = next((name for name in todo if not study.done(name)), None)
        if name is None:
            break
        if name == last:
            raise RuntimeError(f"{name} ran but is not recorded as done")
        last = name
        study.console.print(f"[{list(todo).index(name) + 1}/{len(todo)}] {name}", highlight=False)
        if args.smoke:  # in this process: fast, but peak memory is the process's so far
            start = time.perf_counter()
            study.save(name, todo[name]() | {"job_seconds": time.perf_counter() - start})
        else:  # each job in a process of its own: its peak memory is its own
            command = job_command(name, args.out, args.models, study)
            subprocess.run(command, check=True)
            study.record = json.loads(study.path.read_text())
        study.prune()
    report(study.record, study.console, study.path)


if __name__ == "__main__":
    main()
