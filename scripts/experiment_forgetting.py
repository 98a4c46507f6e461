"""Learning versus forgetting: S²FT against PEFT LoRA and full fine-tuning (paper §3, Fig. 2).

A real pretrained model (``../shared/models/stories260K``, children's stories) is
fine-tuned on a new domain (the LLM-Adapters math training set) by each method at two or
three trainable-parameter budgets, with the same steps, batches and tokens. For every run:

* learning: the token loss on held-out math examples;
* forgetting: how much the loss on the old domain rose, measured on a fixed set of stories
  sampled from the base model itself (seeded, saved beside the results);
* drift: the relative Frobenius norm of the update, ‖W − W₀‖ / ‖W₀‖ over all weights.

Each method's learning rate is the best of a small sweep at its middle budget (by loss on
a validation split, not the held-out one). Every sweep run is measured like the others and
recorded, so the results also show how forgetting trades against learning as the
learning rate varies at a fixed budget.

    python scripts/experiment_forgetting.py                 # CPU, about 20 minutes
    python scripts/experiment_forgetting.py --device cuda
"""

from __future__ import annotations

import argparse
import json
import math
import tempfile
import time
from pathlib import Path

import torch
from rich.console import Console
from transformers.utils import logging as hf_logging

from s2ft_cli import merge_adapter
from s2ft_cli.data import Datasets, Example, load_datasets
from s2ft_cli.engine.models import load_model, load_tokenizer
from s2ft_cli.recipe import load_recipe
from s2ft_cli.training.methods import S2FT
from s2ft_cli.training.trainer import Trainer, token_loss_sums

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"

# method -> budget name -> what it trains (S²FT targets, LoRA rank, full FT scope)
BUDGETS = {
    "s2ft": {
        "small": {"o_proj": 0.125, "down_proj": 0.05},
        "medium": {"o_proj": 0.25, "down_proj": 0.1},
        "large": {"o_proj": 0.5, "down_proj": 0.2},
    },
    "lora": {"small": 1, "medium": 2, "large": 4},
    "full": {"medium": "blocks", "large": "all"},  # the seven projections; every weight
}
SWEEP = {
    "s2ft": [5e-3, 1e-2, 2e-2, 4e-2, 8e-2],
    "lora": [5e-3, 1e-2, 2e-2, 4e-2],
    "full": [5e-4, 1e-3, 2e-3, 4e-3],
}


# ------------------------------------------------------------------------------ data
def old_domain(model, tokenizer, path: Path, args) -> list:
    """``args.stories`` stories of ``args.story_tokens`` tokens sampled from the base model
    (seeded), read back from ``path`` when it holds the same model's same draw, so that
    reruns score the very same text."""
    draw = {
        "model": Path(args.model).name,
        "seed": args.seed,
        "count": args.stories,
        "tokens": args.story_tokens,
    }
    saved = json.loads(path.read_text()) if path.exists() else {}
    if {k: saved.get(k) for k in draw} == draw:
        stories = saved["stories"]
    else:
        stories = sample_stories(model, tokenizer, args)
        lines = ",\n".join(json.dumps(s, ensure_ascii=False) for s in stories)
        path.write_text(json.dumps(draw)[:-1] + ', "stories": [\n' + lines + "\n]}\n")
    return [Example(s["ids"], s["ids"]) for s in stories]


def sample_stories(model, tokenizer, args) -> list[dict]:
    """Plain sampling (temperature 1, no top-k) from the beginning of a text, seeded."""
    torch.manual_seed(args.seed)
    bos = torch.full((args.stories, 1), tokenizer.bos_token_id, device=model.device)
    with torch.no_grad():
        out = model.generate(
            bos,
            attention_mask=torch.ones_like(bos),
            pad_token_id=tokenizer.pad_token_id,
            do_sample=True,
            max_new_tokens=args.story_tokens,
            min_new_tokens=args.story_tokens,
            top_k=0,
        )
    return [{"text": tokenizer.decode(ids), "ids": ids} for ids in out.tolist()]


def new_domain(recipe_path: Path, tokenizer, args) -> tuple[list, list, list]:
    """The math set through the recipe's data pipeline: train, validation (for the lr
    sweep) and held-out (for the results)."""
    held_size = args.val + args.held_out
    recipe = load_recipe(recipe_path, [f"data.val_size={held_size}", f"train.seed={args.seed}"])
    train, held, _ = load_datasets(recipe.data, recipe.data_seed, tokenizer)
    return train, held[: args.val], held[args.val :]


# ------------------------------------------------------------------------------ methods
def training_method(method: str, budget):
    """What a method trains at a budget: S²FT's targets come with the recipe, LoRA's rank
    and full fine-tuning's scope with the baselines of ``scripts/baselines.py``."""
    from baselines import FullFineTuning, LoRA

    if method == "s2ft":
        return S2FT()
    if method == "lora":
        return LoRA(r=budget, alpha=2 * budget)
    return FullFineTuning(scope=budget)


def merged(method: str, model):
    """The fine-tuned model as plain weights in the base's layout."""
    if method == "s2ft":
        return merge_adapter(model)
    if method == "lora":
        return model.merge_and_unload()
    return model


def drift(model, reference: dict) -> float:
    """‖W − W₀‖_F / ‖W₀‖_F over every weight of the model."""
    change = total = 0.0
    for name, p in model.state_dict().items():
        base = reference[name].to(p.device, torch.float64)
        change += (p.double() - base).pow(2).sum().item()
        total += base.pow(2).sum().item()
    return math.sqrt(change / total)


# ------------------------------------------------------------------------------ one run
def mean_loss(model, examples, pad_id, device) -> float:
    total, count = token_loss_sums(model, examples, pad_id, 32, device)
    return total / count


def run(method, budget, lr, args, data, reference, pad_id) -> dict:
    """Train one method at one budget and learning rate through s2ft's own loop (cosine
    schedule with 10% warm-up, clipping at 1.0), then measure learning, forgetting, drift."""
    train, val, test, stories = data
    settings = {
        "s2ft.targets": json.dumps(budget) if method == "s2ft" else None,
        "s2ft.seed": 0,
        "train.max_steps": args.steps,
        "train.batch_size": args.batch,
        "train.lr": lr,
        "train.scheduler": "cosine",
        "train.warmup_steps": args.steps // 10,
        "train.max_grad_norm": 1.0,
        "train.weight_decay": 0.0,
        "train.eval_every": 0,
        "train.seed": args.seed,
        "train.device": args.device,
    }
    overrides = [f"{k}={v}" for k, v in settings.items() if v is not None]
    with tempfile.TemporaryDirectory() as out:
        recipe = load_recipe(
            args.recipe, [*overrides, f"model.name_or_path={args.model}", f"output_dir={out}"]
        )
        trainer = Trainer(
            recipe,
            console=Console(quiet=True),
            method=training_method(method, budget),
            datasets=Datasets(train, [], []),
        )
        try:
            trainer.setup()
            start = time.perf_counter()
            trainer.train()
            seconds = time.perf_counter() - start
        finally:
            trainer.cleanup()
    model, params = trainer.model, trainer.params
    model = merged(method, model).eval()
    return {
        "method": method,
        "budget": budget,
        "lr": lr,
        "trainable": sum(p.numel() for p in params),
        "val_loss": mean_loss(model, val, pad_id, args.device),
        "new_loss": mean_loss(model, test, pad_id, args.device),
        "old_loss": mean_loss(model, stories, pad_id, args.device),
        "drift": drift(model, reference),
        "train_seconds": seconds,
    }


# ------------------------------------------------------------------------------ report
LABELS = {"s2ft": "S²FT", "lora": "LoRA", "full": "full FT"}
MARKERS = {"s2ft": "o", "lora": "s", "full": "^"}


def plot(results: list[dict], sweeps: dict, base: dict, path: Path) -> None:
    """Forgetting against learning: across budgets at each method's chosen learning rate
    (left), and across the swept learning rates at the middle budget (right)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (by_budget, by_lr) = plt.subplots(1, 2, figsize=(11, 4.4), sharey=True)
    for method in LABELS:
        runs = sorted((r for r in results if r["method"] == method), key=lambda r: r["trainable"])
        _curve(by_budget, method, runs, base, lambda r: f"{r['trainable'] / 1000:.0f}k")
        _curve(by_lr, method, sweeps[method], base, lambda r: f"{r['lr']:g}")
    by_budget.set_title("budgets at the chosen lr (labels: trainable params)", fontsize=9)
    by_lr.set_title("middle budget, every swept lr (labels: lr)", fontsize=9)
    by_budget.set_ylabel("forgetting: rise of old-domain loss (stories)")
    for ax in (by_budget, by_lr):
        ax.set_xlabel("new-domain held-out loss (math): lower is better learning")
        ax.grid(alpha=0.3)
        ax.legend()
    fig.suptitle(f"stories260K → math, {results[0]['steps']} steps each")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def _curve(ax, method: str, runs: list[dict], base: dict, label) -> None:
    xs = [r["new_loss"] for r in runs]
    ys = [r["old_loss"] - base["old_loss"] for r in runs]
    ax.plot(xs, ys, marker=MARKERS[method], label=LABELS[method])
    for r, x, y in zip(runs, xs, ys, strict=True):
        ax.annotate(label(r), (x, y), fontsize=7, xytext=(3, 3), textcoords="offset points")


def table(results: list[dict], base: dict) -> str:
    lines = [
        "| method | budget | trainable | lr | val loss | new-domain loss | forgetting | drift |",
        "|---|---|---:|---:|---:|---:|---:|---:|",
        f"| base | — | 0 | — | — | {base['new_loss']:.3f} | 0 | 0 |",
    ]
    for r in results:
        budget = json.dumps(r["budget"]) if isinstance(r["budget"], dict) else r["budget"]
        lines.append(
            f"| {r['method']} | {budget} | {r['trainable']:,} | {r['lr']:g} | "
            f"{r['val_loss']:.3f} | {r['new_loss']:.3f} | "
            f"{r['old_loss'] - base['old_loss']:+.3f} | {r['drift']:.4f} |"
        )
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=str(SHARED / "models" / "stories260K"))
    ap.add_argument("--recipe", default=str(REPO / "recipes" / "stories260k-math.yaml"))
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--val", type=int, default=100, help="math examples for the lr sweep")
    ap.add_argument("--held-out", type=int, default=200, help="math examples for the results")
    ap.add_argument("--stories", type=int, default=64, help="old-domain samples")
    ap.add_argument("--story-tokens", type=int, default=192)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--rates", type=int, help="only the first N rates of each sweep (a quick "
                    "check of the script; default every rate)")  # fmt: skip
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default=str(REPO / "docs"), help="folder for the plot and results")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    hf_logging.disable_progress_bar()
    out = Path(args.out)
    (out / "results").mkdir(parents=True, exist_ok=True)

    tokenizer = load_tokenizer(args.model)
    pad_id = tokenizer.pad_token_id
    base_model = load_model(args.model).to(args.device).eval()
    reference = base_model.state_dict()  # never trained: every run loads its own copy
    stories = old_domain(base_model, tokenizer, out / "results" / "forgetting_stories.json", args)
    data = (*new_domain(Path(args.recipe), tokenizer, args), stories)
    base = {
        "new_loss": mean_loss(base_model, data[2], pad_id, args.device),
        "old_loss": mean_loss(base_model, stories, pad_id, args.device),
    }
    print(f"base: new-domain loss {base['new_loss']:.3f}, old-domain loss {base['old_loss']:.3f}")

    sweeps, results = {}, []
    for method, budgets in BUDGETS.items():
        middle = budgets["medium"]
        tried = []
        for lr in SWEEP[method][: args.rates]:
            tried.append(run(method, middle, lr, args, data, reference, pad_id))
            r = tried[-1]
            print(
                f"sweep {method} lr {lr:g}: val {r['val_loss']:.4f}, new {r['new_loss']:.3f}, "
                f"forgetting {r['old_loss'] - base['old_loss']:+.3f}",
                flush=True,
            )
        best = min(tried, key=lambda r: r["val_loss"])
        sweeps[method] = tried
        for name, budget in budgets.items():
            r = (
                best
                if name == "medium"
                else run(method, budget, best["lr"], args, data, reference, pad_id)
            )
            results.append({**r, "budget_name": name, "steps": args.steps})
            print(
                f"{method} {name}: {r['trainable']:,} trainable, new {r['new_loss']:.3f}, "
                f"forgetting {r['old_loss'] - base['old_loss']:+.3f}, drift {r['drift']:.4f}",
                flush=True,
            )

    (out / "results" / "forgetting.json").write_text(
        json.dumps({"args": vars(args), "base": base, "sweeps": sweeps, "runs": results}, indent=1)
    )
    plot(results, sweeps, base, out / "forgetting.png")
    print(table(results, base))
    print()
    print(table([r for method in sweeps.values() for r in method], base))


if __name__ == "__main__":
    main()
