"""The ``s2ft`` command line: parse, call the library, print. No logic of its own."""

from __future__ import annotations

import errno
import functools
import inspect
import shlex
import sys
import typing
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

from .errors import S2FTError, TrainingInterrupted
from .tables import (
    combine_table,
    families_table,
    memory_table,
    recipes_table,
    results_table,
    score_table,
    selection_table,
)

app = typer.Typer(
    name="s2ft",
    help="Structured Sparse Fine-Tuning (S²FT) of open language models (LLaMA, Qwen, Gemma, "
    "Phi, OLMo, Granite, mixture-of-experts models, ...), driven by YAML recipes.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)
console = Console()
err_console = Console(stderr=True)
_state = {"debug": False}


@app.callback()
def _main(
    debug: Annotated[bool, typer.Option("--debug", help="Show tracebacks of errors.")] = False,
) -> None:
    _state["debug"] = debug


WRITE_FAILURES = {errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM}


def user_errors(command):
    """Print a user error as one paragraph and exit 1 (with the traceback under --debug)."""

    @functools.wraps(command)
    def wrapper(*args, **kwargs):
        try:
            return command(*args, **kwargs)
        except S2FTError as err:
            if _state["debug"]:
                raise
            err_console.print(f"[bold red]error:[/] {err}", highlight=False, soft_wrap=True)
            raise typer.Exit(1) from None
        except OSError as err:  # a full disk, a read-only or forbidden folder
            if _state["debug"] or err.errno not in WRITE_FAILURES:
                raise
            where = f" {err.filename}" if err.filename else ""
            err_console.print(
                f"[bold red]error:[/] could not write{where}: {err.strerror}. Free some space or "
                "choose a folder you can write to (output_dir=... or --out); files written "
                "before are complete, and a training run continues from its newest "
                "checkpoint with --resume.",
                highlight=False,
                soft_wrap=True,
            )
            raise typer.Exit(1) from None

    return wrapper


Overrides = Annotated[
    list[str] | None,
    typer.Argument(help="key=value overrides of recipe keys, e.g. s2ft.seed=1", show_default=False),
]


RecipeArg = Annotated[Path, typer.Argument(help="A YAML recipe file.", show_default=False)]


@app.command()
@user_errors
def select(
    recipe: RecipeArg,
    overrides: Overrides = None,
    json_path: Annotated[
        Path | None, typer.Option("--json", help="Write the selection as JSON to this path.")
    ] = None,
    plot: Annotated[
        Path | None,
        typer.Option("--plot", help="Write a heatmap PNG (layers × units, selected marked)."),
    ] = None,
) -> None:
    """Show which heads and channels a recipe trains, without training."""
    from .recipe import load_recipe

    r = load_recipe(recipe, overrides)  # a recipe's mistakes are reported before torch loads

    from .engine.convert import recipe_selection

    cfg = r.s2ft
    selection, model_params = recipe_selection(r)
    summary = selection.summary(model_params)

    order = f", order {cfg.order}" if cfg.strategy != "random" else ""
    describe = f"strategy {cfg.strategy}{order}, allocation {cfg.allocation}, seed {cfg.seed}"
    console.print(selection_table(r.model.name_or_path, describe, summary))
    if cfg.strategy != "random":
        console.print(score_table(cfg.strategy, selection.score_quartiles()))
    console.print(
        f"trainable parameters: {summary['trainable_params']:,} of {summary['model_params']:,} "
        f"({100 * summary['fraction']:.3f}% of the model)"
    )
    for note in selection.adjustments:
        console.print(f"[yellow]adjusted:[/] {note}", highlight=False)
    if json_path is not None:
        selection.save(json_path)
        console.print(f"selection written to {json_path}")
    if plot is not None:
        from .engine.plots import selection_heatmap

        selection_heatmap(selection, plot)
        console.print(f"heatmap written to {plot}")


@app.command()
@user_errors
def plan(
    recipe: RecipeArg,
    overrides: Overrides = None,
    gpus: Annotated[
        int, typer.Option("--gpus", min=1, help="Processes (GPUs) the run will use.")
    ] = 1,
    method: Annotated[
        str,
        typer.Option(
            "--method",
            help="s2ft (the recipe's run), or the same run as lora (PEFT LoRA of S²FT's "
            "trainable count on the target matrices) or full fine-tuning, to compare.",
        ),
    ] = "s2ft",
) -> None:
    """Show the memory a recipe's training run needs per GPU, before it starts (no weights
    are read: the model is built on the meta device)."""
    from .recipe import load_recipe

    r = load_recipe(recipe, overrides)
    if r.data is None:
        raise S2FTError("s2ft plan needs the recipe's data: section (data.max_seq_len).")

    from .training.memory import GIB, METHODS, plan_memory

    if method not in METHODS:
        raise S2FTError(f"--method {method}: plans {', '.join(METHODS)}.")
    p = plan_memory(r, gpus, method=method)
    seq = r.data.max_seq_len
    how = "FSDP" if r.train.sharded(gpus) else "DDP" if gpus > 1 else ""
    caption = (
        f"batch {r.train.batch_size} × {seq} tokens per process, weights {r.model.dtype}, "
        f"linears {r.model.quantization}, {gpus} process" + ("es " + how if gpus > 1 else "")
    )
    logits = "the logits" if method == "full" else "loss chunk"  # full: the head trains
    working = f"working memory ({logits} or one layer's gradients" + (
        ", a dequantized weight block)" if r.model.quantization != "none" else ")"
    )
    trained = {
        "s2ft": "deltas, gradients, AdamW (fp32)",
        "lora": "LoRA A and B, gradients, AdamW (fp32)",
        "full": f"weights, gradients, AdamW ({r.model.dtype})",
    }[method]
    parts = [
        ("frozen weights", p.weights),
        (trained, p.trainable),
        ("embeddings, head and layers gathered (FSDP)", p.gathered),
        ("saved activations", p.activations),
        ("saved activations, activation checkpointing", p.activations_checkpointed),
        (working, p.working),
    ]
    shown = [(part, size / GIB) for part, size in parts if size or "FSDP" not in part]
    totals = [
        ("total", p.total(False) / GIB),
        ("total with activation checkpointing", p.total(True) / GIB),
    ]
    named = {"s2ft": "", "lora": ", trained with LoRA", "full": ", fully fine-tuned"}[method]
    title = f"Memory per GPU — {r.model.name_or_path}{named}"
    console.print(memory_table(title, caption, shown, totals))
    for note in p.notes:
        console.print(f"  {note}", highlight=False)
    current = "on" if r.model.gradient_checkpointing else "off"
    console.print(f"  this recipe: activation checkpointing {current}", highlight=False)


@app.command("data")
@user_errors
def data_command(
    recipe: RecipeArg,
    overrides: Overrides = None,
    show: Annotated[int, typer.Option("--show", min=0, help="Examples to print.")] = 3,
    json_path: Annotated[
        Path | None,
        typer.Option("--json", help='Write the training examples as [{"input_ids", "labels"}].'),
    ] = None,
) -> None:
    """Show what the model will be trained on: examples with the trained tokens marked,
    and statistics of the set. Loads the tokenizer and the data, never the weights."""
    from .recipe import load_recipe

    r = load_recipe(recipe, overrides)
    if r.data is None:
        raise S2FTError("s2ft data needs a data: section in the recipe (data.train at least).")

    from .data import load_datasets
    from .data.preview import show as show_data
    from .data.preview import write_json
    from .engine.models import load_tokenizer

    tokenizer = load_tokenizer(r.model.name_or_path, r.model.trust_remote_code)
    data = load_datasets(r.data, r.data_seed, tokenizer)
    pack_len = r.data.max_seq_len if r.data.packing else None
    show_data(
        console, tokenizer, data, show, r.train.batch_size, r.train.seed, pack_len,
        r.train.group_by_length,
    )  # fmt: skip
    if json_path is not None:
        write_json(json_path, data.train)
        console.print(f"{len(data.train)} training examples written to {json_path}")


@app.command()
@user_errors
def train(
    recipe: RecipeArg,
    overrides: Overrides = None,
    resume: Annotated[
        bool, typer.Option("--resume", help="Continue from the newest checkpoint in output_dir.")
    ] = False,
) -> None:
    """Fine-tune a model with S²FT as the recipe says (also under torchrun)."""
    from .recipe import load_recipe

    r = load_recipe(recipe, overrides)
    if r.eval is not None:  # a misspelt eval task is refused before training, not after
        from .evaluation.tasks import known_tasks

        known_tasks(r.eval.tasks, "eval.tasks")

    from .training.trainer import train as run_training

    try:
        run_training(r, resume=resume, console=console)
    except TrainingInterrupted as stop:
        command = shlex.join(["s2ft", "train", str(recipe), *(overrides or []), "--resume"])
        err_console.print(
            f"[yellow]stopped:[/] {stop} Resume with:\n  {command}", highlight=False, soft_wrap=True
        )
        raise typer.Exit(stop.exit_code) from None


def _option(help: str, *names: str):
    return typer.Option(*names, help=help, show_default=False)


# s2ft eval's options are the fields of the recipe's eval: section (EvalSection): one source
# of their names, help and defaults. The names that read differently on the command line:
EVAL_FLAGS = {
    "adapters": "--adapter",  # repeated, one adapter each
    "include_base": "--base/--no-base",
    "do_sample": "--do-sample/--greedy",
}


def _eval_parameter(name: str, field) -> inspect.Parameter:
    """A command-line option for one field of EvalSection: unset (None) unless given, so the
    recipe's value, else the field's default, stands."""
    annotation = field.annotation
    kinds = set(typing.get_args(annotation)) - {type(None)} or {annotation}
    if kinds <= {bool}:
        kind = bool
    elif kinds <= {int}:
        kind = int
    elif kinds <= {float}:
        kind = float
    elif any(typing.get_origin(k) is list for k in kinds):
        kind = list[str]
    else:  # str and Literal choices: the recipe's schema checks the value
        kind = str
    flag = EVAL_FLAGS.get(name, "--" + name.replace("_", "-"))
    if kind is bool and "/" not in flag:
        flag = f"{flag}/--no-{flag.removeprefix('--')}"
    choices = [a for k in kinds for a in typing.get_args(k) if isinstance(a, str)]
    help = field.description or ""
    if choices:
        help += f" One of {', '.join(choices)}."
    if field.default not in (None, False, [], ()):
        help += f" Default: {field.default}."
    option = typer.Option(flag, help=f"{help} (recipe: eval.{name})", show_default=False)
    return inspect.Parameter(
        name,
        inspect.Parameter.KEYWORD_ONLY,
        default=None,
        annotation=Annotated[kind | None, option],
    )


def _with_eval_options(command):
    """Give ``command`` (whose last parameter is ``**options``) an option per EvalSection
    field; their values reach it in ``options``."""
    from .recipe import EvalSection

    own = list(inspect.signature(command, eval_str=True).parameters.values())[:-1]
    fields = [_eval_parameter(n, f) for n, f in EvalSection.model_fields.items()]
    command.__signature__ = inspect.Signature([*own, *fields])
    return command


@app.command("eval")
@user_errors
@_with_eval_options
def eval_command(
    source: Annotated[
        Path | None,
        typer.Argument(
            help="A recipe (its model: and eval: sections; the run's adapter when trained) or "
            "a training run's directory. Optional with --model.",
            show_default=False,
        ),
    ] = None,
    overrides: Overrides = None,
    model: Annotated[
        str | None, _option("Base model: hub id, local directory, .gguf file or preset.")
    ] = None,
    score_only: Annotated[
        Path | None,
        _option(
            "Re-score a predictions.jsonl without a model: lines need output and answer, and "
            "task unless --tasks names one."
        ),
    ] = None,
    **options,
) -> None:
    """Evaluate on the paper's commonsense and arithmetic sets; or re-score saved outputs."""
    from .evaluation.report import score_file
    from .evaluation.request import eval_request
    from .evaluation.tasks import resolve_tasks

    if score_only is not None:
        folder = Path(options["out"]) if options["out"] else score_only.parent / "rescored"
        named = resolve_tasks(options["tasks"]) if options["tasks"] else []
        results = score_file(score_only, folder, named[0] if len(named) == 1 else None)
        console.print(results_table(f"re-scored {score_only}", results))
        console.print(f"results written to {folder}", highlight=False)
        return
    eval_request(source, overrides, model, options).run(console)  # torch from here on


@app.command()
@user_errors
def export(
    source: Annotated[
        Path,
        typer.Argument(
            help="A training run's directory, or an adapter directory.", show_default=False
        ),
    ],
    out: Annotated[
        Path, _option("Where to write the adapter or model directory, or the GGUF file.", "--out")
    ],
    checkpoint: Annotated[
        str | None, _option("Export this checkpoint (step number or step-N folder name).")
    ] = None,
    format: Annotated[
        str,
        _option(
            "s2ft (default, the adapter format); peft (a PEFT LoRA adapter: PEFT, vLLM, "
            "SGLang, lm-eval read it; s2ft reads it back); gguf (the merged model as one GGUF "
            "file: llama.cpp, Ollama, LM Studio); gguf-lora (a llama.cpp LoRA adapter for "
            "the base's GGUF file)."
        ),
    ] = "s2ft",
    quant: Annotated[
        str | None,
        _option(
            "--format gguf: the tensors' type, f32 (default), f16, bf16, q8_0, q4_0, q4_1, "
            "or source (the base GGUF file's own types)."
        ),
    ] = None,
    rank: Annotated[
        int | None,
        _option(
            "--format peft: pad every module to this LoRA rank (one r for serving engines, "
            "at most 512)."
        ),
    ] = None,
    merged: Annotated[
        bool,
        typer.Option(
            "--merged",
            help="Write a complete Hugging Face model with the update fused in (loads with "
            "plain transformers).",
        ),
    ] = False,
    force: Annotated[
        bool,
        typer.Option("--force", help="--merged: accept a base whose weight checksums moved."),
    ] = False,
) -> None:
    """Export a run's adapter (of its end or of a checkpoint) or an adapter, as an s2ft or
    PEFT adapter; a merged model; or GGUF files for llama.cpp and Ollama."""
    import json

    from .export import export_run

    _refuse_existing(out)
    path = export_run(source, out, checkpoint, merged, force, format, rank, quant)
    what = {
        "peft": "PEFT LoRA adapter",
        "gguf": f"merged GGUF model ({quant or 'f32'})",
        "gguf-lora": "llama.cpp LoRA adapter",
    }.get(format, "merged model" if merged else "adapter")
    console.print(f"{what} written to {path}", highlight=False)
    if merged and (
        fused_into := json.loads((path / "s2ft_export.json").read_text()).get("fused_into")
    ):
        console.print(f"  the update is fused into {fused_into}", highlight=False)


@app.command("combine")
@user_errors
def combine_command(
    adapters: Annotated[
        list[Path], typer.Argument(help="Adapter directories (two or more).", show_default=False)
    ],
    out: Annotated[Path, _option("Where to write the combined adapter.", "--out")],
    weights: Annotated[
        str | None, _option("One weight per adapter, comma-separated (default 1 each).")
    ] = None,
    force: Annotated[
        bool, typer.Option("--force", help="Combine adapters whose bases' checksums differ.")
    ] = False,
) -> None:
    """Combine adapters trained separately into one (weighted sum of their updates)."""
    from .adapter.combine import combine_directories

    try:
        factors = [float(w) for w in weights.split(",")] if weights else None
    except ValueError:  # combine() refuses nan and inf
        raise S2FTError(f"--weights {weights!r}: give numbers separated by commas.") from None
    _refuse_existing(out)
    overlaps = combine_directories(adapters, out, factors, force)
    console.print(combine_table(len(adapters), overlaps))
    total = sum(o.overlapping for o in overlaps)
    console.print(
        f"{total} overlapping units summed with weights {factors or [1.0] * len(adapters)}; "
        f"adapter written to {out}",
        highlight=False,
    )


# `s2ft merge`, the old name of `combine` (PEFT users read "merge" as fusing into the base):
# hidden from --help, it says so and combines.
@app.command(
    "merge", hidden=True, help="Old name of s2ft combine, kept for this release; use combine."
)
@functools.wraps(combine_command)
def merge_command(*args, **kwargs) -> None:
    err_console.print(
        "[yellow]note:[/] `s2ft merge` is now `s2ft combine`; the old name goes in the next "
        "release.",
        highlight=False,
        soft_wrap=True,
    )
    combine_command(*args, **kwargs)


def _refuse_existing(out: Path) -> None:
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise S2FTError(f"{out} already exists; choose another --out or remove it first.")


def _recipe_files() -> dict[str, Path]:
    """The bundled recipes by name. They are package data (``s2ft_cli.recipes``): the
    repository's ``recipes/`` folder in a source checkout or editable install, a copy
    inside the installed package otherwise."""
    from importlib.resources import files

    try:
        folder = files("s2ft_cli.recipes")
    except ModuleNotFoundError:
        raise S2FTError(
            "This installation of s2ft has no bundled recipes (an editable install made "
            "before they became package data). Reinstall it: `make install`, or "
            "`pip install -e .` in the repository."
        ) from None
    return {
        p.name.removesuffix(".yaml"): Path(str(p))
        for p in sorted(folder.iterdir(), key=lambda p: p.name)
        if p.name.endswith(".yaml")
    }


@app.command("recipes")
@user_errors
def list_recipes() -> None:
    """List the bundled recipes (s2ft init NAME DEST copies one to edit and run)."""
    first_lines = {
        name: path.read_text().splitlines()[0].lstrip("# ").strip()
        for name, path in _recipe_files().items()
    }
    console.print(recipes_table(first_lines))


@app.command("models")
@user_errors
def list_models() -> None:
    """List the model families s2ft fine-tunes: their roles and where they live."""
    from .engine.families import family_rows

    console.print(families_table(family_rows()))


@app.command()
@user_errors
def init(
    name: Annotated[str, typer.Argument(help="A bundled recipe (see s2ft recipes).")],
    dest: Annotated[Path, typer.Argument(help="File (or folder) to copy it to.")],
) -> None:
    """Copy a bundled recipe to edit."""
    files = _recipe_files()
    if name not in files:
        raise S2FTError(f"No bundled recipe {name!r}; available: {', '.join(files)}.")
    target = dest / f"{name}.yaml" if dest.is_dir() else dest
    if target.exists():
        raise S2FTError(f"{target} already exists; choose another destination.")
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_text(files[name].read_text())
    console.print(
        f"wrote {target}; paths in it are relative to its folder, edit them to fit. Then: "
        f"s2ft train {shlex.quote(str(target))}",
        highlight=False,
        soft_wrap=True,
    )


def main() -> None:
    try:
        app()
    except KeyboardInterrupt:
        err_console.print("interrupted")
        sys.exit(130)


if __name__ == "__main__":
    main()
