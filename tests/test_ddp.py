"""S² deltas are ordinary parameters: torch DDP averages their gradients unchanged."""

from __future__ import annotations

import copy
import os
import subprocess
import sys
from pathlib import Path

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

from s2ft_cli import get_s2ft_model

from .conftest import batch, tiny_model

CFG = {"targets": {"v_proj": 0.5, "o_proj": 0.5, "down_proj": 0.1}, "seed": 2}
REPO = Path(__file__).resolve().parents[1]


def _worker(out: str) -> None:
    """One process of ``torchrun``: its half of the batch through DDP; rank 0 saves the
    averaged gradients."""
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.set_num_threads(1)
    base = tiny_model("llama-gqa-bias")
    ids = batch(base, size=4)[rank * 2 : rank * 2 + 2]
    model = DistributedDataParallel(get_s2ft_model(base, CFG))
    model(input_ids=ids, labels=ids).loss.backward()
    if rank == 0:
        grads = {n: p.grad for n, p in model.module.named_parameters() if p.requires_grad}
        torch.save(grads, f"{out}/grads.pt")
    assert world == 2
    dist.barrier()
    dist.destroy_process_group()


def test_ddp_gradients_equal_single_process(tmp_path):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node",
           "2", "-m", "tests.test_ddp", str(tmp_path)]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=240, env=env, cwd=REPO)
    assert result.returncode == 0, result.stderr[-3000:]
    ddp = torch.load(tmp_path / "grads.pt", weights_only=True)
    base = tiny_model("llama-gqa-bias")
    ids = batch(base, size=4)
    model = get_s2ft_model(copy.deepcopy(base), CFG)
    model(input_ids=ids, labels=ids).loss.backward()
    for name, p in model.named_parameters():
        if p.requires_grad:
            assert ((ddp[name] - p.grad).norm() / p.grad.norm()).item() <= 1e-5, name


if __name__ == "__main__":
    _worker(sys.argv[1])
