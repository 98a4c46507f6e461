"""Training-step cost of S²FT against full fine-tuning, PEFT LoRA and the frozen floor.

Every method trains through s2ft's own loop (``s2ft_cli.training.trainer.Trainer.train_step``: the
step ``s2ft train`` runs, fused AdamW, gradient clipping at 1.0), with the baselines of
``scripts/baselines.py`` as other sets of trainable parameters, on random token batches
(one per step); with ``--loop plain`` through a user's own loop instead, the one Hugging
Face's Trainer runs: the model's own loss for ``labels=`` (s2ft's memory-lean loss on a
model converted by ``get_s2ft_model``, transformers' on the baselines'), backward,
clipping, the same AdamW. Each method runs in its own subprocess, so that its peak memory is its
own, and the high-water mark is reset after set-up, so that the peak is the training
phase's (``VmHWM`` after ``/proc/self/clear_refs`` on a CPU; with ``--live-memory``
malloc hands freed blocks back at once; ``torch.cuda.max_memory_allocated`` after a
reset on CUDA). For the
S²FT methods it also prints what ``s2ft plan`` predicts against the measured peak above
what the process held before the run:

* ``full``: every weight trains, transformers' loss (full-vocabulary logits);
* ``lora``: PEFT LoRA r=16 on all seven linear projections, transformers' loss;
* ``floor``: every weight frozen, back-propagation through every layer (the input
  embeddings' output requires grad) and no weight gradient, transformers' loss: the least
  any partial method costs with that loss (the floor *before* this project's loss);
* ``lean-floor``: the same with s2ft's memory-lean loss (the floor *after*);
* ``s2ft``: the recipe's targets through ``get_s2ft_model``, s2ft's loss;
* ``qlora`` and ``s2ft-nf4`` (not run unless named in ``--methods``): LoRA as above and
  S²FT over the frozen linears quantized to nf4 by bitsandbytes (``model.quantization``).

It reports trainable parameters, the median step time over ``--steps`` steps after
``--warmup`` (forward, backward, optimizer step), the forward pass alone (no graph: a
bound below any method's step), peak memory, and the ratios to full
fine-tuning, LoRA and both floors; with ``--repeats N`` the ratios are medians over N
rounds. With ``--interleave`` the time ratios come from one more process that holds every
method and runs their steps in turn, the median over steps of the per-step ratios: on a
shared machine whole processes run up to 30% slower than others, and steps alternating
within one process see the same slowness.

    python scripts/bench_train.py                    # CPU: bench-llama fp32, 4×256 and 1×512
    python scripts/bench_train.py --device cuda      # LLaMA-3.2-1B-like, bf16, 2×1024
    python scripts/bench_train.py --device cuda --model preset:bench-llama2-7b-8l --shapes 1x1024
    python scripts/bench_train.py --model preset:bench-llama2-7b-2l --shapes 1x512 \
        --methods full,lora,lean-floor,s2ft,qlora,s2ft-nf4    # CPU at 7B layer width
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time

import torch

METHODS = ("full", "lora", "floor", "lean-floor", "s2ft", "qlora", "s2ft-nf4")
DEFAULT_METHODS = METHODS[:5]
REFERENCES = ("full", "lora", "qlora", "floor", "lean-floor")
QUANTIZED = {"qlora": "nf4", "s2ft-nf4": "nf4"}  # method -> model.quantization
DEFAULTS = {  # device -> model, dtype, shapes, activation checkpointing settings
    "cpu": ("preset:bench-llama", "float32", "4x256,1x512", "off"),
    "cuda": ("preset:bench-llama3-1b", "bfloat16", "2x1024", "both"),
}


# ------------------------------------------------------------------------- one method
def training_method(name: str):
    """The method's trainable parameters and loss, for s2ft's own training loop."""
    from baselines import Floor, FullFineTuning, LoRA

    from s2ft_cli.training.methods import S2FT

    return {
        "full": lambda: FullFineTuning(transformers_loss=True),
        "lora": lambda: LoRA(r=16, alpha=32, transformers_loss=True),
        "floor": lambda: Floor(transformers_loss=True),
        "lean-floor": lambda: Floor(),
        "s2ft": lambda: S2FT(),
        "qlora": lambda: LoRA(r=16, alpha=32, transformers_loss=True),
        "s2ft-nf4": lambda: S2FT(),
    }[name]()


def recipe_for(method: str, spec: dict, out: str):
    """The recipe of ``method`` at the spec's model, shape and steps (``spec["distributed"]``,
    when given, under torchrun)."""
    from s2ft_cli.recipe import Recipe

    return Recipe.model_validate(
        {
            "model": {
                "name_or_path": spec["model"],
                "dtype": spec["dtype"],
                "gradient_checkpointing": spec["checkpointing"],
                "quantization": QUANTIZED.get(method, "none"),
            },
            "s2ft": {"targets": spec["targets"], "layers": spec["layers"]},
            "train": {
                "batch_size": spec["batch"],
                "max_steps": spec["warmup"] + spec["steps"],
                "lr": 1e-5,
                "warmup_steps": 0,
                "device": spec["device"],
                "distributed": spec.get("distributed", "auto"),
            },
            "output_dir": out,
        }
    )


def trainer_for(method: str, spec: dict, out: str):
    """A set-up :class:`Trainer` of ``method`` on random token batches of the spec's shape
    (one distinct batch per step and process, every token a target, no padding)."""
    from rich.console import Console

    from s2ft_cli.data import Datasets, Example
    from s2ft_cli.engine.models import load_model
    from s2ft_cli.training.trainer import Trainer

    steps = spec["warmup"] + spec["steps"]
    recipe = recipe_for(method, spec, out)
    vocab = load_model(spec["model"], weights=False).config.vocab_size  # meta: no weights
    g = torch.Generator().manual_seed(0)
    rows = steps * spec["batch"] * spec.get("processes", 1)
    ids = torch.randint(0, vocab, (rows, spec["seq"]), generator=g).tolist()
    examples = [Example(row, row) for row in ids]
    trainer = Trainer(
        recipe,
        console=Console(quiet=True),
        method=training_method(method),
        datasets=Datasets(examples, [], []),
    )
    trainer.setup()
    return trainer


def reset_peak_memory(device: str) -> None:
    """Start the high-water mark afresh: the training phase's own peak, not the load's."""
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    else:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")


def process_memory(field: str) -> int:
    """A field of /proc/self/status (VmRSS, VmHWM) in bytes."""
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(field)) * 1024


def peak_memory_bytes(device: str) -> int:
    return torch.cuda.max_memory_allocated() if device == "cuda" else process_memory("VmHWM")


def batch_of(trainer, step: int) -> dict:
    """The examples of optimizer step ``step``, as s2ft's loop takes them, in one batch on
    the trainer's device (the benchmark's steps have one micro-batch)."""
    from s2ft_cli.data.batches import collate

    examples = [trainer.train_set[i] for i in trainer.plan.step_examples(step)]
    batch = collate(examples, trainer.tokenizer.pad_token_id)
    return {k: v.to(trainer.device) for k, v in batch.items()}


def plain_step(trainer, step: int) -> float:
    """One step of a user's own loop, the one Hugging Face's Trainer runs without its extras:
    the model's own ``loss`` for ``labels=`` (s2ft's memory-lean loss on a model converted by
    ``get_s2ft_model``, transformers' on the others), backward, clipping, AdamW."""
    with trainer.autocast():
        loss = trainer.model(**batch_of(trainer, step), use_cache=False).loss
    loss.backward()
    torch.nn.utils.clip_grad_norm_(trainer.params, trainer.recipe.train.max_grad_norm)
    trainer.optimizer.step()
    trainer.optimizer.zero_grad(set_to_none=True)
    return loss.item()


def synchronize(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def forward_time(trainer, steps: int, device: str) -> float:
    """Median time of the forward pass alone (no graph, the method's loss) over the steps'
    batches: what any method pays before its backward pass."""
    times = []
    with torch.no_grad(), trainer.autocast():
        for step in range(steps):
            batch = batch_of(trainer, step)
            synchronize(device)
            start = time.perf_counter()
            trainer.engine(batch)
            synchronize(device)
            times.append(time.perf_counter() - start)
    return statistics.median(times)


def timed_step(trainer, step: int, spec: dict) -> tuple[float, float]:
    """Run optimizer step ``step`` of the spec's loop: its wall time and loss."""
    synchronize(spec["device"])
    start = time.perf_counter()
    if spec["loop"] == "plain":
        loss = plain_step(trainer, step)
    else:
        loss = float(trainer.train_step(step)[0])
    synchronize(spec["device"])
    return time.perf_counter() - start, loss


def run_interleaved(methods: list[str], spec: dict) -> dict:
    """Every method's loop in this one process, one step of each in turn (the order rotating
    from step to step): step times under the same load of the machine, for the time ratios."""
    import tempfile
    from contextlib import ExitStack

    torch.set_num_threads(spec["threads"])
    with ExitStack() as stack:
        trainers = {}
        for method in methods:
            out = stack.enter_context(tempfile.TemporaryDirectory())
            trainers[method] = trainer_for(method, spec, out)
            stack.callback(trainers[method].cleanup)
        times = {method: [] for method in methods}
        for step in range(spec["warmup"] + spec["steps"]):
            turn = step % len(methods)
            for method in methods[turn:] + methods[:turn]:
                times[method].append(timed_step(trainers[method], step, spec)[0])
    return {method: t[spec["warmup"] :] for method, t in times.items()}


def run_method(method: str, spec: dict) -> dict:
    """Set up the loop, run ``warmup + steps`` optimizer steps, measure."""
    import tempfile

    from s2ft_cli.training.memory import plan_memory

    torch.set_num_threads(spec["threads"])
    device = spec["device"]
    # What the process holds before the run (Python and the libraries, imported first):
    # not the run's own.
    import transformers.models.llama.modeling_llama  # noqa: F401

    import s2ft_cli.training.trainer  # noqa: F401

    if method in ("lora", "qlora"):
        import peft  # noqa: F401
    base = 0 if device == "cuda" else process_memory("VmRSS")
    with tempfile.TemporaryDirectory() as out:
        trainer = trainer_for(method, spec, out)
        plan = plan_memory(trainer.recipe, seq_len=spec["seq"])
        planned = plan.total(spec["checkpointing"])
        reset_peak_memory(device)

        steps = [timed_step(trainer, step, spec) for step in range(spec["warmup"] + spec["steps"])]
        times, losses = (list(column) for column in zip(*steps, strict=True))
        peak = peak_memory_bytes(device)
        forward_s = forward_time(trainer, spec["steps"], device)
        trainer.cleanup()
    return {
        "trainable": sum(p.numel() for p in trainer.model.parameters() if p.requires_grad),
        "step_s": statistics.median(times[spec["warmup"] :]),
        "step_times": times,
        "forward_s": forward_s,
        "peak_bytes": peak,
        "base_bytes": base,
        "planned_bytes": planned if method.startswith("s2ft") else None,
        "loss": losses[-1],
    }


# ------------------------------------------------------------------------- the driver
# On a CPU the peak is resident memory. glibc's malloc raises its mmap threshold as large
# blocks are freed and then keeps later ones of that size resident after free: RSS also
# counts memory no tensor holds any more, as a process really occupies it. --live-memory
# fixes the threshold, so that every large block goes back at once and RSS follows the
# live tensors (as max_memory_allocated does on CUDA), at the cost of slower steps (every
# large allocation faults its pages in again): the measure s2ft plan predicts.
LIVE_MEMORY_ENV = {"MALLOC_MMAP_THRESHOLD_": "65536"}


def in_subprocess(worker: str, what: str, spec: dict, live_memory: bool = False) -> dict:
    """This script as ``--worker`` or ``--interleaved-worker`` ``what``: its JSON answer."""
    cmd = [sys.executable, __file__, worker, what, "--spec", json.dumps(spec)]
    env = {**os.environ, **(LIVE_MEMORY_ENV if live_memory else {})}
    done = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if done.returncode != 0:
        sys.exit(f"{what} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def interleaved_ratios(times: dict) -> dict:
    """Each method's step time over each reference's: the median over steps of the ratio of
    the two steps of the same round."""
    return {
        f"{method}/{ref}": statistics.median(a / b for a, b in zip(t, times[ref], strict=True))
        for method, t in times.items()
        for ref in REFERENCES
        if ref in times
    }


def ratios(results: dict) -> dict:
    """Time and memory of each method over each reference method."""
    out = {}
    for method, r in results.items():
        for ref in REFERENCES:
            if ref in results:
                base = results[ref]
                out[f"{method}/{ref}"] = {
                    "time": r["step_s"] / base["step_s"],
                    "memory": r["peak_bytes"] / base["peak_bytes"],
                }
    return out


def median_ratios(rounds: list[dict]) -> dict:
    keys = rounds[0].keys()
    return {
        k: {m: statistics.median(r[k][m] for r in rounds) for m in ("time", "memory")} for k in keys
    }


TARGETS = {  # setting -> (ratio key, measure, bound), from the efficiency issues
    "cpu": [
        ("s2ft/lean-floor", "time", 1.05),
        ("s2ft/lean-floor", "memory", 1.05),
        ("s2ft/floor", "time", 1.05),
        ("s2ft/floor", "memory", 1.05),
        ("s2ft/lora", "memory", 0.85),
    ],
    "cpu-7b": [  # LLaMA-2-7B's layers on the CPU
        ("s2ft/full", "memory", 0.30),
        ("s2ft/full", "time", 0.30),
        ("s2ft/lora", "memory", 0.80),
        ("s2ft/lora", "time", 0.85),
        ("s2ft-nf4/qlora", "memory", 0.85),
        ("s2ft-nf4/qlora", "time", 1.0),
    ],
    "cuda": [
        ("s2ft/full", "memory", 0.40),
        ("s2ft/full", "time", 0.60),
        ("s2ft/lora", "memory", 0.90),
        ("s2ft/lora", "time", 0.90),
    ],
}


def report(
    title: str, rounds: list[dict], medians: dict, targets: str, interleaved: dict | None
) -> None:
    from rich.console import Console
    from rich.table import Table

    last = rounds[-1]["results"]
    table = Table(title=title, title_justify="left")
    for col in ("method", "trainable", "step s", "forward s", "peak GiB"):
        table.add_column(col, justify="right" if col != "method" else "left")
    refs = [ref for ref in REFERENCES if ref in last]
    for ref in refs:
        table.add_column(f"×{ref}\ntime / mem", justify="right")
    for method, r in last.items():
        step_s = statistics.median(
            interleaved[method] if interleaved else [x["results"][method]["step_s"] for x in rounds]
        )
        cells = [
            method,
            f"{r['trainable']:,}",
            f"{step_s:.3f}",
            f"{statistics.median(x['results'][method]['forward_s'] for x in rounds):.3f}",
            f"{statistics.median(x['results'][method]['peak_bytes'] for x in rounds) / 2**30:.2f}",
        ]
        for ref in refs:
            m = medians[f"{method}/{ref}"]
            cells.append(f"{m['time']:.2f} / {m['memory']:.2f}")
        table.add_row(*cells)
    console = Console(width=150)
    console.print(table)
    for method, r in last.items():
        if r.get("planned_bytes"):
            measured = statistics.median(
                x["results"][method]["peak_bytes"] - x["results"][method]["base_bytes"]
                for x in rounds
            )
            console.print(
                f"  {method}: s2ft plan {r['planned_bytes'] / 2**30:.2f} GiB, measured "
                f"{measured / 2**30:.2f} GiB above the process's own "
                f"{r['base_bytes'] / 2**30:.2f} GiB: {r['planned_bytes'] / measured:.2f}×"
            )
    if "full" in last:
        for method in (m for m in last if m.startswith("s2ft")):
            share = statistics.median(
                x["results"][method]["forward_s"] / x["results"]["full"]["step_s"] for x in rounds
            )
            console.print(
                f"  {method}: its forward pass alone (no graph) takes {share:.2f} × full "
                "fine-tuning's step, a bound below any step that computes the loss"
            )
    for key, measure, bound in TARGETS[targets]:
        if key in medians:
            value = medians[key][measure]
            mark = "[green]met[/]" if value <= bound else "[red]missed[/]"
            console.print(f"  target {key} {measure} ≤ {bound}: {value:.3f} {mark}")


def layer_list(text: str | None) -> list[int] | None:
    """``"6-11"`` or ``"0,2,4"`` as a list of layer indices."""
    if not text:
        return None
    layers = []
    for part in text.split(","):
        first, _, last = part.partition("-")
        layers += range(int(first), int(last or first) + 1)
    return layers


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", choices=sorted(DEFAULTS), default="cpu")
    ap.add_argument("--model", help="preset, local directory or hub id (default per device)")
    ap.add_argument("--dtype", help="float32 | bfloat16 (default per device)")
    ap.add_argument("--shapes", help="batch x sequence, comma-separated (default per device)")
    ap.add_argument("--checkpointing", choices=["off", "on", "both"], help="(default per device)")
    ap.add_argument("--methods", default=",".join(DEFAULT_METHODS), help=", ".join(METHODS))
    ap.add_argument("--targets", default='{"o_proj": 0.05, "down_proj": 0.02}')
    ap.add_argument("--layers", help="S²FT trains only these layers, e.g. 6-11 (default all)")
    ap.add_argument("--steps", type=int, default=5, help="timed steps (after the warm-up)")
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=1, help="rounds of all methods")
    ap.add_argument("--threads", type=int, default=2, help="CPU threads per method")
    ap.add_argument(
        "--loop",
        choices=["trainer", "plain"],
        default="trainer",
        help="s2ft's training loop, or a user's own with the model's loss for labels= "
        "(what Hugging Face's Trainer computes)",
    )
    ap.add_argument("--json", dest="json_path", help="write every measurement here")
    ap.add_argument(
        "--live-memory", action="store_true", help="CPU: count live tensors, not retained blocks"
    )
    ap.add_argument(
        "--interleave",
        action="store_true",
        help="time the methods in one process, their steps alternating (memory: each its own)",
    )
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    ap.add_argument("--interleaved-worker", help=argparse.SUPPRESS)
    ap.add_argument("--spec", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        print(json.dumps(run_method(args.worker, json.loads(args.spec))))
        return
    if args.interleaved_worker:
        methods = args.interleaved_worker.split(",")
        print(json.dumps(run_interleaved(methods, json.loads(args.spec))))
        return

    model, dtype, shapes, checkpointing = DEFAULTS[args.device]
    model, dtype = args.model or model, args.dtype or dtype
    checkpointing = args.checkpointing or checkpointing
    settings = {"off": [False], "on": [True], "both": [False, True]}[checkpointing]
    methods = args.methods.split(",")
    unknown = set(methods) - set(METHODS)
    if unknown:
        sys.exit(f"unknown methods {sorted(unknown)}; choose from {', '.join(METHODS)}")
    machine = {
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "torch": torch.__version__,
        "device": torch.cuda.get_device_name() if args.device == "cuda" else "cpu",
        "date": time.strftime("%Y-%m-%d"),
    }
    configs = []
    for shape in (args.shapes or shapes).split(","):
        batch, seq = (int(x) for x in shape.lower().split("x"))
        for ckpt in settings:
            spec = {
                "device": args.device,
                "model": model,
                "dtype": dtype,
                "batch": batch,
                "seq": seq,
                "checkpointing": ckpt,
                "targets": json.loads(args.targets),
                "layers": layer_list(args.layers),
                "steps": args.steps,
                "warmup": args.warmup,
                "threads": args.threads,
                "loop": args.loop,
            }
            rounds = []
            for _ in range(args.repeats):
                results = {m: in_subprocess("--worker", m, spec, args.live_memory) for m in methods}
                rounds.append({"results": results, "ratios": ratios(results)})
            medians = median_ratios([r["ratios"] for r in rounds])
            interleaved = None
            if args.interleave:
                interleaved = in_subprocess("--interleaved-worker", ",".join(methods), spec)
                for key, value in interleaved_ratios(interleaved).items():
                    medians[key]["time"] = value
            title = (
                f"{model} {dtype} on {machine['device']}, batch {batch}×{seq}, "
                f"checkpointing {'on' if ckpt else 'off'}, S²FT {args.targets}"
                + (f" on layers {args.layers}" if args.layers else "")
                + f", {args.loop} loop, {args.repeats} round(s)"
                + (
                    f"; time: {args.steps} steps of each alternating in one process"
                    if interleaved
                    else ""
                )
            )
            at_7b = args.device == "cpu" and "7b" in model
            report(title, rounds, medians, "cpu-7b" if at_7b else args.device, interleaved)
            configs.append(
                {
                    "spec": spec,
                    "rounds": rounds,
                    "interleaved_step_times": interleaved,
                    "median_ratios": medians,
                }
            )
    if args.json_path:
        with open(args.json_path, "w") as f:
            json.dump(
                {"machine": machine, "live_memory": args.live_memory, "configs": configs},
                f,
                indent=1,
            )


if __name__ == "__main__":
    main()
