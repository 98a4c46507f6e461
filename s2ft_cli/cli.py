"""The ``s2ft`` command line: parse, call the library, print. No logic of its own."""

from __future__ import annotations

import functools
import sys
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

from .errors import S2FTError

app = typer.Typer(
    name="s2ft",
    help="Structured Sparse Fine-Tuning (S²FT) for LLaMA-family models, driven by YAML recipes.",
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

    return wrapper


Overrides = Annotated[
    list[str] | None,
    typer.Argument(help="key=value overrides of recipe keys, e.g. s2ft.seed=1", show_default=False),
]


RecipeArg = Annotated[Path, typer.Argument(help="A YAML recipe file.", show_default=False)]


def _ids(units: list[int], limit: int = 12) -> str:
    shown = ", ".join(map(str, units[:limit]))
    return shown + (f", … (+{len(units) - limit})" if len(units) > limit else "")


@app.command()
@user_errors
def select(
    recipe: RecipeArg,
    overrides: Overrides = None,
    json_path: Annotated[
        Path | None, typer.Option("--json", help="Write the selection as JSON to this path.")
    ] = None,
) -> None:
    """Show which heads and channels a recipe trains, without training."""
    from .models import load_model
    from .permute import plan_layout
    from .recipe import load_recipe
    from .selection import select_units

    r = load_recipe(recipe, overrides)
    model = load_model(
        r.model.name_or_path,
        r.model.dtype,
        r.model.trust_remote_code,
        weights=r.s2ft.strategy != "random",
    )
    _, selection = plan_layout(select_units(model, r.s2ft))
    summary = selection.summary(sum(p.numel() for p in model.parameters()))

    cfg = r.s2ft
    table = Table(
        title=f"S²FT selection — {r.model.name_or_path}",
        title_justify="left",
        caption=f"strategy {cfg.strategy}, allocation {cfg.allocation}, seed {cfg.seed}; "
        "unit ids in the original layout",
        caption_justify="left",
    )
    for col, justify in (
        ("layer", "right"),
        ("matrix", "left"),
        ("units", "right"),
        ("selected ids", "left"),
        ("trainable", "right"),
    ):
        table.add_column(col, justify=justify)
    for row in summary["rows"]:
        table.add_row(
            str(row["layer"]),
            row["matrix"],
            f"{len(row['units'])}/{row['of']}",
            _ids(row["units"]),
            f"{row['params']:,}",
        )
    table.add_section()
    table.add_row("total", "", "", "", f"{summary['trainable_params']:,}")
    console.print(table)
    console.print(
        f"trainable parameters: {summary['trainable_params']:,} of {summary['model_params']:,} "
        f"({100 * summary['fraction']:.3f}% of the model)"
    )
    for note in selection.adjustments:
        console.print(f"[yellow]adjusted:[/] {note}", highlight=False)
    if json_path is not None:
        selection.save(json_path)
        console.print(f"selection written to {json_path}")


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
    from .train import train as run_training

    r = load_recipe(recipe, overrides)
    run_training(r, resume=resume, console=console)


RECIPES_DIR = Path(__file__).resolve().parent.parent / "recipes"


def _recipe_files() -> dict[str, Path]:
    return {p.stem: p for p in sorted(RECIPES_DIR.glob("*.yaml"))}


@app.command("recipes")
def list_recipes() -> None:
    """List the bundled recipes."""
    table = Table(title="bundled recipes (s2ft init NAME DEST to copy one)", title_justify="left")
    table.add_column("name")
    table.add_column("what it runs")
    for name, path in _recipe_files().items():
        first = path.read_text().splitlines()[0].lstrip("# ").strip()
        table.add_row(name, first)
    console.print(table)


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
    console.print(f"wrote {target}; paths in it are relative to its folder, edit them to fit.")


def main() -> None:
    try:
        app()
    except KeyboardInterrupt:
        err_console.print("interrupted")
        sys.exit(130)


if __name__ == "__main__":
    main()
