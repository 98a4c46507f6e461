"""``s2ft plan``'s memory per GPU for LLaMA-3-8B and LLaMA-3-70B under DDP, FSDP2, FSDP2
over a 4-bit base and the same with the shards offloaded to CPU memory (issue 40): the
tables of docs/BENCHMARKS.md, "FSDP2 over a 4-bit base". The second compares S²FT's total
with the same run planned as LoRA (``s2ft plan --method lora``: PEFT LoRA at the rank
matching S²FT's trainable count on o_proj and down_proj) and as full fine-tuning
(``--method full``; not on a 4-bit base).

The models' configurations are written here from their published dimensions (no download:
the planner builds the model on the meta device from its config alone); the recipe is the
bundled ``llama3-70b-fsdp-nf4`` (the paper's LLaMA-3 arithmetic setup: o_proj 5.2%,
down_proj 3%, bf16, activation checkpointing, batch 1 × 1024 tokens a process) with the
model and the sharding set per row.

    python scripts/plan_table.py
"""

from __future__ import annotations

import json
import re
import tempfile
from pathlib import Path

from s2ft_cli.recipe import load_recipe
from s2ft_cli.training.memory import GIB, plan_memory

REPO = Path(__file__).resolve().parents[1]
RECIPE = REPO / "recipes" / "llama3-70b-fsdp-nf4.yaml"
LLAMA3 = dict(
    model_type="llama", architectures=["LlamaForCausalLM"], vocab_size=128256,
    max_position_embeddings=8192, rope_theta=500000.0, tie_word_embeddings=False,
    torch_dtype="bfloat16", bos_token_id=128000, eos_token_id=128001,
)  # fmt: skip
MODELS = {
    "LLaMA-3-8B": dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                       num_attention_heads=32, num_key_value_heads=8),
    "LLaMA-3-70B": dict(hidden_size=8192, intermediate_size=28672, num_hidden_layers=80,
                        num_attention_heads=64, num_key_value_heads=8),
}  # fmt: skip
SETUPS = {  # name -> (GPUs, overrides)
    "1 GPU": (1, ["model.quantization=none", "train.distributed=ddp", "train.fsdp_offload=false"]),
    "DDP, 2 GPUs": (2, ["model.quantization=none", "train.distributed=ddp",
                        "train.fsdp_offload=false"]),
    "FSDP2, 2 GPUs": (2, ["model.quantization=none", "train.fsdp_offload=false"]),
    "FSDP2 + nf4, 2 GPUs": (2, ["train.fsdp_offload=false"]),
    "FSDP2 + nf4 + offload, 2 GPUs": (2, []),
}  # fmt: skip


def both_totals(plan) -> str:
    """GiB with activation checkpointing (the recipe's setting) / without."""
    return f"{plan.total(True) / GIB:.1f} / {plan.total(False) / GIB:.1f}"


def main() -> None:
    rows = ["| model | setup | weights | deltas + AdamW | gathered | activations | total GiB |",
            "|---|---|---:|---:|---:|---:|---:|"]  # fmt: skip
    compared = ["| model | setup | S²FT | LoRA | full fine-tuning |", "|---|---|---:|---:|---:|"]
    with tempfile.TemporaryDirectory() as tmp:
        for model, dims in MODELS.items():
            folder = Path(tmp) / model
            folder.mkdir()
            (folder / "config.json").write_text(json.dumps(LLAMA3 | dims))
            for setup, (gpus, overrides) in SETUPS.items():
                recipe = load_recipe(RECIPE, [f"model.name_or_path={folder}", *overrides])
                p = plan_memory(recipe, gpus)
                parts = (p.weights, p.trainable, p.gathered, p.activations_checkpointed)
                cells = " | ".join(f"{x / GIB:.1f}" for x in parts)
                rows.append(f"| {model} | {setup} | {cells} | **{p.total(True) / GIB:.1f}** |")
                print(rows[-1], flush=True)
                totals = [both_totals(p)]
                for method in ("lora", "full"):
                    if method == "full" and recipe.model.quantization != "none":
                        totals.append("—")  # full fine-tuning trains the weights themselves
                        continue
                    other = plan_memory(recipe, gpus, method=method)
                    totals.append(both_totals(other))
                    if method == "lora":
                        rank = re.search(r"r=\d+", other.notes[0]).group()
                        totals[-1] += f" ({rank})"
                compared.append(f"| {model} | {setup} | {' | '.join(totals)} |")
                print(compared[-1], flush=True)
    print("\n".join(rows))
    print()
    print("\n".join(compared))


if __name__ == "__main__":
    main()
