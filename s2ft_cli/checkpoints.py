"""A training run's checkpoints on disk: the :class:`Checkpointer` that writes, prunes,
finds and loads them (training and export share it), reading their files safely, and
saying why one could not be written. Checkpoints are read only as safetensors, ``weights_only``
torch state or JSON, so a file holding pickled code is refused, never run."""

from __future__ import annotations

import errno
import json
import pickle
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from .errors import S2FTError
from .files import atomic_write_dir
from .sharding import shard_like

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


class Checkpointer:
    """A run's ``checkpoints/`` folder, shared by training and export: writes a checkpoint
    atomically (a temporary folder renamed into place) and prunes to the newest
    ``keep``; finds the newest or a named one; loads a checkpoint's deltas into a model
    converted with the run's selection."""

    def __init__(self, run: Path, keep: int | None = None):
        self.run = Path(run)
        self.folder = self.run / CHECKPOINTS
        self.keep = keep

    def all(self) -> list[Path]:
        """The complete checkpoints, oldest first."""
        return checkpoints_of(self.run)

    def latest(self) -> Path | None:
        found = self.all()
        return found[-1] if found else None

    def find(self, name: str) -> Path:
        """A checkpoint by its folder name (``step-0000200``) or step (``200``)."""
        found = self.all()
        for path in found:
            if name in (path.name, str(int(path.name.removeprefix("step-")))):
                return path
        listed = ", ".join(p.name for p in found) or "none"
        raise S2FTError(
            f"{self.run} has no checkpoint {name!r}; its checkpoints: {listed} (give a step "
            "number or a folder name)."
        )

    def kept(self) -> str:
        """Which checkpoint a failed or stopped run leaves to resume from, in words."""
        latest = self.latest()
        if latest is None:
            return "No checkpoint was saved before it."
        return f"The newest complete checkpoint, {latest}, is kept."

    def write(self, step: int, trainable: dict, state: dict, meta: dict) -> Path:
        """``step-N/`` with the deltas (safetensors), the trainer state (torch) and
        meta.json, written atomically; then the oldest beyond ``keep`` are removed. A
        failed write leaves no partial folder and is a user error saying what is kept."""

        def write(tmp: Path) -> None:
            save_file(trainable, str(tmp / "trainable.safetensors"))
            torch.save(state, tmp / "trainer_state.pt")
            (tmp / "meta.json").write_text(json.dumps(meta))

        path = self.folder / f"step-{step:07d}"
        try:
            atomic_write_dir(path, write)
        except (OSError, RuntimeError) as err:  # torch.save reports a full disk as RuntimeError
            raise S2FTError(
                f"Could not write the checkpoint of step {step} in {self.folder}: "
                f"{write_failure(err, self.folder)}. {self.kept()} Free some space "
                "(or move output_dir) and continue with --resume."
            ) from err
        if self.keep:
            for old in self.all()[: -self.keep]:
                shutil.rmtree(old, ignore_errors=True)
        return path

    def remove_partial(self) -> None:
        """Remove the half-written checkpoints a run killed while writing left behind."""
        for partial in self.folder.glob(".step-*"):
            shutil.rmtree(partial, ignore_errors=True)

    @staticmethod
    def meta(checkpoint: Path) -> dict:
        return read_checkpoint_file(checkpoint / "meta.json")

    @staticmethod
    def trainer_state(checkpoint: Path) -> dict:
        return read_checkpoint_file(checkpoint / "trainer_state.pt")

    @staticmethod
    def load_deltas(model: nn.Module, checkpoint: Path) -> None:
        """Copy the checkpoint's deltas into ``model``'s trainable parameters (a model
        converted with the checkpoint's selection); a missing or misshapen one is refused."""
        deltas = read_checkpoint_file(checkpoint / "trainable.safetensors")
        with torch.no_grad():
            for name, p in model.named_parameters():
                if p.requires_grad:
                    if name not in deltas or deltas[name].shape != p.shape:
                        raise S2FTError(
                            f"{checkpoint} holds no {name} of shape {list(p.shape)}; the "
                            "checkpoint does not belong to this run's recipe."
                        )
                    p.copy_(shard_like(deltas[name], p))
