"""Recipes: YAML files that describe a run, validated with pydantic.

A recipe reads top to bottom like the run it describes (``model:`` then ``s2ft:``; the
training sections join them in later stages). Unknown keys are refused with the nearest
valid name, ``key=value`` overrides from the command line are applied before validation,
and relative paths resolve against the recipe file's folder.
"""

from __future__ import annotations

import difflib
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from .config import S2FTConfig
from .errors import S2FTError


class ModelSection(BaseModel):
    """``model:``: what to fine-tune."""

    model_config = ConfigDict(extra="forbid")

    name_or_path: str = Field(
        description="Hub id, local directory, or a built-in preset such as preset:tiny-llama."
    )
    dtype: Literal["float32", "bfloat16", "float16"] = Field(
        "float32", description="Weights' dtype when loaded."
    )
    gradient_checkpointing: bool = Field(False, description="Recompute activations in backward.")
    trust_remote_code: bool = Field(False, description="Allow a checkpoint's own Python code.")


class Recipe(BaseModel):
    """A whole recipe."""

    model_config = ConfigDict(extra="forbid")

    model: ModelSection
    s2ft: S2FTConfig
    output_dir: str | None = Field(None, description="Where a run writes its files.")


def _fields_at(loc: tuple) -> list[str]:
    """Valid key names at a location of the recipe (for 'did you mean')."""
    node: Any = Recipe
    for part in loc:
        field = getattr(node, "model_fields", {}).get(part)
        if field is None:
            break
        node = field.annotation
    return list(getattr(node, "model_fields", {}))


def _describe(err: ValidationError, source: str) -> str:
    lines = []
    for e in err.errors():
        loc = tuple(p for p in e["loc"] if isinstance(p, str | int))
        key = ".".join(map(str, loc))
        if e["type"] == "extra_forbidden":
            valid = _fields_at(loc[:-1])
            near = difflib.get_close_matches(str(loc[-1]), valid, n=1)
            hint = f" Did you mean {'.'.join(map(str, (*loc[:-1], near[0])))!r}?" if near else ""
            lines.append(f"unknown key {key!r}.{hint} Valid keys here: {', '.join(valid)}.")
        elif e["type"] == "missing":
            lines.append(f"missing key {key!r}.")
        else:
            msg = e["msg"].removeprefix("Value error, ")
            lines.append(f"{key}: {msg} (got {e.get('input')!r}).")
    return f"Invalid recipe {source}: " + " ".join(lines)


def _parse_override(item: str) -> tuple[list[str], Any]:
    key, sep, value = item.partition("=")
    if not sep or not key:
        raise S2FTError(
            f"Override {item!r} is not key=value; write e.g. s2ft.seed=1 or train.lr=1e-4."
        )
    return key.strip().split("."), yaml.safe_load(value)


def _apply_override(data: dict, keys: list[str], value: Any) -> None:
    node = data
    for k in keys[:-1]:
        if not isinstance(node.setdefault(k, {}), dict):
            raise S2FTError(f"Override {'.'.join(keys)}: {k!r} is not a section of the recipe.")
        node = node[k]
    node[keys[-1]] = value


def _resolve(value: str, base: Path) -> str:
    """A relative path against the recipe's folder; hub ids and presets stay as they are."""
    if value.startswith(("./", "../")) or (base / value).exists():
        return str((base / value).resolve())
    return value


def load_recipe(path: str | Path, overrides: list[str] | None = None) -> Recipe:
    """Read, override and validate a recipe; every mistake is an :class:`S2FTError`."""
    path = Path(path)
    if not path.is_file():
        raise S2FTError(f"Recipe {path} does not exist; give the path of a YAML recipe file.")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as err:
        raise S2FTError(f"Recipe {path} is not valid YAML: {err}") from err
    if not isinstance(data, dict):
        raise S2FTError(f"Recipe {path} must be a mapping of sections (model:, s2ft:, ...).")
    for item in overrides or []:
        _apply_override(data, *_parse_override(item))
    try:
        recipe = Recipe.model_validate(data)
    except ValidationError as err:
        raise S2FTError(_describe(err, str(path))) from None
    base = path.resolve().parent
    recipe.model.name_or_path = _resolve(recipe.model.name_or_path, base)
    if recipe.output_dir is not None:
        recipe.output_dir = str((base / recipe.output_dir).resolve())
    return recipe
