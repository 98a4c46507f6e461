"""Saved-activation bytes of one training step: S²FT against the frozen floor and PEFT LoRA.

Every tensor autograd saves for the backward pass goes through
``torch.autograd.graph.saved_tensors_hooks``; this script adds up the distinct storages
that are not model parameters, i.e. the activation memory a training step holds between
forward and backward. Three set-ups on the same model and batch:

* ``floor``: every weight frozen, back-propagation through every layer (input embeddings
  require grad), no weight gradient: the least any partial method can save;
* ``lora``: PEFT LoRA r=16 on all seven linear projections;
* ``s2ft``: ``get_s2ft_model`` with the given targets.

    python scripts/saved_activations.py                       # the 12-layer benchmark shape
    python scripts/saved_activations.py --batch 1 --seq 512 --json out.json
"""

from __future__ import annotations

import argparse
import json

import torch

from s2ft_cli import get_s2ft_model
from s2ft_cli.models import load_model


def saved_bytes(model, ids) -> tuple[int, int]:
    """(bytes of saved non-parameter storages, number of saved tensors) for one step."""
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    storages: dict[int, int] = {}
    count = 0

    def pack(t):
        nonlocal count
        count += 1
        ptr = t.untyped_storage().data_ptr()
        if ptr not in params:
            storages[ptr] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = model(input_ids=ids, labels=ids).loss
    total = sum(storages.values())
    loss.backward()
    return total, count


def build(method: str, name: str, targets: dict[str, float]):
    model = load_model(name)
    model.train()
    if method == "floor":
        model.requires_grad_(False)
        model.enable_input_require_grads()
    elif method == "lora":
        from peft import LoraConfig, get_peft_model

        modules = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
        model = get_peft_model(model, LoraConfig(r=16, lora_alpha=32, target_modules=modules))
    else:
        get_s2ft_model(model, {"targets": targets})
    return model


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="preset:bench-llama")
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--targets", default='{"o_proj": 0.05, "down_proj": 0.02}')
    ap.add_argument("--json", dest="json_path")
    args = ap.parse_args()
    torch.set_num_threads(2)
    targets = json.loads(args.targets)
    results = {}
    for method in ("floor", "lora", "s2ft"):
        model = build(method, args.model, targets)
        vocab = model.config.vocab_size
        ids = torch.randint(
            0, vocab, (args.batch, args.seq), generator=torch.Generator().manual_seed(0)
        )
        nbytes, count = saved_bytes(model, ids)
        trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
        results[method] = {"saved_bytes": nbytes, "saved_tensors": count, "trainable": trainable}
        del model
    print(f"model {args.model}, batch {args.batch} x {args.seq}, S²FT targets {targets}")
    header = ("method", "trainable", "saved MiB", "tensors", "/ floor", "/ lora")
    print("{:8} {:>12} {:>10} {:>8} {:>8} {:>7}".format(*header))
    for method, r in results.items():
        mib = r["saved_bytes"] / 2**20
        print(
            f"{method:8} {r['trainable']:>12,} {mib:>10.1f} {r['saved_tensors']:>8} "
            f"{r['saved_bytes'] / results['floor']['saved_bytes']:>8.3f} "
            f"{r['saved_bytes'] / results['lora']['saved_bytes']:>7.3f}"
        )
    if args.json_path:
        with open(args.json_path, "w") as f:
            json.dump({"args": vars(args), "results": results}, f, indent=1)


if __name__ == "__main__":
    main()
