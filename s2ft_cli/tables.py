"""Every table s2ft prints, built from plain data: the command line, ``s2ft eval``'s runner
and ``s2ft data``'s preview render through here, so titles, columns and number formats
live in one place. Nothing here computes what it shows."""

from __future__ import annotations

from collections.abc import Iterable

from rich.table import Table


def _table(title: str, columns: Iterable[str], caption: str | None = None) -> Table:
    """A left-titled table whose first column is text and the others numbers."""
    table = Table(title=title, title_justify="left", caption=caption, caption_justify="left")
    for k, col in enumerate(columns):
        table.add_column(col, justify="left" if k == 0 else "right")
    return table


def _ids(units: list[int], limit: int = 12) -> str:
    shown = ", ".join(map(str, units[:limit]))
    return shown + (f", … (+{len(units) - limit})" if len(units) > limit else "")


# --- s2ft select ------------------------------------------------------------------------


def selection_table(model: str, describe: str, summary: dict) -> Table:
    """One row per layer and target matrix (``Selection.summary``), then the total."""
    table = Table(
        title=f"S²FT selection — {model}",
        title_justify="left",
        caption=f"{describe}; unit ids in the original layout",
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
    return table


def score_table(strategy: str, rows: list[tuple[str, list[float], tuple | None]]) -> Table:
    """Per target matrix, the quartiles of the strategy's unit scores and the range the
    selected units span (``Selection.score_quartiles``)."""
    table = _table(
        f"{strategy} scores (all units of the scored layers)",
        ("matrix", "min", "25%", "median", "75%", "max", "selected range"),
    )
    for matrix, quartiles, picked in rows:
        span = f"{picked[0]:.4g} … {picked[1]:.4g}" if picked else "—"
        table.add_row(matrix, *(f"{v:.4g}" for v in quartiles), span)
    return table


# --- s2ft plan ---------------------------------------------------------------------------


def memory_table(title: str, caption: str, parts: list[tuple[str, float]], totals) -> Table:
    """The parts of a run's memory per GPU and its totals, in GiB."""
    table = _table(title, ("part", "GiB"), caption)
    for part, gib in parts:
        table.add_row(part, f"{gib:.2f}")
    table.add_section()
    for label, gib in totals:
        table.add_row(label, f"{gib:.2f}")
    return table


# --- s2ft combine, s2ft recipes ----------------------------------------------------------


def combine_table(count: int, overlaps) -> Table:
    """Per matrix of a combination: its units and how many of them several adapters train."""
    table = _table(f"combined {count} adapters", ("matrix", "units", "overlapping"))
    for o in overlaps:
        table.add_row(o.matrix, str(o.units), str(o.overlapping))
    return table


def families_table(rows: list[dict[str, str]]) -> Table:
    """The model families s2ft knows (``families.family_rows``)."""
    table = Table(
        title="model families (s2ft.targets names the roles; a unit is a head or a channel)",
        title_justify="left",
        caption="every role: q/k/v/o select heads, gate/up/down channels (docs/FAMILIES.md)",
        caption_justify="left",
    )
    for column in ("model type", "roles", "weights", "notes"):
        table.add_column(column, overflow="fold")
    for row in rows:
        notes = "; ".join(n for n in (row["family"], row["units"], row["notes"]) if n)
        table.add_row(row["model type"], row["roles"], row["weights"], notes)
    return table


def recipes_table(recipes: dict[str, str]) -> Table:
    """The bundled recipes, each with its first line."""
    table = Table(title="bundled recipes (s2ft init NAME DEST to copy one)", title_justify="left")
    table.add_column("name")
    table.add_column("what it runs")
    for name, what in recipes.items():
        table.add_row(name, what)
    return table


# --- s2ft data ---------------------------------------------------------------------------


def records_table(sources) -> Table:
    """What became of each data source's records (``SourceStats``)."""
    table = Table(title="records", title_justify="left")
    table.add_column("source", overflow="fold")
    for col in ("records", "examples", "dropped", "truncated"):
        table.add_column(col, justify="right")
    for s in sources:
        dropped = s.records - s.examples
        table.add_row(s.name, str(s.records), str(s.examples), str(dropped), str(s.truncated))
    return table


def examples_table(batch_size: int, sets: list[tuple[str, object]]) -> Table:
    """Per set, its examples' lengths, target share and padding (``SetStats``)."""
    table = _table(
        f"examples (batch size {batch_size})",
        ("set", "examples", "tokens", "min", "median", "max", "targets", "padding"),
    )
    for label, s in sets:
        table.add_row(
            label,
            f"{s.examples:,}",
            f"{s.tokens:,}",
            str(s.shortest),
            f"{s.median:g}",
            str(s.longest),
            f"{s.targets / max(s.tokens, 1):.1%}",
            f"{s.padding:.1%}",
        )
    return table


# --- s2ft eval ---------------------------------------------------------------------------


def _percent(x: float) -> str:
    return f"{100 * x:.1f}"


def _with_interval(r: dict) -> str:
    """An accuracy with its 95 % interval, e.g. ``56.6 (52.2–60.9)``."""
    low, high = r["ci95"]
    return f"{_percent(r['accuracy'])} ({_percent(low)}–{_percent(high)})"


def results_table(title: str, results: dict) -> Table:
    """One model's accuracy per task, then each group's average (and speed when timed)."""
    timing = results.get("timing", {})
    columns = ("task", "n", "correct", "accuracy % (95% CI)")
    table = _table(title, columns + (("examples/s",) if timing else ()))
    for name, r in results["tasks"].items():
        speed = (f"{timing[name]['examples_per_s']:.1f}",) if name in timing else ()
        table.add_row(name, str(r["n"]), str(r["correct"]), _with_interval(r), *speed)
    if results["groups"]:
        table.add_section()
    for group, g in results["groups"].items():
        blank = ("",) if timing else ()
        table.add_row(f"{group} (avg)", str(g["n"]), "", _percent(g["accuracy"]), *blank)
    return table


def comparison_table(named: dict[str, dict]) -> Table:
    """Accuracy per task (rows), with its 95 % interval, for several models or adapters
    (columns)."""
    table = _table(
        "accuracy % (95% confidence interval) by adapter",
        ("task", "n", *named),
        caption="intervals: Wilson score intervals over the task's n examples",
    )
    first = next(iter(named.values()))
    for task in first["tasks"]:
        cells = [_with_interval(r["tasks"][task]) for r in named.values()]
        table.add_row(task, str(first["tasks"][task]["n"]), *cells)
    if first["groups"]:
        table.add_section()
    for group in first["groups"]:
        averages = (_percent(r["groups"][group]["accuracy"]) for r in named.values())
        table.add_row(f"{group} (avg)", str(first["groups"][group]["n"]), *averages)
    return table
