"""Several processes (torchrun, gloo on CPU): S² deltas are ordinary parameters that DDP
averages unchanged, and `s2ft train` under torchrun trains like one process with the same
global batch (gradient accumulation and activation checkpointing included), stops every
process together (a signal, a refusal on rank 0), and gives each process its own dropout
while the selection and the data order stay shared."""

from __future__ import annotations

import copy
import gc
import json
import signal
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

from s2ft_cli import get_s2ft_model
from s2ft_cli.recipe import load_recipe
from s2ft_cli.training.checkpoints import checkpoints_of
from s2ft_cli.training.trainer import Trainer, train

from .conftest import batch, tiny_model
from .test_train import RECIPE, max_diff, recipe_file
from .torchrun import TORCHRUN_TIMEOUT, finish, free_port, launch, launch_node, torchrun

CFG = {"targets": {"v_proj": 0.5, "o_proj": 0.5, "down_proj": 0.1}, "seed": 2}


def _grads_worker(out: str) -> None:
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
    # DDP's reducer goes before its process group, as in Trainer.cleanup: freed after
    # destroy_process_group, when the function returned, it hung a worker now and then
    del model
    gc.collect()
    dist.barrier()
    dist.destroy_process_group()


def test_ddp_gradients_equal_single_process(tmp_path):
    result = finish(launch("tests.test_ddp", "grads", tmp_path))
    assert result.returncode == 0, result.stderr[-3000:]
    ddp = torch.load(tmp_path / "grads.pt", weights_only=True)
    base = tiny_model("llama-gqa-bias")
    ids = batch(base, size=4)
    model = get_s2ft_model(copy.deepcopy(base), CFG)
    model(input_ids=ids, labels=ids).loss.backward()
    for name, p in model.named_parameters():
        if p.requires_grad:
            assert ((ddp[name] - p.grad).norm() / p.grad.norm()).item() <= 1e-5, name


def test_torchrun_with_grad_accum_matches_one_process(tmp_path, one_process_batch_8):
    """2 processes × batch 2 × accumulation 2 = one process × batch 8 (the same examples
    in each step), with activation checkpointing (recomputed forwards inside DDP's
    accumulation; DDP without either: the two-node and SIGTERM tests); the checkpoints
    record that layout and one RNG state per process."""
    run = tmp_path / "ddp"
    result = torchrun("train", one_process_batch_8, f"output_dir={run}", "train.batch_size=2",
                      "train.grad_accum=2", "model.gradient_checkpointing=true")  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    assert max_diff(run / "adapter", one_process_batch_8.parent / "run" / "adapter") <= 1e-4

    newest = checkpoints_of(run)[-1]
    meta = json.loads((newest / "meta.json").read_text())
    layout = {k: meta[k] for k in ("global_batch", "batch_size", "grad_accum", "processes")}
    assert layout == {"global_batch": 8, "batch_size": 2, "grad_accum": 2, "processes": 2}
    rng = torch.load(newest / "trainer_state.pt", weights_only=True)["rng"]
    assert len(rng) == 2 and not torch.equal(rng[0]["torch"], rng[1]["torch"])


def with_attention_dropout(model, p: float = 0.5):
    """Turn on the attention dropout of every layer, as a config with dropout > 0 would."""
    for module in model.modules():
        if hasattr(module, "attention_dropout"):
            module.attention_dropout = p
    return model.train()


@torch.no_grad()
def logits_in_training(model) -> torch.Tensor:
    return model(input_ids=batch(model, size=2, length=16)).logits


def save_gathered(trainer: Trainer, view: dict, path: Path) -> None:
    """Every process's ``view`` of a set-up run, in rank order, saved by rank 0."""
    gathered = trainer.procs.gather(view)
    if trainer.is_main:
        torch.save(gathered, path)


def gathered_views(module: str, worker: str, recipe: Path, *args: str) -> list:
    """Run a worker of ``module`` under torchrun on ``recipe`` (whose run folder is
    ``run/``) and ``args``; what it saved with :func:`save_gathered` in ``run/views.pt``."""
    result = finish(launch(module, worker, recipe, *args))
    assert result.returncode == 0, result.stderr[-3000:]
    return torch.load(recipe.parent / "run" / "views.pt", weights_only=True)


def _seeds_worker(recipe_path: str) -> None:
    """One process of ``torchrun``: set up a run of the recipe and draw dropout masks right
    after a checkpoint, then resume from that checkpoint and draw again; rank 0 saves what
    each process drew and what must be shared."""
    torch.set_num_threads(1)
    recipe = load_recipe(Path(recipe_path))
    trainer = Trainer(recipe)
    trainer.setup()
    trainer.save_checkpoint()  # step 0, with each process's RNG state
    drawn = {
        "first": logits_in_training(with_attention_dropout(trainer.model)),
        "selection": trainer.model.s2ft_selection.to_dict()["units"],
        "order": trainer.plan.epoch_order(0),
    }
    trainer.engine = None  # see Trainer.cleanup: free DDP's reducer before the group goes
    resumed = Trainer(recipe, resume=True)
    try:
        resumed.setup()
        drawn["again"] = logits_in_training(with_attention_dropout(resumed.model))
        save_gathered(resumed, drawn, Path(recipe.output_dir) / "views.pt")
    finally:
        resumed.cleanup()


def test_each_process_draws_its_own_dropout_and_shares_selection_and_data(tmp_path):
    rank0, rank1 = gathered_views("tests.test_ddp", "seeds", recipe_file(tmp_path))
    assert not torch.allclose(rank0["first"], rank1["first"])  # other dropout masks
    assert torch.equal(rank0["again"], rank0["first"])  # a resumed process continues its
    assert torch.equal(rank1["again"], rank1["first"])  # own stream
    assert rank0["selection"] == rank1["selection"] and rank0["order"] == rank1["order"]
    assert (
        rank0["selection"] == json.loads((tmp_path / "run" / "selection.json").read_text())["units"]
    )


def test_a_refusal_on_rank_0_stops_every_process_with_the_message(tmp_path):
    """Rank 0 alone decides whether output_dir may be written; no process may be left
    waiting for it. Resuming on another number of processes is refused everywhere too."""
    path = recipe_file(tmp_path)
    train(load_recipe(path, ["train.max_steps=4"]))  # a run with a checkpoint, one process

    result = torchrun("train", path, timeout=300)
    assert result.returncode != 0
    assert result.stderr.count("already holds checkpoints of a run") == 2  # one per process

    result = torchrun("train", path, "train.max_steps=4", "train.batch_size=4", "--resume",
                      timeout=300)  # fmt: skip
    assert result.returncode != 0
    stderr = " ".join(result.stderr.split())  # rich may wrap the paragraph
    assert stderr.count("was trained with global batch 8 (batch_size 8 × 1 process ×") == 2
    assert "this run has global batch 8 (batch_size 4 × 2 processes × grad_accum 1)" in stderr


def test_two_nodes_on_the_loopback_train_like_one_process(tmp_path, one_process_batch_8):
    """``torchrun --nnodes 2`` as on two machines (c10d rendezvous at the first node's
    address), here two "nodes" of one process each on 127.0.0.1: 2 × batch 4 = one
    process × batch 8."""
    port, run = free_port(), tmp_path / "nodes"
    args = ("train", one_process_batch_8, f"output_dir={run}", "train.batch_size=4")
    nodes = [launch_node(rank, port, *args) for rank in (0, 1)]
    for result in [finish(node) for node in nodes]:
        assert result.returncode == 0, result.stderr[-3000:]
    single = one_process_batch_8.parent / "run"
    assert max_diff(run / "adapter", single / "adapter") <= 1e-4


def test_sigterm_to_torchrun_stops_every_process_with_a_checkpoint(tmp_path):
    """torchrun passes SIGTERM on to each process; they stop at the same step and save.
    Stopped under FSDP (its checkpoints hold the gathered deltas and optimizer state, those
    of an unsharded run) and resumed under DDP: the run ends where one process with the
    same global batch does."""
    long = RECIPE.replace("max_steps: 12", "max_steps: 24").replace("limit: 112", "limit: 240")
    path = recipe_file(tmp_path, long)
    train(load_recipe(path, [f"output_dir={tmp_path / 'single'}"]))  # batch 8, one process

    proc = launch("s2ft_cli", "train", path, "train.batch_size=4", "train.distributed=fsdp")
    marker = tmp_path / "run" / "checkpoints" / "step-0000004" / "meta.json"  # save_every: 4
    deadline = time.monotonic() + TORCHRUN_TIMEOUT
    while not marker.exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.005)
    assert proc.poll() is None, "the run ended before it could be stopped"
    proc.send_signal(signal.SIGTERM)
    result = finish(proc, timeout=300)
    assert result.returncode != 0
    step = json.loads((checkpoints_of(tmp_path / "run")[-1] / "meta.json").read_text())["step"]
    assert 4 <= step < 24 and not (tmp_path / "run" / "adapter").exists()
    stderr = " ".join(result.stderr.split())
    assert stderr.count(f"Interrupted at step {step} of 24") == 2  # both, at the same step

    result = torchrun("train", path, "train.batch_size=4", "train.distributed=ddp", "--resume")
    assert result.returncode == 0, result.stderr[-3000:]
    assert max_diff(tmp_path / "run" / "adapter", tmp_path / "single" / "adapter") <= 1e-4


if __name__ == "__main__":
    {"grads": _grads_worker, "seeds": _seeds_worker}[sys.argv[1]](*sys.argv[2:])
