"""Exports of a training run: its adapter (of the end, or of any checkpoint), or a complete
Hugging Face model with the update fused in, for tools that know nothing about s2ft."""

from __future__ import annotations

import json
from pathlib import Path

from torch import nn

from . import __version__
from .adapter import Adapter, load_adapter, merge_adapter, save_adapter
from .checkpoints import Checkpointer
from .convert import get_s2ft_model
from .errors import S2FTError
from .files import atomic_write_dir
from .models import load_model, load_tokenizer
from .recipe import Recipe, load_recipe
from .selection import Selection


def find_checkpoint(run: Path, name: str) -> Path:
    """A checkpoint of a run by its folder name (``step-0000200``) or step (``200``)."""
    return Checkpointer(run).find(name)


def _run_recipe(run: Path) -> Recipe:
    if not (run / "recipe.yaml").is_file():
        raise S2FTError(
            f"{run} is not a training run's directory (it has no recipe.yaml); give the "
            "output_dir of an s2ft train run."
        )
    return load_recipe(run / "recipe.yaml")


def _base(recipe: Recipe) -> nn.Module:
    m = recipe.model
    return load_model(m.name_or_path, m.dtype, m.trust_remote_code, seed=recipe.train.seed)


def _trained_model(run: Path, recipe: Recipe, checkpoint: Path) -> nn.Module:
    """The base model converted with the run's selection and the checkpoint's deltas."""
    if not (run / "selection.json").is_file():
        raise S2FTError(f"{run} has no selection.json; it is not a complete s2ft train run.")
    selection = Selection.from_json((run / "selection.json").read_text())
    meta = Checkpointer.meta(checkpoint)
    if meta.get("selection") != selection.to_dict()["units"]:
        raise S2FTError(
            f"{checkpoint} was trained with another selection than {run / 'selection.json'}; "
            "the run directory is inconsistent."
        )
    model = get_s2ft_model(_base(recipe), recipe.s2ft, selection=selection)
    Checkpointer.load_deltas(model, checkpoint)
    return model


def export_run(
    run: str | Path,
    out: str | Path,
    checkpoint: str | None = None,
    merged: bool = False,
    force: bool = False,
) -> Path:
    """Write the run's adapter (GUIDE format), of its end or of ``checkpoint``; with
    ``merged``, a Hugging Face model directory with the update fused into the weights in the
    original layout (config, safetensors, tokenizer, generation config); a run trained on a
    quantized base fuses into the base's original weights, read again. ``force`` accepts
    a base whose weights' checksums moved since training (shapes must match)."""
    run, out = Path(run), Path(out)
    recipe = _run_recipe(run)
    if checkpoint is not None:
        model = _trained_model(run, recipe, find_checkpoint(run, checkpoint))
        source = f"{run} {checkpoint}"
    elif (run / "adapter").is_dir():
        if not merged:  # the adapter as it is: no base model needed
            return Adapter.load(run / "adapter").save(out)
        model = load_adapter(_base(recipe), run / "adapter", force=force)
        source = str(run / "adapter")
    else:
        names = ", ".join(p.name for p in Checkpointer(run).all()) or "none"
        raise S2FTError(
            f"{run} has no adapter/ yet (the run has not finished); export a checkpoint with "
            f"--checkpoint (its checkpoints: {names}), or resume the run."
        )
    if not merged:
        return save_adapter(model, out)
    model = merge_adapter(model)
    tokenizer = load_tokenizer(recipe.model.name_or_path, recipe.model.trust_remote_code)
    provenance = {"merged_from": source, "tool_version": f"s2ft {__version__}"}
    if recipe.model.quantization != "none":  # the base as loaded, never a dequantized one
        provenance["fused_into"] = (
            f"the original weights of {recipe.model.name_or_path}, read again: the run trained "
            f"on a {recipe.model.quantization}-quantized copy of them"
        )

    def write(tmp: Path) -> None:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        (tmp / "s2ft_export.json").write_text(json.dumps(provenance, indent=1))

    atomic_write_dir(out, write)
    return out
