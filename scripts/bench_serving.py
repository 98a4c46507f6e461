"""Serving many fine-tuned variants (paper §5): S²FT against PEFT LoRA on one base model.

1. Switch latency: S²FT ``switch(model, A, B)`` (unfuse A, fuse B: only the adapters' rows
   and columns are written) against LoRA ``unmerge_adapter()`` + ``set_adapter(B)`` +
   ``merge_adapter()`` (a full ``B·A`` product per adapted matrix).
2. A batch in which every sequence has its own adapter: S²FT ``adapters_per_sequence``
   against PEFT's mixed-adapter batch (``adapter_names=``) and the plain base forward.

Medians of ``--repeats`` timings after warm-up; ratios printed. Default shape: the CPU
benchmark LLaMA (12 layers, hidden 768, intermediate 2048, 12 heads, 4 kv heads, vocab
32000), S²FT targets {o_proj: 0.05, down_proj: 0.02}, LoRA r=16 on all seven projections.

    python scripts/bench_serving.py            # CPU, 2 threads
    python scripts/bench_serving.py --device cuda --dtype bfloat16
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import time

import torch
from rich.console import Console
from rich.table import Table

from s2ft_cli import get_s2ft_model
from s2ft_cli.adapter.format import Adapter, adapter_of
from s2ft_cli.adapter.runtime import fuse, switch
from s2ft_cli.adapter.serving import adapters_per_sequence, serve_adapters
from s2ft_cli.engine.models import load_model
from s2ft_cli.engine.targets import TARGET_MATRICES


def timed(fn, repeats: int, device: torch.device) -> float:
    """Median seconds of ``fn()`` over ``repeats`` runs after two warm-ups."""
    times = []
    for i in range(repeats + 2):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        if i >= 2:
            times.append(time.perf_counter() - start)
    return statistics.median(times)


def s2ft_adapters(base, targets: dict, count: int, device, dtype) -> list[Adapter]:
    """``count`` adapters with random deltas on different random selections."""
    adapters = []
    for seed in range(count):
        model = get_s2ft_model(copy.deepcopy(base), {"targets": targets, "seed": seed})
        torch.manual_seed(seed)
        with torch.no_grad():
            for p in model.parameters():
                if p.requires_grad:
                    p.normal_(0, 0.01)
        adapter = adapter_of(model).to(device, dtype)
        adapter.source = f"s2ft-{seed}"
        adapters.append(adapter)
    return adapters


def lora_model(base, count: int, rank: int):
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=list(TARGET_MATRICES))
    model = get_peft_model(copy.deepcopy(base), config, adapter_name="lora-0")
    for k in range(1, count):
        model.add_adapter(f"lora-{k}", config)
    torch.manual_seed(0)
    with torch.no_grad():  # non-zero B, so that merging really adds something
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.01)
    return model.eval()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="preset:bench-llama")
    parser.add_argument("--targets", default='{"o_proj": 0.05, "down_proj": 0.02}')
    parser.add_argument("--lora-rank", type=int, default=16)
    parser.add_argument("--adapters", type=int, default=4, help="adapters in the mixed batch")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=9)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--json", help="write the figures here")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    console = Console()
    base = load_model(args.model).to(device=device, dtype=dtype).eval()
    targets = json.loads(args.targets)

    # 1. switch latency
    adapters = s2ft_adapters(base, targets, args.adapters, device, dtype)
    s2ft = copy.deepcopy(base)
    a, b = adapters[0], adapters[1]
    fuse(s2ft, a)
    state = {"on": a}

    def s2ft_switch():
        new = b if state["on"] is a else a
        switch(s2ft, state["on"], new)
        state["on"] = new

    lora = lora_model(base, args.adapters, args.lora_rank).to(device=device, dtype=dtype)
    lora.set_adapter("lora-0")
    lora.merge_adapter()
    lora_state = {"on": "lora-0"}

    def lora_switch():
        new = "lora-1" if lora_state["on"] == "lora-0" else "lora-0"
        lora.unmerge_adapter()
        lora.set_adapter(new)
        lora.merge_adapter()
        lora_state["on"] = new

    with torch.no_grad():
        t_s2ft = timed(s2ft_switch, args.repeats, device)
        t_lora = timed(lora_switch, args.repeats, device)
    lora.unmerge_adapter()

    # 2. a batch with one adapter per sequence
    ids = torch.randint(0, base.config.vocab_size, (args.batch, args.seq), device=device)
    names = [f"s2ft-{i % args.adapters}" for i in range(args.batch)]
    served = serve_adapters(copy.deepcopy(base), {x.source: x for x in adapters})
    lora_names = [f"lora-{i % args.adapters}" for i in range(args.batch)]
    with torch.no_grad():
        t_base = timed(lambda: base(ids), args.repeats, device)

        def s2ft_mixed():
            with adapters_per_sequence(served, names):
                served(ids)

        t_mixed = timed(s2ft_mixed, args.repeats, device)

        def lora_mixed():
            lora(input_ids=ids, adapter_names=lora_names)

        t_lora_mixed = timed(lora_mixed, args.repeats, device)

    trainable = sum(u.delta.numel() for u in a.updates.values())
    lora_params = sum(p.numel() for n, p in lora.named_parameters() if "lora-0" in n)
    figures = {
        "model": args.model,
        "device": str(device),
        "dtype": args.dtype,
        "s2ft_targets": targets,
        "s2ft_adapter_params": trainable,
        "lora_rank": args.lora_rank,
        "lora_adapter_params": lora_params,
        "switch_ms": {"s2ft": 1e3 * t_s2ft, "lora": 1e3 * t_lora, "ratio": t_s2ft / t_lora},
        "mixed_batch_ms": {
            "base": 1e3 * t_base,
            "s2ft": 1e3 * t_mixed,
            "lora": 1e3 * t_lora_mixed,
            "s2ft_over_base": t_mixed / t_base,
            "s2ft_over_lora": t_mixed / t_lora_mixed,
        },
        "batch": [args.batch, args.seq],
        "adapters_in_batch": args.adapters,
    }
    table = Table(
        title=f"serving — {args.model} on {device} ({args.dtype}), median of {args.repeats}",
        title_justify="left",
    )
    for col in ("measure", "S²FT", "LoRA", "base", "S²FT / LoRA", "S²FT / base"):
        table.add_column(col, justify="left" if col == "measure" else "right")
    table.add_row("adapter parameters", f"{trainable:,}", f"{lora_params:,}", "", "", "")
    table.add_row(
        "switch A→B (ms)",
        f"{1e3 * t_s2ft:.2f}",
        f"{1e3 * t_lora:.2f}",
        "",
        f"{t_s2ft / t_lora:.3f}",
        "",
    )
    table.add_row(
        f"forward, {args.adapters} adapters in a {args.batch}×{args.seq} batch (ms)",
        f"{1e3 * t_mixed:.1f}",
        f"{1e3 * t_lora_mixed:.1f}",
        f"{1e3 * t_base:.1f}",
        f"{t_mixed / t_lora_mixed:.3f}",
        f"{t_mixed / t_base:.3f}",
    )
    console.print(table)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(figures, f, indent=1)


if __name__ == "__main__":
    main()
