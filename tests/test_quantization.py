"""`model.quantization: nf4 | int8` (bitsandbytes, CPU backend): the frozen linears are
quantized after co-permutation, the deltas' gradients equal dense autograd on the
dequantized model, and the adapter is in the original layout with the unquantized base's
fingerprint: it loads onto that base, and `s2ft export --merged` fuses into its original
weights."""

from __future__ import annotations

import copy
import json
import shutil
import sys

import bitsandbytes as bnb
import bitsandbytes.functional as bnb_functional
import pytest
import torch
from safetensors.torch import load_file
from torch import nn
from typer.testing import CliRunner

from s2ft_cli import S2FTError, get_s2ft_model, load_adapter, merge_adapter
from s2ft_cli.adapter.format import Adapter, adapter_of
from s2ft_cli.cli import app
from s2ft_cli.engine.layers import S2Linear
from s2ft_cli.engine.models import load_model
from s2ft_cli.recipe import load_recipe
from s2ft_cli.training import nf4, quantization
from s2ft_cli.training.quantization import quantize_frozen_linears, quantized_linear
from s2ft_cli.training.trainer import Trainer, train

from .conftest import STORIES, batch, stories_model, tiny_model
from .test_engine import dense_grads, loss_of, rel_err
from .test_train import max_diff, recipe_file
from .torchrun import torchrun

TARGETS = {"q_proj": 0.25, "o_proj": 0.25, "up_proj": 0.1, "down_proj": 0.1}


def dequantized(module: nn.Module) -> torch.Tensor:
    """The dense weight a bitsandbytes layer computes with."""
    weight = module.weight
    if type(weight).__name__ == "Params4bit":
        return bnb_functional.dequantize_4bit(weight.data, weight.quant_state)
    scale = weight.SCB if weight.SCB is not None else module.state.SCB
    return weight.data.float() * scale[:, None].float() / 127


def dense_twin(model: nn.Module) -> nn.Module:
    """The quantized, converted model as plain dense linears: each quantized weight
    dequantized, each S² layer's delta added into it (still in the co-permuted layout)."""
    twin = copy.deepcopy(model)
    for name, module in list(twin.named_modules()):
        base = module.base if isinstance(module, S2Linear) else module
        if not isinstance(base, (bnb.nn.Linear4bit, bnb.nn.Linear8bitLt)):
            continue
        weight = dequantized(base).clone()
        if isinstance(module, S2Linear):
            dim = 0 if module.axis == "rows" else 1
            weight.index_add_(dim, module.index, module.delta.detach())
        dense = nn.Linear(weight.shape[1], weight.shape[0], bias=base.bias is not None)
        with torch.no_grad():
            dense.weight.copy_(weight)
            if base.bias is not None:
                dense.bias.copy_(base.bias)
        parent, _, child = name.rpartition(".")
        setattr(twin.get_submodule(parent), child, dense)
    return twin


@pytest.mark.parametrize("kind", ["nf4", "int8"])
@pytest.mark.parametrize("source", ["stories260K", "llama-gqa-bias"])
def test_delta_gradients_equal_dense_autograd_on_the_dequantized_model(kind, source, monkeypatch):
    monkeypatch.setattr(quantization, "NF4_BLOCK_ELEMENTS", 1024)  # several blocks per nf4 product
    base = stories_model() if source == "stories260K" else tiny_model(source)
    ids = batch(base, size=2, length=24)
    model = get_s2ft_model(copy.deepcopy(base), {"targets": TARGETS, "seed": 3})
    with torch.no_grad():  # mid-training deltas, so that the delta path matters
        for p in model.parameters():
            if p.requires_grad:
                p.normal_(0, 0.02)
    assert quantize_frozen_linears(model, kind) == 7 * base.config.num_hidden_layers
    assert all(not p.requires_grad for n, p in model.named_parameters() if "delta" not in n)
    reference = dense_twin(model)
    loss = loss_of(model, ids)
    loss.backward()
    assert loss.item() == pytest.approx(loss_of(reference, ids).item(), rel=1e-5)
    grads = dense_grads(reference, ids)
    for name, m in model.named_modules():
        if isinstance(m, S2Linear):
            ref = grads[name][m.index] if m.axis == "rows" else grads[name][:, m.index]
            assert rel_err(m.delta.grad, ref) <= 1e-4, name
    # quantized for real: 4 or 8 bits per weight, and the weights moved by quantization
    o_proj = model.model.layers[0].self_attn.o_proj.base
    assert o_proj.weight.dtype == (torch.uint8 if kind == "nf4" else torch.int8)
    assert o_proj.weight.numel() == base.model.layers[0].self_attn.o_proj.weight.numel() // (
        2 if kind == "nf4" else 1
    )


@pytest.mark.parametrize(
    ("out_features", "in_features", "bias"), [(300, 128, True), (172, 64, False), (64, 96, True)]
)
def test_blockwise_nf4_products_equal_bitsandbytes_own(
    out_features, in_features, bias, monkeypatch
):
    """The forward product and the input's gradient, a block of rows at a time, equal
    bitsandbytes' Linear4bit (whole weight dequantized) on the same quantized weight; rows
    that do not hold whole quantization blocks (96 columns) are dequantized whole."""
    monkeypatch.setattr(quantization, "NF4_BLOCK_ELEMENTS", 2048)
    linear = nn.Linear(in_features, out_features, bias=bias)
    whole = quantized_linear(linear, "nf4", blockwise=False)
    blockwise = quantized_linear(linear, "nf4")
    assert type(blockwise) is nf4.BlockwiseLinear4bit
    blocks = list(
        nf4.dequantized_blocks(
            blockwise.weight.data, blockwise.weight.quant_state, blockwise.block_elements
        )
    )
    assert len(blocks) == (1 if in_features % 64 else -(-out_features * in_features // 2048))
    assert torch.equal(torch.cat([w for _, w in blocks]), dequantized(whole))
    x = torch.randn(2, 7, in_features, requires_grad=True)
    x_whole = x.detach().clone().requires_grad_()
    out, out_whole = blockwise(x), whole(x_whole)
    torch.testing.assert_close(out, out_whole, rtol=1e-5, atol=1e-6)
    grad = torch.randn_like(out)
    out.backward(grad)
    out_whole.backward(grad)
    torch.testing.assert_close(x.grad, x_whole.grad, rtol=1e-5, atol=1e-6)
    assert blockwise.weight.grad is None


STORIES_RECIPE = f"""\
model: {{name_or_path: {STORIES}, quantization: nf4}}
data:
  train: {{path: "builtin:arithmetic", limit: 96}}
  val_size: 16
  max_seq_len: 512
s2ft: {{targets: {{o_proj: 0.25, down_proj: 0.1}}, seed: 1}}
train: {{max_steps: 8, batch_size: 8, lr: 1.0e-2, warmup_steps: 0, save_every: 4,
         eval_every: 0}}
output_dir: run
"""


@pytest.fixture(scope="module")
def nf4_run(tmp_path_factory):
    """`s2ft train` of stories260K on an nf4 base, 8 steps, checkpoints at 4 and 8."""
    folder = tmp_path_factory.mktemp("nf4")
    path = recipe_file(folder, STORIES_RECIPE)
    result = CliRunner().invoke(app, ["train", str(path)])
    assert result.exit_code == 0, result.output
    assert "frozen linear weights in nf4" in result.output
    return path, folder / "run"


def test_the_adapter_of_an_nf4_run_loads_onto_the_unquantized_base(nf4_run):
    path, run = nf4_run
    units = json.loads((run / "selection.json").read_text())["units"]
    tensors = load_file(run / "adapter" / "s2ft_adapter.safetensors")
    blocks = {"o_proj": ("self_attn", 8), "down_proj": ("mlp", 1)}  # a unit's columns
    for layer, matrices in units.items():
        for matrix, ids in matrices.items():
            block, width = blocks[matrix]
            cols = tensors[f"model.layers.{layer}.{block}.{matrix}.cols"].tolist()
            assert cols == [u * width + i for u in ids for i in range(width)]  # original ids
    base = load_model(str(STORIES))
    model = load_adapter(copy.deepcopy(base), run / "adapter")  # fingerprint of the base
    merged = merge_adapter(model).state_dict()
    moved = {n for n, w in base.state_dict().items() if not torch.equal(merged[n], w)}
    assert moved and all(n.endswith(("o_proj.weight", "down_proj.weight")) for n in moved)


def test_export_merged_fuses_into_the_original_weights_and_says_so(nf4_run, tmp_path):
    path, run = nf4_run
    result = CliRunner().invoke(app, ["export", str(run), "--merged", "--out", str(tmp_path / "m")])
    assert result.exit_code == 0, result.output
    assert "fused into the original weights" in " ".join(result.output.split())
    exported = load_model(str(tmp_path / "m")).state_dict()
    expected = merge_adapter(load_adapter(load_model(str(STORIES)), run / "adapter")).state_dict()
    assert all(torch.equal(exported[n], expected[n]) for n in expected)


def test_an_nf4_run_resumes_exactly(nf4_run, tmp_path):
    path, run = nf4_run
    resumed = tmp_path / "run"
    shutil.copytree(run, resumed)
    shutil.rmtree(resumed / "checkpoints" / "step-0000008")
    shutil.rmtree(resumed / "adapter")
    train(load_recipe(path, [f"output_dir={resumed}"]), resume=True)
    assert max_diff(resumed / "adapter", run / "adapter") == 0.0


def test_without_bitsandbytes_a_quantized_recipe_is_one_message(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)  # import fails
    recipe = load_recipe(recipe_file(tmp_path), ["model.quantization=nf4"])
    with pytest.raises(S2FTError, match=r"pip install 's2ft\[quant\]'"):
        Trainer(recipe).setup()


@pytest.mark.parametrize("distributed", ["ddp", "fsdp"])
def test_under_torchrun_an_nf4_run_trains_like_one_process(nf4_run, distributed, tmp_path):
    """DDP over an nf4 base, and FSDP2 sharding it (the packed codes and scales sharded
    with the deltas, ``nf4_shards.py``): 2 processes × batch 4 = one process × batch 8.
    Sharded, the adapter loads onto the unquantized base, and a run resumed from its step-4
    checkpoint ends as the uninterrupted one."""
    path, run = nf4_run
    out = tmp_path / distributed
    args = (f"output_dir={out}", "train.batch_size=4", f"train.distributed={distributed}")
    result = torchrun("train", path, *args)
    assert result.returncode == 0, result.stderr[-3000:]
    assert max_diff(out / "adapter", run / "adapter") <= 1e-4
    if distributed == "fsdp":
        load_adapter(load_model(str(STORIES)), out / "adapter")  # the unquantized base's
        resumed = tmp_path / "resumed"
        shutil.copytree(out, resumed)
        shutil.rmtree(resumed / "checkpoints" / "step-0000008")
        shutil.rmtree(resumed / "adapter")
        result = torchrun("train", path, f"output_dir={resumed}", *args[1:], "--resume")
        assert result.returncode == 0, result.stderr[-3000:]
        assert max_diff(resumed / "adapter", out / "adapter") == 0.0


def test_a_shardable_nf4_layer_computes_what_the_blockwise_one_computes(monkeypatch):
    """``ShardableLinear4bit`` holds bitsandbytes' quantized weight as plain tensors: its
    product and the input's gradient are the blockwise ``Linear4bit``'s, bit for bit; one
    built empty on the meta device and given those tensors (what a process receiving rank
    0's shards holds) computes the same."""
    from s2ft_cli.training.nf4_shards import ShardableLinear4bit
    from s2ft_cli.training.quantization import shardable_linear

    monkeypatch.setattr(quantization, "NF4_BLOCK_ELEMENTS", 2048)
    linear = nn.Linear(128, 48, bias=True)
    blockwise = quantized_linear(linear, "nf4")
    shardable = shardable_linear(linear)
    assert shardable.weight.dtype == torch.uint8 and not any(
        p.requires_grad for p in shardable.parameters()
    )
    empty = shardable_linear(nn.Linear(128, 48, bias=True, device="meta"))
    assert type(empty) is ShardableLinear4bit
    assert {k: (v.shape, v.dtype) for k, v in empty.state_dict().items()} == {
        k: (v.shape, v.dtype) for k, v in shardable.state_dict().items()
    }
    empty = empty.to_empty(device="cpu")
    empty.load_state_dict(shardable.state_dict())
    for layer in (shardable, empty):
        x = torch.randn(3, 5, 128, requires_grad=True)
        x_ref = x.detach().clone().requires_grad_()
        out, ref = layer(x), blockwise(x_ref)
        assert torch.equal(out, ref)
        out.square().sum().backward()
        ref.square().sum().backward()
        assert torch.equal(x.grad, x_ref.grad)


def test_the_library_and_hugging_face_trainer_on_an_nf4_base_save_the_bases_adapter(tmp_path):
    """get_s2ft_model, quantize_frozen_linears, transformers' Trainer, save_model: the
    adapter is the trained update, with the unquantized base's fingerprint."""
    from transformers import Trainer, TrainingArguments

    base = stories_model()
    rows = [{"input_ids": ids, "labels": ids} for ids in batch(base, size=8, seed=3).tolist()]
    model = get_s2ft_model(copy.deepcopy(base), {"targets": TARGETS, "seed": 1})
    quantize_frozen_linears(model, "nf4")
    args = TrainingArguments(
        output_dir=str(tmp_path / "run"), per_device_train_batch_size=4, max_steps=2,
        learning_rate=1e-2,
    )  # fmt: skip
    Trainer(model=model, args=args, train_dataset=rows).train()
    Trainer(model=model, args=args).save_model(str(tmp_path / "final"))
    saved, trained = Adapter.load(tmp_path / "final"), adapter_of(model)
    assert saved.updates.keys() == trained.updates.keys()
    for name, update in saved.updates.items():
        assert torch.equal(update.delta, trained.updates[name].delta) and update.delta.any()
    load_adapter(copy.deepcopy(base), tmp_path / "final")  # the unquantized base's fingerprint
