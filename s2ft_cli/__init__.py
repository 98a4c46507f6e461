"""s2ft: Structured Sparse Fine-Tuning (Yang et al., NeurIPS 2024) for LLaMA-family models."""

__version__ = "0.1.0"

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
