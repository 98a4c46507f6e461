"""s2ft: Structured Sparse Fine-Tuning (Yang et al., NeurIPS 2024) for LLaMA-family models.

The library API is imported on first use (PEP 562), so the command line's start-up,
its help and a recipe's validation do not wait for torch and transformers.
"""

from __future__ import annotations

import importlib
import logging
from typing import TYPE_CHECKING

from .state import register_adapter_io

__version__ = "0.1.0"

# Where bitsandbytes is installed, transformers imports it (for its 8-bit optimizers), and
# its CPU backend warns at import that a hub kernel for an inference shortcut is missing;
# s2ft turns that shortcut off (quantization.py), so the warning is noise on every command.
logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)


def _from_adapter_stage(name: str):
    """``adapter.<name>``, imported when first called."""

    def call(*args, **kwargs):
        from . import adapter

        return getattr(adapter, name)(*args, **kwargs)

    return call


# A converted model's save_pretrained writes its adapter (state.py), which only a later
# stage can do: the package wires the two when it is imported, and the adapter stage (with
# torch) is imported on first use.
register_adapter_io(
    _from_adapter_stage("write_pretrained"), _from_adapter_stage("base_fingerprint")
)

# name -> the module that defines it
_API = {
    "load_adapter": "adapter",
    "merge_adapter": "adapter",
    "save_adapter": "adapter",
    "unload_adapter": "adapter",
    "unmerge_adapter": "adapter",
    "S2FTConfig": "config",
    "get_s2ft_model": "convert",
    "AdapterMismatchError": "errors",
    "S2FTError": "errors",
    "example_losses": "losses",
    "Selection": "selection",
}
__all__ = [
    "AdapterMismatchError",
    "S2FTConfig",
    "S2FTError",
    "Selection",
    "example_losses",
    "get_s2ft_model",
    "load_adapter",
    "merge_adapter",
    "save_adapter",
    "unload_adapter",
    "unmerge_adapter",
]

if TYPE_CHECKING:
    from .adapter import load_adapter, merge_adapter, save_adapter, unload_adapter, unmerge_adapter
    from .config import S2FTConfig
    from .convert import get_s2ft_model
    from .errors import AdapterMismatchError, S2FTError
    from .losses import example_losses
    from .selection import Selection


def __getattr__(name: str):
    if name not in _API:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{_API[name]}", __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_API))
