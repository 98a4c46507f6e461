"""`train.distributed: fsdp` (FSDP2 on CPU with gloo): every tensor sharded, rank 0 alone
reads the weights, and the run trains like one process and like DDP with the same global
batch (accumulation, activation checkpointing and offload included), writing the same
checkpoint and adapter files. Stopping on SIGTERM and the exact resume (test_ddp) and the
selection rank 0 measures (test_train) are tested for DDP and FSDP alike."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from s2ft_cli.recipe import load_recipe
from s2ft_cli.training.checkpoints import checkpoints_of

from .test_ddp import gathered_views, save_gathered
from .test_train import max_diff, recipe_file
from .torchrun import torchrun

FSDP = "train.distributed=fsdp"


def test_fsdp_with_grad_accum_matches_one_process(tmp_path, one_process_batch_8):
    """2 processes × batch 2 × accumulation 2 = one process × batch 8 (as DDP is, in
    test_ddp), with activation checkpointing and the shards offloaded to the CPU between
    uses; the checkpoint holds the whole deltas, like the one-process run's."""
    run = tmp_path / "fsdp"
    result = torchrun("train", one_process_batch_8, f"output_dir={run}", "train.batch_size=2",
                      "train.grad_accum=2", "model.gradient_checkpointing=true",
                      "train.fsdp_offload=true", FSDP)  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    single = one_process_batch_8.parent / "run"
    assert max_diff(run / "adapter", single / "adapter") <= 1e-4
    ours, theirs = (
        load_file(checkpoints_of(r)[-1] / "trainable.safetensors") for r in (run, single)
    )
    assert {k: v.shape for k, v in ours.items()} == {k: v.shape for k, v in theirs.items()}
    config = json.loads((run / "adapter" / "s2ft_adapter.json").read_text())
    reference = json.loads((single / "adapter" / "s2ft_adapter.json").read_text())
    probes = config["base_model"]["fingerprint"]["probes"]["values"]
    for name, want in reference["base_model"]["fingerprint"]["probes"]["values"].items():
        assert probes[name]["z"] == pytest.approx(want["z"], abs=1e-9)  # the unsharded base's


def _shards_worker(recipe_path: str, *overrides: str) -> None:
    """One process of ``torchrun``: set up a sharded run, recording which processes read
    weights; rank 0 saves every process's view of the parameters."""
    import s2ft_cli.training.trainer as train_module
    from s2ft_cli.training.trainer import Trainer

    torch.set_num_threads(1)
    reads, load = [], train_module.load_model

    def recording_load(*args, **kwargs):
        reads.append(kwargs.get("weights", True))
        return load(*args, **kwargs)

    train_module.load_model = recording_load
    trainer = Trainer(load_recipe(Path(recipe_path), [FSDP, *overrides]))
    try:
        trainer.setup()
        view = {
            "reads": reads,
            "params": {
                name: (
                    type(p).__name__,
                    p.to_local().numel(),
                    p.numel(),
                    p.requires_grad,
                    str(p.dtype),
                )
                for name, p in trainer.model.named_parameters()
            },
            "buffers_meta": any(b.is_meta for b in trainer.model.buffers()),
        }
        save_gathered(trainer, view, trainer.out / "views.pt")
    finally:
        trainer.cleanup()


@pytest.mark.parametrize("quantization", ["none", "nf4"])
def test_fsdp_shards_every_tensor_and_only_rank_0_reads_the_weights(tmp_path, quantization):
    """Every parameter a DTensor, half on each process: under nf4 the frozen decoder
    linears' packed codes and 8-bit scales too (``nf4_shards.py``), rank 0 having quantized
    them."""
    override = f"model.quantization={quantization}"
    rank0, rank1 = gathered_views("tests.test_fsdp", "shards", recipe_file(tmp_path), override)
    assert rank0["reads"] == [True] and rank1["reads"] == [False]  # rank 1: meta device
    assert rank0["params"].keys() == rank1["params"].keys()
    assert any(name.endswith(".delta") for name in rank0["params"])
    packed = [name for name in rank0["params"] if name.endswith((".codes", ".scales"))]
    assert len(packed) == (2 * 7 * 2 if quantization == "nf4" else 0)  # 2 layers × 7 linears
    for name, (kind, local0, whole, trains, dtype) in rank0["params"].items():
        _, local1, _, _, _ = rank1["params"][name]
        assert kind == "DTensor" and local0 + local1 == whole and local1 < whole, name
        assert trains == name.endswith(".delta"), name
        assert (dtype == "torch.uint8") == (name in packed), name
    assert not rank0["buffers_meta"] and not rank1["buffers_meta"]


if __name__ == "__main__":
    {"shards": _shards_worker}[sys.argv[1]](*sys.argv[2:])
