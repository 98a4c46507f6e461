"""Exports of a training run or an adapter: the adapter (of the run's end, or of any
checkpoint), the same as a PEFT LoRA adapter (``adapter/peft.py``: PEFT, vLLM and the other
LoRA servers read it), a complete Hugging Face model with the update fused in, for tools
that know nothing about s2ft, or GGUF files for llama.cpp and Ollama (``gguf.py``: the
merged model, or a llama.cpp LoRA adapter)."""

from __future__ import annotations

import json
from pathlib import Path

from torch import nn

from ..adapter.format import CONFIG_NAME, V1_FILES, Adapter, adapter_of
from ..adapter.peft import SOURCE_NAME, save_peft
from ..adapter.runtime import get_s2ft_model, load_adapter, merge_adapter
from ..engine.models import load_model, load_tokenizer
from ..engine.selection import Selection
from ..errors import S2FTError
from ..files import atomic_write_dir
from ..recipe import Recipe, load_recipe
from ..training.checkpoints import Checkpointer
from ..version import __version__
from .gguf_file import QUANTS


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


FORMATS = ("s2ft", "peft", "gguf", "gguf-lora")
GGUF_FORMATS = ("gguf", "gguf-lora")


def _is_run(path: Path) -> bool:
    return (path / "recipe.yaml").is_file()


def exported_adapter(source: Path, checkpoint: str | None = None) -> Adapter:
    """The adapter of a training run (its end, or ``checkpoint``), or of an adapter
    directory (s2ft's or a PEFT export of ours)."""
    if not _is_run(source):
        holds = (CONFIG_NAME, *(config for config, _ in V1_FILES.values()), SOURCE_NAME)
        if not any((source / name).is_file() for name in holds):
            raise S2FTError(
                f"{source} is not a training run's directory (it has no recipe.yaml) nor an "
                f"adapter directory (no {CONFIG_NAME}); give the output_dir of an s2ft train "
                "run or an adapter directory."
            )
        if checkpoint is not None:
            raise S2FTError(
                f"--checkpoint needs a training run's directory; {source} is an adapter."
            )
        return Adapter.load(source)
    recipe = _run_recipe(source)
    if checkpoint is not None:
        return adapter_of(_trained_model(source, recipe, find_checkpoint(source, checkpoint)))
    if (source / "adapter").is_dir():
        return Adapter.load(source / "adapter")
    names = ", ".join(p.name for p in Checkpointer(source).all()) or "none"
    raise S2FTError(
        f"{source} has no adapter/ yet (the run has not finished); export a checkpoint with "
        f"--checkpoint (its checkpoints: {names}), or resume the run."
    )


def export_run(
    run: str | Path,
    out: str | Path,
    checkpoint: str | None = None,
    merged: bool = False,
    force: bool = False,
    format: str = "s2ft",
    rank: int | None = None,
    quant: str | None = None,
) -> Path:
    """Write the adapter of a run (of its end or of ``checkpoint``) or of an adapter
    directory, in ``format``: ``s2ft`` (GUIDE format) or ``peft`` (a PEFT LoRA adapter,
    padded to ``rank`` when given). With ``merged`` (a run), a Hugging Face model directory
    with the update fused into the weights in the original layout (config, safetensors,
    tokenizer, generation config); a run trained on a quantized base fuses into the base's
    original weights, read again. ``force`` accepts a base whose weights' checksums moved
    since training (shapes must match). ``gguf``: the merged model as one GGUF file, its
    tensors in ``quant`` (``export/gguf_file.py``: f32 by default); ``gguf-lora``: a
    llama.cpp LoRA adapter file."""
    run, out = Path(run), Path(out)
    if format not in FORMATS:
        raise S2FTError(f"--format {format!r}: one of {', '.join(FORMATS)}.")
    if rank is not None and format != "peft":
        raise S2FTError("--rank pads a PEFT export: give it with --format peft.")
    if quant is not None and format != "gguf":
        raise S2FTError("--quant encodes a merged GGUF file: give it with --format gguf.")
    if quant is not None and quant not in QUANTS:
        raise S2FTError(f"--quant {quant!r}: one of {', '.join(QUANTS)}.")
    if format in GGUF_FORMATS:
        return _export_gguf(run, out, checkpoint, format, quant or "f32", force, merged)
    if merged and (format != "s2ft" or not _is_run(run)):
        raise S2FTError(
            "--merged writes a whole model from a training run's directory; it takes no "
            "--format, and an adapter directory has no run to read the base from."
        )
    if not merged:
        adapter = exported_adapter(run, checkpoint)
        return save_peft(adapter, out, rank) if format == "peft" else adapter.save(out)
    recipe = _run_recipe(run)
    if checkpoint is not None:
        model = _trained_model(run, recipe, find_checkpoint(run, checkpoint))
        source = f"{run} {checkpoint}"
    else:
        model = load_adapter(_base(recipe), exported_adapter(run), force=force)
        source = str(run / "adapter")
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


def _export_gguf(
    run: Path, out: Path, checkpoint: str | None, format: str, quant: str, force: bool,
    merged: bool,
) -> Path:  # fmt: skip
    """``--format gguf | gguf-lora`` of a run (``gguf.py``)."""
    from .gguf import export_gguf, export_gguf_lora

    if merged or not _is_run(run):
        raise S2FTError(
            f"--format {format} writes from a training run's directory (the base is read "
            "from its recipe); it takes no --merged (a GGUF file is always merged, a "
            "gguf-lora file never)."
        )
    recipe = _run_recipe(run)
    adapter = exported_adapter(run, checkpoint)
    source = f"{run} {checkpoint}" if checkpoint else str(run / "adapter")
    name = recipe.model.name_or_path
    if format == "gguf":
        return export_gguf(name, _base(recipe), adapter, out, quant, source, force)
    return export_gguf_lora(name, _base(recipe), adapter, out, source)
