"""llama.cpp's converter of Hugging Face models to GGUF, for a GGUF export of a run whose
base is a Hugging Face model: the base is converted once to float32 (cached like GGUF
bases, ``engine/gguf_bases.py``), and the export places the trained weights in that file.

The converter (``convert_hf_to_gguf.py`` with its ``conversion/`` and ``gguf-py/``) is not
on the package index: s2ft finds it in ``$S2FT_LLAMA_CPP`` (a llama.cpp checkout) or in
``<virtualenv>/llama.cpp`` (where the repository's ``make install`` puts it).
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

from ..engine.gguf_bases import cache_root, made_once
from ..engine.models import PRESET_PREFIX
from ..errors import S2FTError
from ..files import atomic_write_path

CONVERTER = "convert_hf_to_gguf.py"


def find_converter() -> Path:
    """llama.cpp's ``convert_hf_to_gguf.py``, or a refusal saying how to get it."""
    places = [Path(os.environ["S2FT_LLAMA_CPP"])] if os.environ.get("S2FT_LLAMA_CPP") else []
    places.append(Path(sys.prefix) / "llama.cpp")
    for place in places:
        if (place / CONVERTER).is_file():
            return place / CONVERTER
    raise S2FTError(
        "A GGUF export of a run on a Hugging Face base needs llama.cpp's converter, which "
        "writes the architecture's metadata and tokenizer: git clone "
        "https://github.com/ggml-org/llama.cpp, pip install -r "
        "llama.cpp/requirements/requirements-convert_hf_to_gguf.txt, and set S2FT_LLAMA_CPP "
        f"to the clone (looked in: {', '.join(str(p) for p in places)}). A run on a GGUF "
        "base (a .gguf file or a packaged model) needs none."
    )


def _hf_folder(name: str) -> Path:
    """The base's Hugging Face folder: its own, or the hub's snapshot."""
    if name.startswith(PRESET_PREFIX):
        raise S2FTError(
            f"{name} has a character-level test tokenizer, which GGUF cannot carry; export "
            "a run on a real model (a hub id, a folder, or a GGUF base)."
        )
    if Path(name).expanduser().is_dir():
        return Path(name).expanduser()
    from huggingface_hub import snapshot_download

    return Path(snapshot_download(name))


def converted_base(name: str, fingerprint: dict) -> Path:
    """The base (``name`` as ``model.name_or_path`` gives it) as a float32 GGUF file,
    converted on first use and cached by the base's fingerprint."""
    digest = hashlib.sha256(json.dumps(fingerprint, sort_keys=True).encode()).hexdigest()
    target = cache_root() / "gguf-export" / digest[:32] / "base-f32.gguf"
    if target.is_file():
        return target
    converter = find_converter()
    folder = _hf_folder(name)

    def convert(partial: Path) -> None:
        command = [sys.executable, str(converter), str(folder), "--outtype", "f32"]
        done = subprocess.run([*command, "--outfile", str(partial)], capture_output=True, text=True)
        if done.returncode != 0:
            raise S2FTError(
                f"llama.cpp's converter could not convert {name}:\n{done.stderr[-2000:]}"
            )

    made_once(
        target,
        lambda: atomic_write_path(target, convert),
        f"converting the base {name} to GGUF once with llama.cpp's converter: {target}",
    )
    return target
