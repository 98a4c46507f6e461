"""Peak memory of gradient calibration (S²FT-G) against one full fine-tuning step.

Each measurement runs in its own subprocess on the same model and batches: ``load`` (the
model alone), ``calibration`` (``select_units`` with ``strategy: gradient`` over
``--samples`` examples in batches of ``--batch``) and ``full`` (full fine-tuning on the
same batches: their gradients accumulated into one AdamW step on every weight). Peak
memory is the process's peak RSS on a CPU and ``torch.cuda.max_memory_allocated`` on CUDA.

    python scripts/bench_calibration.py                   # bench-llama, fp32, CPU
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time

import torch

from s2ft_cli import S2FTConfig
from s2ft_cli.data import Example, calibration_batches
from s2ft_cli.engine.losses import example_losses
from s2ft_cli.engine.models import load_model
from s2ft_cli.engine.selection import select_units


def batches(vocab: int, samples: int, batch: int, seq: int) -> list[dict]:
    g = torch.Generator().manual_seed(0)
    examples = []
    for _ in range(samples):
        ids = torch.randint(3, vocab, (seq,), generator=g).tolist()
        examples.append(Example(ids, [-100] * (seq // 2) + ids[seq // 2 :]))
    return calibration_batches(examples, samples, batch, 0, pad_id=0)


def measure(args) -> dict:
    device = torch.device(args.device)
    model = load_model(args.model).to(device)
    data = batches(model.config.vocab_size, args.samples, args.batch, args.seq)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    start = time.perf_counter()
    if args.mode == "calibration":
        config = S2FTConfig(targets=json.loads(args.targets), strategy="gradient")
        select_units(model, config, data)
    elif args.mode == "full":  # the same batches, accumulated into one AdamW step
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5)
        targets = sum(int((b["labels"][:, 1:] != -100).sum()) for b in data)
        for batch in data:
            losses, _ = example_losses(model, {k: v.to(device) for k, v in batch.items()})
            (losses.sum() / targets).backward()
        optimizer.step()
    seconds = time.perf_counter() - start
    if device.type == "cuda":
        peak = torch.cuda.max_memory_allocated(device) / 2**30
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    return {"mode": args.mode, "peak_gb": peak, "seconds": seconds}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="preset:bench-llama")
    parser.add_argument("--targets", default='{"o_proj": 0.05, "down_proj": 0.02}')
    parser.add_argument("--samples", type=int, default=64)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--mode", help=argparse.SUPPRESS)
    args = parser.parse_args()
    torch.set_num_threads(2)
    if args.mode:
        print(json.dumps(measure(args)))
        return
    results = {}
    for mode in ("load", "calibration", "full"):
        out = subprocess.run(
            [sys.executable, __file__, *sys.argv[1:], "--mode", mode],
            capture_output=True, text=True, check=True,
        )  # fmt: skip
        results[mode] = json.loads(out.stdout.strip().splitlines()[-1])
    print(f"{args.model}, {args.samples} samples in batches of {args.batch} × {args.seq}, "
          f"{args.device}")  # fmt: skip
    for mode, r in results.items():
        print(f"  {mode:12s} peak {r['peak_gb']:.2f} GB  ({r['seconds']:.1f} s)")
    ratio = results["calibration"]["peak_gb"] / results["full"]["peak_gb"]
    print(f"  calibration / full fine-tuning step peak memory: {ratio:.2f}")


if __name__ == "__main__":
    main()
