"""S² deltas are ordinary parameters: torch DDP averages their gradients unchanged."""

from __future__ import annotations

import copy
import time
from datetime import timedelta

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.nn.parallel import DistributedDataParallel

from s2ft_cli import get_s2ft_model

from .conftest import batch, tiny_model

CFG = {"targets": {"v_proj": 0.5, "o_proj": 0.5, "down_proj": 0.1}, "seed": 2}


def _worker(rank: int, world: int, tmp: str) -> None:
    # a file store: no port to race for, and no rank hosting a server the others wait on
    dist.init_process_group(
        "gloo",
        init_method=f"file://{tmp}/store",
        rank=rank,
        world_size=world,
        timeout=timedelta(seconds=60),
    )
    torch.set_num_threads(1)
    base = tiny_model("llama-gqa-bias")
    ids = batch(base, size=4)[rank * 2 : rank * 2 + 2]
    model = DistributedDataParallel(get_s2ft_model(base, CFG))
    model(input_ids=ids, labels=ids).loss.backward()
    if rank == 0:
        grads = {n: p.grad for n, p in model.module.named_parameters() if p.requires_grad}
        torch.save(grads, f"{tmp}/grads.pt")
    dist.barrier()
    dist.destroy_process_group()


def test_ddp_gradients_equal_single_process(tmp_path):
    workers = mp.spawn(_worker, args=(2, str(tmp_path)), nprocs=2, join=False)
    deadline = time.monotonic() + 120
    while not workers.join(timeout=5):
        if time.monotonic() > deadline:
            for process in workers.processes:
                process.kill()
            pytest.fail("the two DDP workers did not finish within 120 s")
    ddp = torch.load(tmp_path / "grads.pt", weights_only=True)
    base = tiny_model("llama-gqa-bias")
    ids = batch(base, size=4)
    model = get_s2ft_model(copy.deepcopy(base), CFG)
    model(input_ids=ids, labels=ids).loss.backward()
    for name, p in model.named_parameters():
        if p.requires_grad:
            assert ((ddp[name] - p.grad).norm() / p.grad.norm()).item() <= 1e-5, name
