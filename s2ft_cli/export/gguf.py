"""``s2ft export --format gguf | gguf-lora``: what a run trained, for llama.cpp and Ollama
(docs/SERVING.md, "llama.cpp and Ollama").

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

import sys
from pathlib import Path

import numpy as np
import torch
from torch import nn

from ..adapter.format import Adapter
from ..adapter.peft import lora_pairs
from ..adapter.runtime import load_adapter, merge_adapter
from ..engine.gguf_bases import PACKAGED_MODELS, is_gguf_source, packaged_model_file
from ..engine.shapes import model_shape, place_of
from ..errors import S2FTError
from ..version import __version__
from .gguf_file import rewrite_gguf, write_lora_gguf
from .gguf_layout import GGUFLayout
from .llama_cpp import converted_base


def source_gguf(name: str, fingerprint: dict) -> Path:
    """The GGUF file of the base ``name`` (``model.name_or_path``), converted once if it is
    a Hugging Face model."""
    if name in PACKAGED_MODELS:
        return packaged_model_file(name)
    if is_gguf_source(name):
        return Path(name).expanduser()
    return converted_base(name, fingerprint)


def _oriented(base: nn.Module, name: str) -> torch.Tensor:
    """Weight ``name`` (an adapter's name) of ``base`` in the ``(out, in)`` orientation."""
    place = place_of(model_shape(base).family, name)
    weight = base.get_parameter(name if place.experts else f"{name}.weight").detach()
    return weight.transpose(-1, -2) if place.transposed else weight


def _file_layout(base: nn.Module, source: Path, names: list[str]):
    """The source's reader and the layout of the base's weights ``names`` in it, checked:
    each, placed, must be the file's tensor (to the precision the base was loaded in)."""
    from gguf import GGUFReader, Keys
    from gguf.quants import dequantize

    reader = GGUFReader(source)
    tensors = {t.name: t for t in reader.tensors}
    arch = reader.fields[Keys.General.ARCHITECTURE].contents()
    layout = GGUFLayout(model_shape(base), arch, set(tensors))
    for name in names:
        for gguf_name, values in layout.pieces(name, _oriented(base, name)):
            tensor = tensors[gguf_name]
            held = torch.tensor(dequantize(tensor.data, tensor.tensor_type)).flatten()
            values = values.float().flatten()
            scale = values.abs().max()
            if held.numel() != values.numel() or (values - held).abs().max() > 1e-2 * scale:
                raise S2FTError(
                    f"{source}'s {gguf_name} is not the base's {name} laid out as s2ft lays "
                    f"out {arch} weights: s2ft cannot place the update in this file. Export "
                    "a merged Hugging Face model (--merged) and convert it with llama.cpp."
                )
    return reader, layout


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
    names = sorted(adapter.updates)
    fingerprint = adapter.config["base_model"]["fingerprint"]
    source = source_gguf(name, fingerprint)
    _, layout = _file_layout(base, source, names)
    model = merge_adapter(load_adapter(base, adapter, force=force))
    pending: dict[str, np.ndarray] = {}

    def placed(name: str, gguf_name: str):
        def make() -> np.ndarray:
            if gguf_name not in pending:
                for piece, values in layout.pieces(name, _oriented(model, name)):
                    pending[piece] = values.float().numpy()
            return pending.pop(gguf_name)

        return make

    replaced = {
        gguf_name: placed(name, gguf_name)
        for name in names
        for gguf_name, _ in layout.pieces(name, _oriented(model, name)[..., :1])
    }
    return rewrite_gguf(source, out, quant, replaced, _provenance(source, adapter_source))


def export_gguf_lora(
    name: str,
    base: nn.Module,
    adapter: Adapter,
    out: Path,
    adapter_source: str = "",
) -> Path:
    """``adapter`` as a llama.cpp LoRA adapter for the GGUF file of ``base`` (loaded from
    ``name``), which it names on stderr."""
    from gguf import Keys

    pairs = lora_pairs(adapter, "llama.cpp's LoRA adapter format")
    fingerprint = adapter.config["base_model"]["fingerprint"]
    source = source_gguf(name, fingerprint)
    reader, layout = _file_layout(base, source, sorted(pairs))
    factors = {}
    for name, (a, b) in sorted(pairs.items()):
        for gguf_name, rows in layout.pieces(name, b):
            factors[gguf_name] = (a.float().numpy(), rows.float().numpy())
    arch = reader.fields[Keys.General.ARCHITECTURE].contents()
    write_lora_gguf(out, arch, factors, _provenance(source, adapter_source))
    print(
        f"the adapter applies to {source} (or a quantization of it): llama-cli -m {source} "
        f"--lora {out}",
        file=sys.stderr,
        flush=True,
    )
    return out
