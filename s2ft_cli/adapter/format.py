"""S²FT adapters on disk and in memory (paper §5): the :class:`Adapter` (its config and its
updates), its files, and a model's ``save_pretrained`` that writes them.

An adapter is the trained update as rows or columns of the original (un-permuted)
matrices. Directory format, version 2:

* ``s2ft_adapter.json``: ``format: "s2ft-adapter"``, ``version: 2``, the base model's
  name and fingerprint (``fingerprint.py``), the targets, strategy, seed, allocation,
  delta dtype and the tool version;
* ``s2ft_adapter.safetensors``: for each adapted weight ``M`` (full module path, or an
  experts tensor's path) ``M.cols`` (int64 column ids) and ``M.delta`` of shape
  ``(rows, len(cols))``, or ``M.rows`` and ``M.delta`` of shape ``(len(rows), cols)``.
  Applying means ``W[:, cols] += delta`` / ``W[rows, :] += delta``, ``W`` the weight as
  stored (a GPT-2 Conv1D's ``(in, out)``), a 3-D experts tensor with its experts stacked
  along the axis its units lie on (``engine.shapes.Matrix``).

Version 1 had the same contents under PEFT's file names (``adapter_config.json``,
``adapter_model.safetensors``), which transformers and PEFT took for a PEFT adapter: it is
still read. A PEFT LoRA export of an adapter (``peft.py``) is read back as the adapter it
came from.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn
from torch.distributed.tensor import DTensor

from ..engine.layers import S2Layer, Update, s2_layers
from ..engine.state import state_of
from ..errors import S2FTError
from ..files import atomic_write_dir, read_json
from ..version import __version__
from .fingerprint import Fingerprint, remember_base_fingerprint
from .peft import is_peft_export, read_peft_export

ADAPTER_FORMAT = "s2ft-adapter"
ADAPTER_VERSION = 2
CONFIG_NAME = "s2ft_adapter.json"
WEIGHTS_NAME = "s2ft_adapter.safetensors"
# Version 1's file names (PEFT's): read, never written.
V1_FILES = {1: ("adapter_config.json", "adapter_model.safetensors")}


@dataclass(eq=False)
class Adapter:
    """An adapter in memory: its config (with the base's fingerprint) and, per adapted
    matrix (full module path), its :class:`Update`. ``source`` names it in messages."""

    config: dict
    updates: dict[str, Update]
    source: str = "adapter"

    @classmethod
    def load(cls, path: str | Path) -> Adapter:
        """Read and validate an adapter directory (every tensor against the fingerprint's
        matrix shapes) without a model; a PEFT export of an adapter reads as that adapter."""
        path = Path(path)
        if is_peft_export(path):
            return cls.from_tensors(*read_peft_export(path), f"PEFT export {path}")
        return cls.from_tensors(*read_adapter(path), f"Adapter {path}")

    @classmethod
    def from_tensors(
        cls, config: dict, tensors: dict, files: tuple[Path, Path], source: str
    ) -> Adapter:
        """An adapter from its config and its file's tensors (``M.rows``/``M.cols`` and
        ``M.delta``), validated against the fingerprint's matrix shapes; ``files`` name the
        config and the weights in messages."""
        config_file, weights_file = files
        try:
            fingerprint = config["base_model"]["fingerprint"]
            matrices = dict(fingerprint["matrices"])
            dict(fingerprint["shape"]), dict(fingerprint["checksum"]["values"])
        except (KeyError, TypeError, ValueError) as err:
            raise S2FTError(
                f"{config_file} lacks the base model's fingerprint ({err}); the file is "
                "damaged — re-export the adapter."
            ) from None
        adapter = cls(config, {}, source)
        for key in sorted(k for k in tensors if k.endswith(".delta")):
            name = key.removesuffix(".delta")
            axis = "rows" if f"{name}.rows" in tensors else "cols"
            index, delta = tensors.get(f"{name}.{axis}"), tensors[key]
            shape = matrices.get(name)
            if shape is None or index is None or index.dtype != torch.long or index.ndim != 1:
                raise S2FTError(
                    f"{weights_file}: {name}.delta has no int64 {name}.rows or "
                    f"{name}.cols for a matrix of the fingerprint; the file is damaged — "
                    "re-export the adapter."
                )
            out, inp = shape
            limit = out if axis == "rows" else inp
            want = (len(index), inp) if axis == "rows" else (out, len(index))
            if len(index) == 0 or index.min() < 0 or index.max() >= limit or delta.shape != want:
                raise S2FTError(
                    f"{weights_file}: {name} needs {axis} ids in [0, {limit}) and a delta "
                    f"of shape {want}, got {len(index)} ids and {tuple(delta.shape)}; the file "
                    "is damaged — re-export the adapter."
                )
            adapter.updates[name] = Update(axis, index, delta)
        return adapter

    def check_base(self, model: nn.Module, force: bool = False) -> None:
        """Refuse a base model this adapter was not trained on, naming what differs
        (``force`` skips the weights' statistics, never the shapes)."""
        base = self.config["base_model"]
        try:
            fingerprint = Fingerprint.from_dict(base["fingerprint"])
        except (KeyError, TypeError, ValueError) as err:
            raise S2FTError(
                f"{self.source}: its config lacks part of the base model's fingerprint ({err}); "
                "the file is damaged — re-export the adapter."
            ) from None
        fingerprint.check(model, self.source, base.get("name_or_path"), force)

    def to(self, device=None, dtype: torch.dtype | None = None) -> Adapter:
        """The same adapter with its tensors on ``device`` and deltas in ``dtype``: do it
        once, so that fusing and switching copy nothing."""
        updates = {
            name: Update(u.axis, u.index.to(device), u.delta.to(device=device, dtype=dtype))
            for name, u in self.updates.items()
        }
        return Adapter(self.config, updates, self.source)

    def save(self, path: str | Path) -> Path:
        """Write the adapter directory under a temporary name, then rename it."""
        tensors: dict[str, torch.Tensor] = {}
        for name, u in sorted(self.updates.items()):
            tensors[f"{name}.{u.axis}"] = u.index.cpu().contiguous()
            tensors[f"{name}.delta"] = u.delta.detach().cpu().contiguous()

        def write(tmp: Path) -> None:
            save_file(tensors, str(tmp / WEIGHTS_NAME), metadata={"format": "pt"})
            (tmp / CONFIG_NAME).write_text(json.dumps(self.config, indent=1))

        path = Path(path)
        atomic_write_dir(path, write)
        return path


def updates_of(modules: dict[str, S2Layer]) -> dict[str, Update]:
    """The S² layers' deltas (by module path) as updates of the stored weights in the
    original layout, rows/columns in ascending order."""
    return {name: u for path, m in modules.items() for name, u in m.updates(path).items()}


def save_adapter(model: nn.Module, path: str | Path) -> Path:
    """Write the model's S²FT update as an adapter directory in the original layout.

    The directory is written under a temporary name and renamed when complete.
    """
    return adapter_of(model).save(path)


def _save_pretrained(model: nn.Module, save_directory, *args, is_main_process=True, **kwargs):
    """``model.save_pretrained(dir)`` of a converted or loaded model: the S²FT adapter in
    the original layout, which ``load_adapter`` reads back onto the base. What Hugging
    Face's Trainer and TRL call at a checkpoint and at the end. Of its other arguments only
    ``is_main_process`` applies (several processes call it; one writes; every process of a
    sharded model gathers the deltas); state dict, serialisation and sharding do not. A
    model with no adapter is refused (``check("save")``)."""
    sharded = any(isinstance(d, DTensor) for m in s2_layers(model).values() for d in m.deltas())
    if not (is_main_process or sharded):
        return None
    adapter = adapter_of(model)
    return adapter.save(save_directory) if is_main_process else None


def adapter_save_pretrained(model: nn.Module):
    """``model.save_pretrained`` writing the S²FT adapter, for ``S2FTState.install``."""
    return _save_pretrained.__get__(model)


def adapter_of(model: nn.Module) -> Adapter:
    """The model's S²FT update (trained or loaded) as an :class:`Adapter` in the original
    layout, with its config and the base's fingerprint."""
    state = state_of(model)
    state.check("save")
    modules = s2_layers(model)
    if state.conversion is not None:
        settings = state.conversion.config.model_dump()
        settings["selection"] = state.conversion.selection.to_dict()["units"]
        remember_base_fingerprint(model)  # its base is frozen: measured at the first save
        base = state.conversion.base_fingerprint
    else:  # an adapter loaded onto a base: keep what it was trained with
        kept = ("targets", "strategy", "order", "allocation", "layers", "seed", "calibration")
        settings = {k: v for k, v in (state.loaded or {}).items() if k in (*kept, "selection")}
        base = Fingerprint.of_base(model)
    config = adapter_config(
        getattr(model.config, "_name_or_path", "") or "",
        base.to_dict(),
        settings,
        next(iter(modules.values())).deltas()[0].dtype,
    )
    return Adapter(config, updates_of(modules), "The model's adapter")


def adapter_config(base: str, base_fingerprint: dict, settings: dict, dtype) -> dict:
    """``adapter_config.json`` of the format: the base and its fingerprint, what the
    adapter was made with (``settings``), the deltas' dtype and the tool version."""
    return {
        "format": ADAPTER_FORMAT,
        "version": ADAPTER_VERSION,
        "base_model": {"name_or_path": base, "fingerprint": base_fingerprint},
        **settings,
        "dtype": str(dtype).removeprefix("torch."),
        "tool_version": f"s2ft {__version__}",
    }


def _adapter_files(path: Path) -> tuple[Path, Path, int]:
    """The config and weights files of an adapter directory, and the version their names
    belong to."""
    names = {ADAPTER_VERSION: (CONFIG_NAME, WEIGHTS_NAME), **V1_FILES}
    for version, (config, weights) in names.items():
        if (path / config).is_file() and (path / weights).is_file():
            return path / config, path / weights, version
    raise S2FTError(
        f"{path} is not an s2ft adapter directory: it needs {CONFIG_NAME} and "
        f"{WEIGHTS_NAME} (written by save_adapter or `s2ft export`)."
    )


def read_adapter(path: str | Path) -> tuple[dict, dict[str, torch.Tensor], tuple[Path, Path]]:
    """The config, tensors and (config, weights) files of an adapter directory of this
    version or version 1, validated."""
    path = Path(path)
    config_file, weights_file, version = _adapter_files(path)
    config = read_json(
        config_file,
        "the file is damaged — re-export the adapter (s2ft export RUN_DIR --out DIR).",
    )
    if not isinstance(config, dict):
        config = {}
    if "peft_type" in config:
        raise S2FTError(
            f"{path} is a PEFT {config['peft_type']} adapter that s2ft did not write (its "
            f"{config_file.name} has peft_type, and there is no s2ft_source.json): load it "
            "with peft (PeftModel.from_pretrained(base, path)). s2ft reads its own adapters "
            "and its PEFT exports (s2ft export --format peft)."
        )
    if config.get("format") != ADAPTER_FORMAT or config.get("version") != version:
        raise S2FTError(
            f"{config_file} is not an {ADAPTER_FORMAT} version {version} config "
            f"(format {config.get('format')!r}, version {config.get('version')!r}); upgrade "
            "s2ft or re-export the adapter."
        )
    try:
        tensors = load_file(str(weights_file))
    except (SafetensorError, OSError) as err:
        raise S2FTError(
            f"{weights_file} is not a readable safetensors file ({err}); it is damaged "
            "or not an s2ft adapter — re-export it (adapters are read only as safetensors, so "
            "no code in a file can run)."
        ) from err
    return config, tensors, (config_file, weights_file)
