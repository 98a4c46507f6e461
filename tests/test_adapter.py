"""Adapter files: format, base fingerprint, safe replacement on disk."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from safetensors.torch import load_file

from s2ft_cli import (
    AdapterMismatchError,
    S2FTError,
    get_s2ft_model,
    load_adapter,
    merge_adapter,
    save_adapter,
    unload_adapter,
    unmerge_adapter,
)
from s2ft_cli.layers import S2Linear

from .conftest import batch, tiny_model

CFG = {"targets": {"v_proj": 0.5, "o_proj": 0.5, "down_proj": 0.1}, "seed": 4}


def trained(arch="llama-gqa-bias", seed=0):
    model = get_s2ft_model(tiny_model(arch, seed=seed), CFG)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.normal_(0, 0.01)
    return model


def test_format_on_disk(tmp_path):
    model = trained()
    save_adapter(model, tmp_path / "a")
    config = json.loads((tmp_path / "a" / "adapter_config.json").read_text())
    assert config["format"] == "s2ft-adapter" and config["version"] == 1
    assert config["targets"] == CFG["targets"] and config["seed"] == 4
    assert config["strategy"] == "random" and config["dtype"] == "float32"
    assert config["tool_version"].startswith("s2ft ")
    fp = config["base_model"]["fingerprint"]
    assert fp["model_type"] == "llama" and fp["shape"]["head_dim"] == 8
    tensors = load_file(tmp_path / "a" / "adapter_model.safetensors")
    o = "model.layers.0.self_attn.o_proj"
    v = "model.layers.0.self_attn.v_proj"
    assert tensors[f"{o}.cols"].dtype == torch.int64
    assert torch.equal(tensors[f"{o}.cols"], tensors[f"{o}.cols"].sort().values)
    assert tensors[f"{o}.delta"].shape == (64, len(tensors[f"{o}.cols"]))
    assert tensors[f"{v}.delta"].shape == (len(tensors[f"{v}.rows"]), 64)
    # whole heads: the ids come in runs of head_dim
    cols = tensors[f"{o}.cols"].view(-1, 8)
    assert torch.equal(cols - cols[:, :1], torch.arange(8).expand_as(cols))
    assert set(fp["matrices"]) == {k.rsplit(".", 1)[0] for k in tensors}


def test_base_with_other_weights_is_refused_and_force_loads_it(tmp_path):
    save_adapter(trained(), tmp_path / "a")
    other = tiny_model("llama-gqa-bias", seed=1)
    with pytest.raises(AdapterMismatchError, match=r"checksum \(mean \|W\|\) of model\.layers"):
        load_adapter(other, tmp_path / "a")
    load_adapter(other, tmp_path / "a", force=True)


def test_base_with_other_shapes_is_refused(tmp_path):
    save_adapter(trained(), tmp_path / "a")
    with pytest.raises(AdapterMismatchError, match="its hidden_size is 64, this model's is 48"):
        load_adapter(tiny_model("llama-mha"), tmp_path / "a", force=True)
    with pytest.raises(
        AdapterMismatchError, match="its model_type is llama, this model.s is qwen2"
    ):
        load_adapter(tiny_model("qwen2"), tmp_path / "a", force=True)


def test_same_base_in_bfloat16_is_accepted(tmp_path):
    model = trained()
    save_adapter(model, tmp_path / "a")
    base = tiny_model("llama-gqa-bias").to(torch.bfloat16)
    load_adapter(base, tmp_path / "a")
    ids = batch(base)
    with torch.no_grad():
        ref = merge_adapter(model)(ids).logits
        got = base(ids).logits.float()
    assert (got - ref).abs().max() < 0.1 * ref.abs().max()


def test_not_an_adapter_and_damaged_files(tmp_path):
    with pytest.raises(S2FTError, match="is not an s2ft adapter directory"):
        load_adapter(tiny_model("mistral"), tmp_path)
    save_adapter(trained(), tmp_path / "a")
    (tmp_path / "a" / "adapter_model.safetensors").write_bytes(b"not safetensors")
    with pytest.raises(S2FTError, match="not a readable safetensors file"):
        load_adapter(tiny_model("llama-gqa-bias"), tmp_path / "a")
    (tmp_path / "a" / "adapter_config.json").write_text('{"format": "lora"}')
    with pytest.raises(S2FTError, match="is not an s2ft-adapter version 1 config"):
        load_adapter(tiny_model("llama-gqa-bias"), tmp_path / "a")


def test_saving_over_an_adapter_replaces_it_whole(tmp_path):
    save_adapter(trained(seed=0), tmp_path / "a")
    save_adapter(trained(seed=0), tmp_path / "a")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a"]  # no temporary left behind
    assert sorted(p.name for p in (tmp_path / "a").iterdir()) == [
        "adapter_config.json",
        "adapter_model.safetensors",
    ]


def test_double_conversion_and_loading_onto_a_converted_model_are_refused(tmp_path):
    model = trained()
    save_adapter(model, tmp_path / "a")
    with pytest.raises(S2FTError, match="already converted"):
        get_s2ft_model(model, CFG)
    with pytest.raises(S2FTError, match="already carries"):
        load_adapter(model, tmp_path / "a")
    loaded = load_adapter(tiny_model("llama-gqa-bias"), tmp_path / "a")
    with pytest.raises(S2FTError, match="loaded adapter"):
        get_s2ft_model(loaded, CFG)
    with pytest.raises(S2FTError, match="no S²FT adapter to save"):
        save_adapter(tiny_model("mistral"), tmp_path / "b")


def test_save_from_a_loaded_adapter_round_trips(tmp_path):
    save_adapter(trained(), tmp_path / "a")
    loaded = load_adapter(tiny_model("llama-gqa-bias"), tmp_path / "a")
    save_adapter(loaded, tmp_path / "b")
    a = load_file(tmp_path / "a" / "adapter_model.safetensors")
    b = load_file(tmp_path / "b" / "adapter_model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    config = json.loads((tmp_path / "b" / "adapter_config.json").read_text())
    assert config["targets"] == CFG["targets"]
    assert copy.deepcopy(config)["base_model"]["fingerprint"]["model_type"] == "llama"


def test_damaged_tensors_are_refused_before_the_model_is_touched(tmp_path):
    from safetensors.torch import save_file

    from s2ft_cli.layers import S2Linear

    save_adapter(trained(), tmp_path / "a")
    file = tmp_path / "a" / "adapter_model.safetensors"
    tensors = load_file(file)
    key = "model.layers.1.mlp.down_proj.delta"
    tensors[key] = tensors[key][:, :-1].contiguous()
    save_file(tensors, file)
    base = tiny_model("llama-gqa-bias")
    with pytest.raises(S2FTError, match="down_proj needs cols ids in .* damaged"):
        load_adapter(base, tmp_path / "a")
    assert not any(isinstance(m, S2Linear) for m in base.modules())
    assert all(p.requires_grad for p in base.parameters())


def test_merging_onto_matrices_with_a_fused_adapter_changes_nothing(tmp_path):
    save_adapter(trained(seed=0), tmp_path / "a")
    base = tiny_model("llama-gqa-bias")
    original = {k: v.clone() for k, v in base.state_dict().items()}
    merge_adapter(load_adapter(base, tmp_path / "a"))
    merged = {k: v.clone() for k, v in base.state_dict().items()}
    load_adapter(base, tmp_path / "a", force=True)  # the fused update moved the checksums
    with pytest.raises(S2FTError, match="already has a fused adapter"):
        merge_adapter(base)
    from s2ft_cli.layers import S2Linear

    fused = {name for adapter, _ in base.s2ft_fused for name in adapter.updates}
    assert all(isinstance(m, S2Linear) for n, m in base.named_modules() if n in fused)
    for k, v in merged.items():
        assert torch.equal(base.state_dict()[k], v), k
    # base weights keep their requires_grad flags through load and merge
    for name, module in base.named_modules():
        if isinstance(module, S2Linear):
            base.get_submodule(name.rpartition(".")[0]).__setattr__(
                name.rpartition(".")[2], module.merge()
            )
    del base.s2ft_fused
    assert all(p.requires_grad for p in base.parameters())
    assert original.keys() == base.state_dict().keys()


def test_adapter_files_get_ordinary_permissions(tmp_path):
    import os
    import stat

    old = os.umask(0o022)
    try:
        save_adapter(trained(), tmp_path / "a")
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "a").stat().st_mode) == 0o755
    assert stat.S_IMODE((tmp_path / "a" / "adapter_config.json").stat().st_mode) == 0o644


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_unmerge_restores_the_base_exactly_and_unload_leaves_it_untouched(tmp_path, dtype):
    save_adapter(trained(), tmp_path / "a")
    base = tiny_model("llama-gqa-bias").to(dtype)
    original = {k: v.clone() for k, v in base.state_dict().items()}
    merge_adapter(load_adapter(base, tmp_path / "a"))
    assert any(not torch.equal(v, original[k]) for k, v in base.state_dict().items())
    unmerge_adapter(base)  # bf16: W + Δ - Δ would round; the saved slices come back
    for k, v in base.state_dict().items():
        assert torch.equal(v, original[k]), k
    unload_adapter(load_adapter(base, tmp_path / "a"))
    assert base.state_dict().keys() == original.keys()
    assert not any(isinstance(m, S2Linear) for m in base.modules())
    for k, v in base.state_dict().items():
        assert torch.equal(v, original[k]), k
