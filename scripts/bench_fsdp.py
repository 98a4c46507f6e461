"""FSDP2 over a 4-bit base (issue 40) against FSDP2 over the unquantized base and one
process over the 4-bit base: time per step and peak memory of every process, side by
side, and ``s2ft plan``'s prediction of that peak.

Each configuration is S²FT through ``s2ft train``'s own loop (``Trainer``) on random token
batches, every process started by this script (``torchrun --nproc_per_node N`` for two
processes) and measuring itself: set up (rank 0 reads, quantizes and sends the shards),
the high-water mark reset, ``--warmup`` + ``--steps`` optimizer steps timed, then its peak
resident memory above what it held before the set-up (on a CUDA device, its peak allocated
memory). Glibc's malloc is told to hand large freed blocks back at once
(``MALLOC_MMAP_THRESHOLD_``), so that resident memory follows the live tensors, the measure
``s2ft plan`` predicts. Steps run under every configuration in turn, one configuration at a
time: no other job may run meanwhile.

    python scripts/bench_fsdp.py                                  # CPU: 7B width, 2 layers
    python scripts/bench_fsdp.py --shapes 1x256,2x256 --checkpointing both
    python scripts/bench_fsdp.py --device cuda --model preset:bench-llama2-7b-8l --shapes 4x1024
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import torch
from bench_train import (
    LIVE_MEMORY_ENV,
    process_memory,
    recipe_for,
    reset_peak_memory,
    timed_step,
    trainer_for,
)

REPO = Path(__file__).resolve().parents[1]
CONFIGS = {  # name -> (processes, train.distributed, model.quantization)
    "nf4": (1, "ddp", "nf4"),  # one process over the 4-bit base
    "fsdp": (2, "fsdp", "none"),  # two processes sharding the unquantized base
    "fsdp-nf4": (2, "fsdp", "nf4"),  # two processes sharding the 4-bit base
}


def worker(config: str, spec: dict) -> None:
    """One process of a configuration: its step times and memory, to ``spec["out"]``."""
    from s2ft_cli.training.memory import plan_memory

    torch.set_num_threads(spec["threads"])
    device = spec["device"]
    processes, distributed, quantization = CONFIGS[config]
    method = "s2ft-nf4" if quantization == "nf4" else "s2ft"
    spec |= {"distributed": distributed, "processes": processes, "layers": None, "loop": "s2ft"}
    with tempfile.TemporaryDirectory() as out:
        # the plan first: it builds the model on the meta device, so that what the run's
        # libraries import (the model's modules, bitsandbytes) is loaded before the base
        planned = plan_memory(recipe_for(method, spec, out), processes, seq_len=spec["seq"])
        for module in ("bitsandbytes", "torch.distributed.fsdp", "s2ft_cli.training.nf4_shards"):
            importlib.import_module(module)
        base = 0 if device == "cuda" else process_memory("VmRSS")  # what the process holds first
        trainer = trainer_for(method, spec, out)
        reset_peak_memory(device)
        steps = range(spec["warmup"] + spec["steps"])
        times = [timed_step(trainer, step, spec)[0] for step in steps]
        peak = torch.cuda.max_memory_allocated() if device == "cuda" else process_memory("VmHWM")
        rank = trainer.rank
        trainer.cleanup()
    result = {
        "step_s": statistics.median(times[spec["warmup"] :]),
        "peak_bytes": peak - base,
        "planned_bytes": planned.total(spec["checkpointing"]),
        "planned_parts": {k: v for k, v in vars(planned).items() if k != "notes"},
    }
    Path(spec["results"], f"rank{rank}.json").write_text(json.dumps(result))


def run_config(config: str, spec: dict) -> list[dict]:
    """Every process's figures of one configuration, by rank."""
    processes = CONFIGS[config][0]
    with tempfile.TemporaryDirectory() as results:
        spec = spec | {"results": results}
        command = [__file__, "--worker", config, "--spec", json.dumps(spec)]
        if processes > 1:
            launcher = ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node"]
            command = [*launcher, str(processes), *command]
        env = {**os.environ, **LIVE_MEMORY_ENV, "OMP_NUM_THREADS": str(spec["threads"])}
        done = subprocess.run([sys.executable, *command], capture_output=True, text=True, env=env)
        if done.returncode != 0:
            sys.exit(f"{config} failed:\n{done.stderr[-3000:]}")
        return [json.loads(Path(results, f"rank{r}.json").read_text()) for r in range(processes)]


def main() -> None:
    from rich.console import Console
    from rich.table import Table

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--model", default="preset:bench-llama2-7b-2l")
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--shapes", default="1x256", help="batch x sequence per process")
    ap.add_argument("--checkpointing", choices=["off", "on", "both"], default="off")
    ap.add_argument("--targets", default='{"o_proj": 0.05, "down_proj": 0.02}')
    ap.add_argument("--configs", default=",".join(CONFIGS), help=", ".join(CONFIGS))
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--threads", type=int, default=1, help="CPU threads per process")
    ap.add_argument("--json", dest="json_path", help="write every measurement here")
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    ap.add_argument("--spec", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        worker(args.worker, json.loads(args.spec))
        return
    settings = {"off": [False], "on": [True], "both": [False, True]}[args.checkpointing]
    table = Table(title=f"{args.model}, {args.dtype}, S²FT {args.targets}, {args.device}")
    for column in ("shape", "checkpointing", "configuration", "step s", "peak GiB per rank",
                   "s2ft plan GiB", "plan / peak"):  # fmt: skip
        table.add_column(column, justify="left" if column == "configuration" else "right")
    records = []
    for shape in args.shapes.split(","):
        batch, seq = (int(x) for x in shape.lower().split("x"))
        for checkpointing in settings:
            for config in args.configs.split(","):
                spec = {
                    "device": args.device, "model": args.model, "dtype": args.dtype,
                    "batch": batch, "seq": seq, "checkpointing": checkpointing,
                    "targets": json.loads(args.targets), "steps": args.steps,
                    "warmup": args.warmup, "threads": args.threads,
                }  # fmt: skip
                ranks = run_config(config, spec)
                records.append({"config": config, **spec, "ranks": ranks})
                peak = max(r["peak_bytes"] for r in ranks)
                table.add_row(
                    shape, "on" if checkpointing else "off", config,
                    f"{max(r['step_s'] for r in ranks):.2f}",
                    " / ".join(f"{r['peak_bytes'] / 2**30:.2f}" for r in ranks),
                    f"{ranks[0]['planned_bytes'] / 2**30:.2f}",
                    f"{ranks[0]['planned_bytes'] / peak:.2f}",
                )  # fmt: skip
                print(json.dumps(records[-1]), file=sys.stderr, flush=True)
    Console().print(table)
    if args.json_path:
        record = {"command": " ".join(sys.argv), "records": records}
        Path(args.json_path).write_text(json.dumps(record, indent=1) + "\n")


if __name__ == "__main__":
    main()
