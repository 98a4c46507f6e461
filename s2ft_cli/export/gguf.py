"""``s2ft export --format gguf | gguf-lora``: what a run trained, for llama.cpp and Ollama
(docs/COMMANDS.md, ``s2ft export``).

Both start from a GGUF file of the base, the *source*: the file the run's base came from
(a ``.gguf`` path or a packaged model), or, for a Hugging Face base, that base converted
once to float32 by llama.cpp's own converter (``llama_cpp.py``), which writes the
architecture's metadata and tokenizer as llama.cpp expects them. The source's metadata
(tokenizer, chat template, special tokens) is kept; the weights S²FT changed are placed
by :class:`~.gguf_layout.GGUFLayout`, after checking that it places the base's own
weights exactly where the file has them.

``gguf``: the merged model (base + adapter fused in float32, then encoded in ``--quant``);
``gguf-lora``: S²FT's exact LoRA form (the PEFT export's rows/columns identity) as a
llama.cpp LoRA adapter, for the source file or any quantization of it.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from ..adapter.format import Adapter
from ..adapter.peft import lora_pairs
from ..adapter.runtime import load_adapter, merge_adapter
from ..engine.gguf_bases import announce, gguf_file, is_gguf_source
from ..engine.shapes import model_shape, place_of
from ..errors import S2FTError
from ..version import __version__
from .gguf_file import rewrite_gguf, write_lora_gguf
from .gguf_layout import GGUFLayout
from .llama_cpp import converted_base


def source_gguf(name: str, fingerprint: dict) -> Path:
    """The GGUF file of the base ``name`` (``model.name_or_path``), converted once if it is
    a Hugging Face model."""
    return gguf_file(name) if is_gguf_source(name) else converted_base(name, fingerprint)


def _oriented(model: nn.Module, family, name: str) -> torch.Tensor:
    """Weight ``name`` (an adapter's name) of ``model`` in the ``(out, in)`` orientation."""
    place = place_of(family, name)
    weight = model.get_parameter(name if place.experts else f"{name}.weight").detach()
    return weight.transpose(-1, -2) if place.transposed else weight


@dataclass
class Placement:
    """Where the base's adapted weights lie in the source file: its reader, the layout,
    and the adapter weight each of the file's tensors concerned comes from."""

    source: Path
    reader: object  # gguf.GGUFReader
    layout: GGUFLayout
    owners: dict[str, str]


def _placement(base: nn.Module, source: Path, names: list[str]) -> Placement:
    """The placement of the base's weights ``names`` in ``source``, checked: each, placed,
    must be the file's tensor (to the precision the base was loaded in)."""
    from gguf import GGUFReader, Keys
    from gguf.quants import dequantize

    reader = GGUFReader(source)
    tensors = {t.name: t for t in reader.tensors}
    shape = model_shape(base)
    arch = reader.fields[Keys.General.ARCHITECTURE].contents()
    layout = GGUFLayout(shape, arch, set(tensors))
    owners = {}
    for name in names:
        for gguf_name, values in layout.pieces(name, _oriented(base, shape.family, name)):
            tensor = tensors[gguf_name]
            held = torch.tensor(dequantize(tensor.data, tensor.tensor_type)).flatten()
            values = values.float().flatten()
            scale = values.abs().max()
            if held.numel() != values.numel() or (values - held).abs().max() > 1e-2 * scale:
                raise S2FTError(
                    f"{source}'s {gguf_name} is not the base's {name} laid out as s2ft lays "
                    f"out {arch} weights: s2ft cannot place the update in this "
                    "file. Export a merged Hugging Face model (--merged) and convert it with "
                    "llama.cpp."
                )
            owners[gguf_name] = name
    return Placement(source, reader, layout, owners)


def _provenance(source: Path, adapter_source: str) -> dict[str, str]:
    return {
        "s2ft.adapter": adapter_source,
        "s2ft.base_gguf": str(source),
        "s2ft.tool_version": f"s2ft {__version__}",
    }


def export_gguf(
    name: str,
    base: nn.Module,
    adapter: Adapter,
    out: Path,
    quant: str = "f32",
    adapter_source: str = "",
    force: bool = False,
) -> Path:
    """The merged model of ``adapter`` on ``base`` (loaded from ``name``, unconverted) as one
    GGUF file, every tensor in ``quant``."""
    fingerprint = adapter.config["base_model"]["fingerprint"]
    placement = _placement(base, source_gguf(name, fingerprint), sorted(adapter.updates))
    model = merge_adapter(load_adapter(base, adapter, force=force))
    family = placement.layout.family
    pending: dict[str, np.ndarray] = {}

    def placed(gguf_name: str):
        def make() -> np.ndarray:  # one weight's pieces at a time, when the writer asks
            if gguf_name not in pending:
                owner = placement.owners[gguf_name]
                for piece, values in placement.layout.pieces(
                    owner, _oriented(model, family, owner)
                ):
                    pending[piece] = values.float().numpy()
            return pending.pop(gguf_name)

        return make

    replaced = {gguf_name: placed(gguf_name) for gguf_name in placement.owners}
    metadata = _provenance(placement.source, adapter_source)
    return rewrite_gguf(placement.reader, out, quant, replaced, metadata)


def export_gguf_lora(
    name: str,
    base: nn.Module,
    adapter: Adapter,
    out: Path,
    adapter_source: str = "",
) -> Path:
    """``adapter`` as a llama.cpp LoRA adapter for the GGUF file of ``base`` (loaded from
    ``name``), which it names on stderr."""
    pairs = lora_pairs(adapter, "llama.cpp's LoRA adapter format")
    fingerprint = adapter.config["base_model"]["fingerprint"]
    placement = _placement(base, source_gguf(name, fingerprint), sorted(pairs))
    factors = {}
    for name, (a, b) in sorted(pairs.items()):
        for gguf_name, rows in placement.layout.pieces(name, b):
            factors[gguf_name] = (a.float().numpy(), rows.float().numpy())
    write_lora_gguf(
        out, placement.layout.arch, factors, _provenance(placement.source, adapter_source)
    )
    announce(
        f"the adapter applies to {placement.source} (or a quantization of it): llama-cli -m "
        f"{placement.source} --lora {out}"
    )
    return out
