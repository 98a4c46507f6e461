"""A training run's checkpoints on disk: the :class:`Checkpointer` that writes, prunes,
finds and loads them (training and export share it), reading their files safely, and
saying why one could not be written; the checks that a run may resume from one, and the
state it resumes with. Checkpoints are read only as safetensors, ``weights_only``
torch state or JSON, so a file holding pickled code is refused, never run."""

from __future__ import annotations

import errno
import json
import pickle
import random
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from ..engine.layers import full_tensor
from ..errors import S2FTError
from ..files import atomic_write_dir
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

    @staticmethod
    def restore(
        checkpoint: Path, model: nn.Module, params: list, optimizer, scheduler, rank: int
    ) -> int:
        """Continue from ``checkpoint`` (every process reads it): the deltas, the optimizer
        (each process takes its slices of sharded moments), the schedule and this process's
        random states; returns the checkpoint's step."""
        Checkpointer.load_deltas(model, checkpoint)
        state = Checkpointer.trainer_state(checkpoint)
        saved = state["optimizer"]
        for i, p in enumerate(params):
            s = saved["state"].get(i, {})
            s.update({k: shard_like(v, p) for k, v in s.items() if v.shape == p.shape})
        optimizer.load_state_dict(saved)
        scheduler.load_state_dict(state["scheduler"])
        rng = state["rng"]
        rng = rng[rank] if isinstance(rng, list) else rng  # older: one state for all
        torch.set_rng_state(rng["torch"])
        if rng["cuda"] and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(rng["cuda"])
        random.setstate(rng["python"])
        return state["step"]


def random_states() -> dict:
    """This process's random states, as a checkpoint keeps them (one per process)."""
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "python": random.getstate(),
    }


def whole_state(model: nn.Module, optimizer) -> tuple[dict, dict]:
    """The trainable parameters (on the CPU) and the optimizer's state as a checkpoint
    holds them: sharded tensors gathered whole (every process must call it), so that the
    files are those of an unsharded run."""
    trainable = {
        n: full_tensor(p.detach()).cpu().contiguous()
        for n, p in model.named_parameters()
        if p.requires_grad
    }
    state = optimizer.state_dict()
    state["state"] = {
        i: {k: full_tensor(v) for k, v in s.items()} for i, s in sorted(state["state"].items())
    }
    return trainable, state


def check_resumable(checkpoint: Path, meta: dict, now: dict, run: Path) -> None:
    """Refuse to resume a run whose batch layout ``now`` (what its meta.json records:
    global batch, batch size, grad_accum, processes, packing, length grouping) is not the
    checkpoint's: step N is the N-th global batch of the data order, and each process
    continues its own random stream. Checkpoints from before a record resume as before."""
    order = {k: now[k] for k in ("packing", "group_by_length")}
    then = {k: meta.get(k, False) for k in order}
    if then != order:
        keys = {"packing": "data.packing", "group_by_length": "train.group_by_length"}

        def options(order: dict, sep: str, join: str) -> str:
            return join.join(f"{keys[k]}{sep}{str(v).lower()}" for k, v in order.items())

        raise S2FTError(
            f"Checkpoint {checkpoint} was trained with {options(then, ' ', ' and ')}; this run "
            f"has {options(order, ' ', ' and ')}. A resumed run keeps its data order (step N "
            f"trains the N-th global batch of it): resume with {options(then, '=', ' ')}, or "
            f"start a new run from this checkpoint (s2ft export {run} --checkpoint "
            f"{meta['step']} --merged --out MERGED)."
        )
    if "global_batch" not in meta:
        return
    if (meta["global_batch"], meta["processes"]) == (now["global_batch"], now["processes"]):
        return

    def layout(batch_size: int, processes: int, grad_accum: int) -> str:
        return (
            f"global batch {batch_size * processes * grad_accum} (batch_size {batch_size} × "
            f"{processes} process{'es' if processes > 1 else ''} × grad_accum {grad_accum})"
        )

    then = layout(meta["batch_size"], meta["processes"], meta["grad_accum"])
    raise S2FTError(
        f"Checkpoint {checkpoint} was trained with {then}; this run has "
        f"{layout(now['batch_size'], now['processes'], now['grad_accum'])}. A resumed run keeps "
        "both the global batch and the process count (a step is the next global batch of the "
        "data order, and each process continues its own random stream): resume with "
        f"train.batch_size={meta['batch_size']} train.grad_accum={meta['grad_accum']} on "
        f"{meta['processes']} process{'es' if meta['processes'] > 1 else ''}. To go on "
        "with another batch or process count, start a new run from this checkpoint "
        f"instead: s2ft export {run} --checkpoint {meta['step']} --merged --out "
        "MERGED, then s2ft train RECIPE model.name_or_path=MERGED output_dir=NEW_DIR (a "
        "fresh optimizer and learning-rate schedule; its adapter applies to MERGED)."
    )
