"""s2ft: Structured Sparse Fine-Tuning (Yang et al., NeurIPS 2024) for LLaMA-family models."""

import logging

__version__ = "0.1.0"

# Where bitsandbytes is installed, transformers imports it (for its 8-bit optimizers), and
# its CPU backend warns at import that a hub kernel for an inference shortcut is missing;
# s2ft turns that shortcut off (quantization.py), so the warning is noise on every command.
logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)

from .adapter import (  # noqa: E402
    load_adapter,
    merge_adapter,
    save_adapter,
    unload_adapter,
    unmerge_adapter,
)
from .config import S2FTConfig  # noqa: E402
from .convert import get_s2ft_model  # noqa: E402
from .errors import AdapterMismatchError, S2FTError  # noqa: E402
from .losses import example_losses  # noqa: E402
from .selection import Selection  # noqa: E402

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
