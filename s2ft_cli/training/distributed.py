"""Processes: one, or several started by ``torchrun`` / ``accelerate launch``.

Both launchers set ``WORLD_SIZE``, ``RANK`` and ``LOCAL_RANK`` (and the rendezvous address),
so one set-up serves training and evaluation: nccl on GPUs, gloo on CPUs, rank 0 writes.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeVar

import torch
import torch.distributed as dist

from ..errors import S2FTError

T = TypeVar("T")


@dataclass(frozen=True)
class Processes:
    """This process's place among the processes of a run, and its device."""

    world: int
    rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def all_sum(self, *values: float | torch.Tensor) -> list[float]:
        """Each value (a number, or a one-element tensor on this process's device) summed
        over the processes, in one all-reduce and one read back to the host."""
        if self.world == 1:
            return [v.item() if isinstance(v, torch.Tensor) else v for v in values]
        tensor = torch.cat(  # numbers filled on the device: no host-to-device copy
            [
                v.reshape(1).to(torch.float64)
                if isinstance(v, torch.Tensor)
                else torch.full((1,), float(v), dtype=torch.float64, device=self.device)
                for v in values
            ]
        )
        dist.all_reduce(tensor)
        return tensor.tolist()

    def gather(self, obj) -> list | None:
        """Every process's ``obj`` in rank order on rank 0; None elsewhere."""
        if self.world == 1:
            return [obj]
        gathered = [None] * self.world if self.is_main else None
        dist.gather_object(obj, gathered, dst=0)
        return gathered

    def broadcast(self, obj):
        """Rank 0's ``obj`` on every process."""
        if self.world == 1:
            return obj
        box = [obj]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def on_main(self, work: Callable[[], T]) -> T:
        """Run ``work`` on rank 0 only (a check, or writing files) and hand its result to
        every process. Should it fail, every process raises (the same S2FTError or OSError,
        any other error as a RuntimeError naming it), so that none is left waiting in a
        collective that rank 0 never reaches. Every process must call it, like a barrier."""
        if self.world == 1:
            return work()
        result, failure = None, None
        if self.is_main:
            try:
                result = work()
            except Exception as err:
                failure = err
                if isinstance(err, S2FTError):
                    result = (S2FTError, (str(err),))
                elif isinstance(err, OSError):
                    result = (OSError, (err.errno, err.strerror, err.filename))
                else:
                    result = (RuntimeError, (f"process 0 failed: {err!r}",))
        failed, result = self.broadcast((failure is not None, result))
        if failure is not None:
            raise failure  # rank 0: the original, with its traceback
        if failed:
            kind, args = result
            raise kind(*args)
        return result

    def barrier(self) -> None:
        if self.world > 1:
            dist.barrier()

    def close(self) -> None:
        if self.world > 1 and dist.is_initialized():
            dist.destroy_process_group()


def setup_processes(device: str = "auto", key: str = "device") -> Processes:
    """Join the process group a launcher started (if any) and pick this process's device:
    ``auto`` takes the GPU of the local rank when CUDA is present, else the CPU. ``key``
    names the setting in messages."""
    if device == "cuda" and not torch.cuda.is_available():
        raise S2FTError(f"{key} is cuda but no CUDA device is visible; use auto or cpu.")
    cuda = torch.cuda.is_available() and device != "cpu"
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local = int(os.environ.get("LOCAL_RANK", "0"))
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if cuda else "gloo")
    chosen = torch.device(f"cuda:{local}" if cuda else "cpu")
    if cuda:
        torch.cuda.set_device(chosen)
    return Processes(world, rank, chosen)
