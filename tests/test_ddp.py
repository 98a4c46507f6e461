"""S² deltas are ordinary parameters: torch DDP averages their gradients unchanged."""

from __future__ import annotations

import copy
import os
import socket

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.nn.parallel import DistributedDataParallel

from s2ft_cli import get_s2ft_model

from .conftest import batch, tiny_model

CFG = {"targets": {"v_proj": 0.5, "o_proj": 0.5, "down_proj": 0.1}, "seed": 2}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, world: int, port: int, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    torch.set_num_threads(1)
    base = tiny_model("llama-gqa-bias")
    ids = batch(base, size=4)[rank * 2 : rank * 2 + 2]
    model = DistributedDataParallel(get_s2ft_model(base, CFG))
    model(input_ids=ids, labels=ids).loss.backward()
    if rank == 0:
        grads = {n: p.grad for n, p in model.module.named_parameters() if p.requires_grad}
        torch.save(grads, out)
    dist.destroy_process_group()


def test_ddp_gradients_equal_single_process(tmp_path):
    out = str(tmp_path / "grads.pt")
    mp.spawn(_worker, args=(2, _free_port(), out), nprocs=2, join=True)
    ddp = torch.load(out, weights_only=True)
    base = tiny_model("llama-gqa-bias")
    ids = batch(base, size=4)
    model = get_s2ft_model(copy.deepcopy(base), CFG)
    model(input_ids=ids, labels=ids).loss.backward()
    for name, p in model.named_parameters():
        if p.requires_grad:
            assert ((ddp[name] - p.grad).norm() / p.grad.norm()).item() <= 1e-5, name
