"""s2ft: Structured Sparse Fine-Tuning (Yang et al., NeurIPS 2024) for LLaMA-family models.

The library API is imported on first use (PEP 562), so the command line's start-up,
its help and a recipe's validation do not wait for torch and transformers.
"""

from __future__ import annotations

import importlib
import logging
from typing import TYPE_CHECKING

from .version import __version__ as __version__  # re-exported

# Where bitsandbytes is installed, transformers imports it (for its 8-bit optimizers), and
# its CPU backend warns at import that a hub kernel for an inference shortcut is missing;
# s2ft turns that shortcut off (training/quantization.py), so the warning is noise on every command.
logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)


def _attribute(module: str, name: str):
    """``s2ft_cli.<module>.<name>``, importing the module (and with it torch) if need be."""
    return getattr(importlib.import_module(f".{module}", __name__), name)


# The library API: name -> the module that defines it, imported on first use.
_API = {
    "load_adapter": "adapter.runtime",
    "merge_adapter": "adapter.runtime",
    "save_adapter": "adapter.format",
    "unload_adapter": "adapter.runtime",
    "unmerge_adapter": "adapter.runtime",
    "S2FTConfig": "engine.config",
    "get_s2ft_model": "adapter.runtime",
    "AdapterMismatchError": "errors",
    "S2FTError": "errors",
    "example_losses": "engine.losses",
    "Selection": "engine.selection",
}
__all__ = sorted(_API)

if TYPE_CHECKING:  # the same names, for type checkers and editors
    from .adapter.format import save_adapter  # noqa: F401
    from .adapter.runtime import (  # noqa: F401
        get_s2ft_model,
        load_adapter,
        merge_adapter,
        unload_adapter,
        unmerge_adapter,
    )
    from .engine.config import S2FTConfig  # noqa: F401
    from .engine.losses import example_losses  # noqa: F401
    from .engine.selection import Selection  # noqa: F401
    from .errors import AdapterMismatchError, S2FTError  # noqa: F401


def __getattr__(name: str):
    if name not in _API:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = globals()[name] = _attribute(_API[name], name)
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_API))
