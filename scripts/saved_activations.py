"""Saved-activation bytes of one training step: S²FT against the floors and PEFT LoRA.

Every tensor autograd saves for the backward pass goes through
``torch.autograd.graph.saved_tensors_hooks``; this script adds up the distinct storages
that are not model parameters, i.e. the activation memory a training step holds between
forward and backward. The set-ups are those of ``bench_train.py`` (s2ft's training loop
with each method's trainable parameters and loss), on the same model and batch, in one
process:

* ``floor``: every weight frozen, back-propagation through every layer, no weight
  gradient, transformers' loss; ``lean-floor``: the same with s2ft's loss;
* ``lora``: PEFT LoRA r=16 on all seven linear projections;
* ``s2ft``: ``get_s2ft_model`` with the given targets and s2ft's loss.

    python scripts/saved_activations.py                       # the 12-layer benchmark shape
    python scripts/saved_activations.py --batch 1 --seq 512 --json out.json
    python scripts/saved_activations.py --autocast bf16     # fp32 weights, bf16 autocast
"""

from __future__ import annotations

import argparse
import json
import tempfile
from contextlib import nullcontext

import torch
from bench_train import trainer_for

from s2ft_cli.data import collate


def saved_bytes(trainer, autocast=nullcontext) -> tuple[int, int]:
    """(bytes of saved non-parameter storages, number of saved tensors) for the first
    step's batch."""
    params = {p.untyped_storage().data_ptr() for p in trainer.model.parameters()}
    storages: dict[int, int] = {}
    count = 0

    def pack(t):
        nonlocal count
        count += 1
        ptr = t.untyped_storage().data_ptr()
        if ptr not in params:
            storages[ptr] = t.untyped_storage().nbytes()
        return t

    batch = collate(trainer.train_set[: trainer.recipe.train.batch_size], pad_id=0)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), autocast():
        loss = trainer.engine(batch)[0].sum()
    total = sum(storages.values())
    loss.backward()
    return total, count


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="preset:bench-llama")
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--targets", default='{"o_proj": 0.05, "down_proj": 0.02}')
    ap.add_argument("--autocast", choices=["none", "bf16"], default="none")
    ap.add_argument("--json", dest="json_path")
    args = ap.parse_args()
    torch.set_num_threads(2)
    spec = {
        "model": args.model,
        "dtype": "float32",
        "device": "cpu",
        "batch": args.batch,
        "seq": args.seq,
        "checkpointing": False,
        "targets": json.loads(args.targets),
        "layers": None,
        "warmup": 0,
        "steps": 1,
    }
    autocast = nullcontext
    if args.autocast == "bf16":

        def autocast():
            return torch.autocast("cpu", dtype=torch.bfloat16)

    results = {}
    for method in ("floor", "lean-floor", "lora", "s2ft"):
        with tempfile.TemporaryDirectory() as out:
            trainer = trainer_for(method, spec, out)
            nbytes, count = saved_bytes(trainer, autocast)
            trainer.cleanup()
        trainable = sum(p.numel() for p in trainer.model.parameters() if p.requires_grad)
        results[method] = {"saved_bytes": nbytes, "saved_tensors": count, "trainable": trainable}
        del trainer
    print(
        f"model {args.model}, batch {args.batch} x {args.seq}, autocast {args.autocast}, "
        f"S²FT targets {spec['targets']}"
    )
    header = ("method", "trainable", "saved MiB", "tensors", "/ floor", "/ lean", "/ lora")
    print("{:10} {:>12} {:>10} {:>8} {:>8} {:>7} {:>7}".format(*header))
    for method, r in results.items():
        mib = r["saved_bytes"] / 2**20
        print(
            f"{method:10} {r['trainable']:>12,} {mib:>10.1f} {r['saved_tensors']:>8} "
            + " ".join(
                f"{r['saved_bytes'] / results[ref]['saved_bytes']:>7.3f}"
                for ref in ("floor", "lean-floor", "lora")
            )
        )
    if args.json_path:
        with open(args.json_path, "w") as f:
            json.dump({"args": vars(args), "results": results}, f, indent=1)


if __name__ == "__main__":
    main()
