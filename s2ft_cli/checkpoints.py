"""A training run's checkpoints on disk: finding them, reading them safely, and saying
why one could not be written. Checkpoints are read only as safetensors, ``weights_only``
torch state or JSON, so a file holding pickled code is refused, never run."""

from __future__ import annotations

import errno
import json
import pickle
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file

from .errors import S2FTError

CHECKPOINTS = "checkpoints"


def checkpoints_of(run: Path) -> list[Path]:
    """A run's complete checkpoints, oldest first (a complete one has its meta.json)."""
    folder = run / CHECKPOINTS
    if not folder.is_dir():
        return []
    return sorted(p for p in folder.glob("step-*") if (p / "meta.json").is_file())


def read_checkpoint_file(file: Path):
    """One file of a checkpoint: safetensors, ``weights_only`` torch state (no pickled
    code is ever run) or JSON; a damaged or foreign file is a user error naming it."""
    try:
        if file.suffix == ".safetensors":
            return load_file(str(file))
        if file.suffix == ".pt":
            return torch.load(file, weights_only=True, map_location="cpu")
        return json.loads(file.read_text())
    except pickle.UnpicklingError as err:
        raise S2FTError(
            f"{file} holds more than tensors and plain values, so weights_only loading refused "
            "it (unpickling it could run code). Do not resume from a checkpoint you did not "
            "write; delete that checkpoint folder to resume from an earlier one."
        ) from err
    except Exception as err:  # safetensors, torch and json report damage in several types
        raise S2FTError(
            f"{file} is damaged ({str(err).splitlines()[0]}); this checkpoint cannot be "
            "used. Delete its folder to resume from an earlier checkpoint."
        ) from err


def write_failure(err: Exception, folder: Path) -> str:
    """Why a write failed, in words: the OS's reason and the space left."""
    reason = err.strerror if isinstance(err, OSError) and err.strerror else str(err)
    if isinstance(err, OSError) and err.errno in (errno.ENOSPC, errno.EDQUOT):
        reason = "the disk is full"
    try:
        free = shutil.disk_usage(folder if folder.exists() else folder.parent).free
        reason += f" ({free / 2**30:.2f} GB free)"
    except OSError:
        pass
    return reason
