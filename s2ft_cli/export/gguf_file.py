"""GGUF files written with the ``gguf`` package (its reader, writer and quantizers): a copy
of a source file, its metadata kept (architecture, tokenizer, chat template, special
tokens) and some tensors replaced, every tensor encoded in one type; and llama.cpp's LoRA
adapter files.

Encodings follow llama.cpp's converter: one-dimensional tensors (norms, biases) stay F32,
the others take the asked type, F16 where a row is no whole number of the type's blocks;
``source`` keeps each tensor's own type, and so the untouched tensors' bytes; a replaced
one is re-quantized into its type when that has 8 bits or more, and into Q8_0 otherwise (and
where the gguf package cannot quantize the type): a 4-bit grid's steps are coarser than a
fine-tuning update, and re-quantizing onto it rounds much of the update away
(docs/BENCHMARKS.md, "Exports in llama.cpp"), as llama.cpp's own mixtures keep some tensors
wider.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import cache
from math import prod
from pathlib import Path

import numpy as np

from ..engine.gguf_bases import announce
from ..errors import S2FTError
from ..files import atomic_write_path

QUANTS = ("f32", "f16", "bf16", "q8_0", "q4_0", "q4_1", "source")


@cache
def _types():
    """(the --quant types, their file types, the types a replaced tensor keeps)."""
    from gguf import GGMLQuantizationType as T
    from gguf import LlamaFileType as F

    types = {"f32": T.F32, "f16": T.F16, "bf16": T.BF16, "q8_0": T.Q8_0, "q4_0": T.Q4_0}
    types["q4_1"] = T.Q4_1
    file_types = {
        T.F32: F.ALL_F32, T.F16: F.MOSTLY_F16, T.BF16: F.MOSTLY_BF16, T.Q8_0: F.MOSTLY_Q8_0,
        T.Q4_0: F.MOSTLY_Q4_0, T.Q4_1: F.MOSTLY_Q4_1,
    }  # fmt: skip
    # the types a replaced tensor keeps under ``source``: 8 bits a weight or more, and the
    # gguf package quantizes them (it dequantizes every type)
    wide = {T.F32, T.F16, T.BF16, T.Q8_0}
    return types, file_types, wide


def _numpy_shape(tensor) -> tuple[int, ...]:
    """A reader tensor's logical shape, numpy order (GGUF lists dimensions fastest first)."""
    return tuple(int(n) for n in reversed(tensor.shape.tolist()))


def _nbytes(shape: tuple[int, ...], qtype) -> int:
    from gguf import GGML_QUANT_SIZES

    block, size = GGML_QUANT_SIZES[qtype]
    return prod(shape[:-1]) * (shape[-1] // block) * size


def _encoding(tensor, qtype, replaced: bool, keep_source: bool):
    """The type ``tensor`` is written in, or None to copy its bytes unchanged."""
    from gguf import GGML_QUANT_SIZES
    from gguf import GGMLQuantizationType as T

    _, _, wide = _types()
    source = tensor.tensor_type
    if source in (T.I8, T.I16, T.I32, T.I64, T.F64):
        return None
    if keep_source:
        if not replaced:
            return None
        return source if source in wide else T.Q8_0
    shape = _numpy_shape(tensor)
    if len(shape) <= 1:
        return T.F32
    block = GGML_QUANT_SIZES[qtype][0]
    return qtype if shape[-1] % block == 0 else T.F16


def _copy_metadata(reader, writer, skip: set[str]) -> None:
    from gguf import GGUFValueType, Keys

    for field in reader.fields.values():
        name = field.name
        if name == Keys.General.ARCHITECTURE or name.startswith("GGUF.") or name in skip:
            continue
        vtype = field.types[0]
        sub_type = field.types[-1] if vtype == GGUFValueType.ARRAY else None
        writer.add_key_value(name, field.contents(), vtype, sub_type=sub_type)


def rewrite_gguf(
    reader,
    out: Path,
    quant: str,
    replaced: dict[str, Callable[[], np.ndarray]],
    metadata: dict[str, str],
) -> Path:
    """Write the file ``reader`` (a ``gguf.GGUFReader``) reads to ``out``: the tensors
    named in ``replaced`` taken from their callables (float32, the file's shape; each called
    once, when written), every tensor in ``quant`` (:data:`QUANTS`), ``metadata`` added as
    strings."""
    from gguf import GGUFWriter, Keys
    from gguf.quants import dequantize, quantize

    if quant not in QUANTS:
        raise S2FTError(f"--quant {quant!r}: one of {', '.join(QUANTS)}.")
    types, file_types, _ = _types()
    arch = reader.fields[Keys.General.ARCHITECTURE].contents()
    keep = quant == "source"
    qtype = None if keep else types[quant]

    def write(path: Path) -> None:
        writer = GGUFWriter(path, arch)
        _copy_metadata(reader, writer, skip=set() if keep else {Keys.General.FILE_TYPE})
        if not keep:
            writer.add_file_type(int(file_types[qtype]))
        for key, value in metadata.items():
            writer.add_string(key, value)
        plan = []
        for tensor in reader.tensors:
            encoding = _encoding(tensor, qtype, tensor.name in replaced, keep)
            shape = _numpy_shape(tensor)
            if encoding is None:
                nbytes, raw_type = tensor.n_bytes, tensor.tensor_type
            else:
                nbytes, raw_type = _nbytes(shape, encoding), encoding
            writer.add_tensor_info(tensor.name, shape, np.float32, nbytes, raw_dtype=raw_type)
            plan.append((tensor, encoding, shape))
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_ti_data_to_file()
        every = max(1, len(plan) // 10)
        for i, (tensor, encoding, shape) in enumerate(plan, 1):
            if encoding is None:
                data = tensor.data
            else:
                make = replaced.get(tensor.name)
                values = make() if make else dequantize(tensor.data, tensor.tensor_type)
                values = np.ascontiguousarray(values, dtype=np.float32).reshape(shape)
                data = quantize(values, encoding)
            writer.write_tensor_data(data, tensor_endianess=reader.endianess)
            if i % every == 0 or i == len(plan):
                announce(f"  {i}/{len(plan)} tensors written")
        writer.close()

    announce(f"writing {out} ({quant}, {len(reader.tensors)} tensors)")
    atomic_write_path(out, write)
    return out


def write_lora_gguf(
    out: Path, arch: str, factors: dict[str, tuple[np.ndarray, np.ndarray]], metadata: dict
) -> Path:
    """A llama.cpp LoRA adapter: for each base tensor ``name``, ``name.lora_a`` (rank × in)
    and ``name.lora_b`` (out × rank), float32; ``adapter.lora.alpha`` 0, by which llama.cpp
    scales every pair by 1 (its scale is alpha / rank otherwise)."""
    from gguf import GGUFWriter, Keys

    def write(path: Path) -> None:
        writer = GGUFWriter(path, arch)
        writer.add_string(Keys.General.TYPE, "adapter")
        writer.add_string(Keys.Adapter.TYPE, "lora")
        writer.add_float32(Keys.Adapter.LORA_ALPHA, 0.0)
        for key, value in metadata.items():
            writer.add_string(key, value)
        for name, (a, b) in factors.items():
            writer.add_tensor(f"{name}.lora_a", np.ascontiguousarray(a, dtype=np.float32))
            writer.add_tensor(f"{name}.lora_b", np.ascontiguousarray(b, dtype=np.float32))
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()

    atomic_write_path(out, write)
    return out
