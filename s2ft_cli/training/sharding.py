"""FSDP2 sharding for training (``train.distributed: fsdp``).

Every decoder layer, and then the root (the loss module around the model, which holds the
embeddings, the final norm and the head), is sharded with ``fully_shard``: frozen base
weights and S² deltas alike, each process keeping one slice of every tensor and gathering
a layer's whole weights only while it runs. Rank 0 alone reads the checkpoint; the other
processes build the model on the meta device and receive each tensor from rank 0, keeping
their slice, so host memory holds about one copy of the weights per node (rank 0's),
not one per process. Checkpoints hold whole tensors, gathered: the same files as a run
on one process or under DDP.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.tensor import DTensor, distribute_tensor

from ..adapter.fingerprint import remember_base_fingerprint
from ..engine.shapes import decoder_layers
from .distributed import Processes


def named_tensors(model: nn.Module) -> Iterator[tuple[str, torch.Tensor]]:
    """The model's parameters, then its buffers (persistent or not), by name."""
    yield from model.named_parameters()
    yield from model.named_buffers()


def shard_model(engine: nn.Module, model: nn.Module, procs: Processes, offload: bool) -> None:
    """Shard ``model``'s decoder layers, then ``engine`` (the root, whose forward runs the
    model), over every process; every tensor then holds rank 0's values. With ``offload``
    the shards stay in CPU memory between uses."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import CPUOffloadPolicy, OffloadPolicy, fully_shard

    remember_base_fingerprint(model, procs.on_main)  # of the whole weights, rank 0's
    device = procs.device
    mesh = init_device_mesh(device.type, (procs.world,))
    policy = CPUOffloadPolicy(pin_memory=device.type == "cuda") if offload else OffloadPolicy()
    source = dict(named_tensors(model)) if procs.is_main else {}
    for layer in decoder_layers(model):
        fully_shard(layer, mesh=mesh, offload_policy=policy)
    fully_shard(engine, mesh=mesh, offload_policy=policy)
    if any(t.is_meta for _, t in named_tensors(model)):  # not rank 0: room for the values
        engine.to_empty(device="cpu" if offload else device)
    _copy_from_main(model, source, device)


@torch.no_grad()
def _copy_from_main(model: nn.Module, source: dict[str, torch.Tensor], device) -> None:
    """Broadcast each tensor of rank 0's ``source`` (the unsharded model) in turn, one at a
    time: every process keeps its slice of a parameter, and the whole of a buffer, on
    ``device``."""
    buffers = dict(model.named_buffers())
    for name, tensor in list(named_tensors(model)):
        if name in source:
            whole = source[name].detach().to(device)
        else:
            whole = torch.empty(tensor.shape, dtype=tensor.dtype, device=device)
        dist.broadcast(whole, src=0)
        if isinstance(tensor, DTensor):
            tensor.to_local().copy_(shard_like(whole, tensor).to_local())
        elif name in buffers:
            owner, _, attr = name.rpartition(".")
            model.get_submodule(owner)._buffers[attr] = whole
        else:
            tensor.copy_(whole)


def shard_like(whole: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """``whole`` sliced as the sharded ``like`` is, a DTensor whose local slice lies where
    ``like``'s does (each process slices its own, no communication); ``whole`` itself when
    ``like`` is not sharded."""
    if not isinstance(like, DTensor):
        return whole
    mesh, placements = like.device_mesh, like.placements
    spread = distribute_tensor(whole.to(mesh.device_type), mesh, placements, src_data_rank=None)
    local = spread.to_local().to(like.to_local().device)
    return DTensor.from_local(
        local, mesh, placements, run_check=False, shape=like.shape, stride=like.stride()
    )
