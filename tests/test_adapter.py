"""Adapter files: format, base fingerprint, safe replacement on disk."""

from __future__ import annotations

import copy
import json
import re

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
from s2ft_cli.adapter import fingerprint as fingerprint_module
from s2ft_cli.adapter.fingerprint import Fingerprint, matrix_print
from s2ft_cli.adapter.format import Adapter, adapter_of
from s2ft_cli.engine.layers import S2Linear
from s2ft_cli.engine.state import state_of

from .conftest import batch, stories_model, tiny_model

CFG = {"targets": {"v_proj": 0.5, "o_proj": 0.5, "down_proj": 0.1}, "seed": 4}


def trained(arch="llama-gqa-bias", seed=0, delta_seed=None):
    """A converted tiny model whose deltas are drawn as if trained (from ``delta_seed``
    when given, else right after the base's own draw)."""
    model = get_s2ft_model(tiny_model(arch, seed=seed), CFG)
    if delta_seed is not None:
        torch.manual_seed(delta_seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.normal_(0, 0.01)
    return model


def test_format_on_disk(tmp_path):
    model = trained()
    save_adapter(model, tmp_path / "a")
    config = json.loads((tmp_path / "a" / "s2ft_adapter.json").read_text())
    assert config["format"] == "s2ft-adapter" and config["version"] == 2
    assert sorted(p.name for p in (tmp_path / "a").iterdir()) == [
        "s2ft_adapter.json",
        "s2ft_adapter.safetensors",
    ]
    assert config["targets"] == CFG["targets"] and config["seed"] == 4
    assert config["strategy"] == "random" and config["dtype"] == "float32"
    assert config["tool_version"].startswith("s2ft ")
    fp = config["base_model"]["fingerprint"]
    assert fp["model_type"] == "llama" and fp["shape"]["head_dim"] == 8
    tensors = load_file(tmp_path / "a" / "s2ft_adapter.safetensors")
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
    with pytest.raises(
        AdapterMismatchError,
        match=r"trained on other weights: model\.layers\.0\.\S+ seen through 32 "
        r"seeded random-sign probes differs by 1\.\d+ \(RMS\) between the adapter's base and "
        r"this model.* stay below 0\.004: its values were changed or reordered\. Load the "
        r"adapter onto .* pass force=True \(--force\); shapes are still checked\.",
    ):
        load_adapter(other, tmp_path / "a")
    load_adapter(other, tmp_path / "a", force=True)
    scaled = tiny_model("llama-gqa-bias")  # z cannot see a scale; the norm does
    with torch.no_grad():
        scaled.model.layers[1].mlp.down_proj.weight.mul_(1.01)
    with pytest.raises(AdapterMismatchError, match=r"Frobenius norm of model\.layers\.1\.mlp"):
        load_adapter(scaled, tmp_path / "a")


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
    (tmp_path / "a" / "s2ft_adapter.safetensors").write_bytes(b"not safetensors")
    with pytest.raises(S2FTError, match="not a readable safetensors file"):
        load_adapter(tiny_model("llama-gqa-bias"), tmp_path / "a")
    (tmp_path / "a" / "s2ft_adapter.json").write_text('{"format": "lora"}')
    with pytest.raises(S2FTError, match="is not an s2ft-adapter version 2 config"):
        load_adapter(tiny_model("llama-gqa-bias"), tmp_path / "a")


def test_saving_over_an_adapter_replaces_it_whole(tmp_path):
    save_adapter(trained(seed=0), tmp_path / "a")
    save_adapter(trained(seed=0), tmp_path / "a")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a"]  # no temporary left behind
    assert sorted(p.name for p in (tmp_path / "a").iterdir()) == [
        "s2ft_adapter.json",
        "s2ft_adapter.safetensors",
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
    a = load_file(tmp_path / "a" / "s2ft_adapter.safetensors")
    b = load_file(tmp_path / "b" / "s2ft_adapter.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    config = json.loads((tmp_path / "b" / "s2ft_adapter.json").read_text())
    assert config["targets"] == CFG["targets"]
    assert copy.deepcopy(config)["base_model"]["fingerprint"]["model_type"] == "llama"


def test_damaged_tensors_are_refused_before_the_model_is_touched(tmp_path):
    from safetensors.torch import save_file

    from s2ft_cli.engine.layers import S2Linear

    save_adapter(trained(), tmp_path / "a")
    file = tmp_path / "a" / "s2ft_adapter.safetensors"
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
    from s2ft_cli.engine.layers import S2Linear

    fused = {name for adapter, _ in state_of(base).fused for name in adapter.updates}
    assert all(isinstance(m, S2Linear) for n, m in base.named_modules() if n in fused)
    for k, v in merged.items():
        assert torch.equal(base.state_dict()[k], v), k
    # base weights keep their requires_grad flags through load and merge
    for name, module in base.named_modules():
        if isinstance(module, S2Linear):
            base.get_submodule(name.rpartition(".")[0]).__setattr__(
                name.rpartition(".")[2], module.merge()
            )
    state_of(base).fused.clear()
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
    assert stat.S_IMODE((tmp_path / "a" / "s2ft_adapter.json").stat().st_mode) == 0o644


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


# ---------------------------------------------------------------------------------------
# The base's fingerprint: it sees small noise and reordered values, not casts


def base_of(kind: str):
    """A fresh copy of the base: a tiny test model or the real stories260K checkpoint."""
    return tiny_model("llama-gqa-bias") if kind == "tiny" else stories_model()


def changed(base, names, edit):
    """A copy of ``base`` whose matrices ``names`` went through ``edit(weight, generator)``."""
    model = copy.deepcopy(base)
    g = torch.Generator().manual_seed(len(names))
    with torch.no_grad():
        for name in names:
            weight = model.get_submodule(name).weight
            weight.copy_(edit(weight, g))
    return model


def noise(seed):
    def edit(w, _):
        g = torch.Generator().manual_seed(seed)
        return w + 0.01 * w.std() * torch.randn(w.shape, generator=g)

    return edit


REORDER = {
    "values": lambda w, g: w.flatten()[torch.randperm(w.numel(), generator=g)].view_as(w),
    "rows": lambda w, g: w[torch.randperm(w.shape[0], generator=g)],
    "columns": lambda w, g: w[:, torch.randperm(w.shape[1], generator=g)],
}
PROBES = r"seen through 32 seeded random-sign probes differs by"


@pytest.mark.parametrize("kind", ["tiny", "stories"])
def test_base_with_noise_or_reordered_values_is_refused_and_casts_are_accepted(tmp_path, kind):
    base = base_of(kind)
    model = get_s2ft_model(copy.deepcopy(base), CFG)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.normal_(0, 0.01)
    save_adapter(model, tmp_path / "a")
    names = sorted(json.loads((tmp_path / "a" / "s2ft_adapter.json").read_text())[
        "base_model"]["fingerprint"]["matrices"])  # fmt: skip
    # the same base: re-loaded, cast to bf16 / fp16 (the adapter was trained in fp32)
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        load_adapter(base_of(kind).to(dtype), tmp_path / "a")
    # Gaussian noise of 1% of each matrix's std, on all adapted matrices (several seeds)...
    for seed in range(4):
        noisy = changed(base, names, noise(seed))
        with pytest.raises(AdapterMismatchError, match=f"trained on other weights: .*{PROBES}"):
            load_adapter(noisy, tmp_path / "a")
    load_adapter(noisy, tmp_path / "a", force=True)  # force skips the weights' check
    # ... or on one matrix alone, and the values of one matrix reordered: each is named
    adapter = Adapter.load(tmp_path / "a")
    for name in names:
        for edit in [noise(7), *REORDER.values()]:
            with pytest.raises(AdapterMismatchError, match=f"{re.escape(name)} {PROBES}"):
                adapter.check_base(changed(base, [name], edit))


@pytest.mark.parametrize("kind", ["tiny", "stories"])
def test_fingerprint_of_a_co_permuted_model_is_that_of_its_original_layout(tmp_path, kind):
    base = base_of(kind)
    model = get_s2ft_model(copy.deepcopy(base), CFG)
    assert state_of(model).conversion.layout  # its adapted matrices hold permuted rows/columns
    saved = adapter_of(model).config["base_model"]["fingerprint"]
    weights = {n: base.get_submodule(n).weight for n in saved["matrices"]}
    plain = Fingerprint.measure(base, weights).to_dict()
    assert saved["probes"]["values"].keys() == plain["probes"]["values"].keys()
    for name, want in plain["probes"]["values"].items():
        got = saved["probes"]["values"][name]
        assert got["norm"] == pytest.approx(want["norm"], rel=1e-12), name
        assert got["z"] == pytest.approx(want["z"], abs=1e-12), name
        mean_abs = saved["checksum"]["values"][name]
        assert mean_abs == pytest.approx(plain["checksum"]["values"][name], rel=1e-12)
    save_adapter(model, tmp_path / "a")
    load_adapter(base_of(kind), tmp_path / "a")  # a fresh base accepts it


def test_adapters_with_the_mean_abs_checksum_alone_still_load(tmp_path):
    save_adapter(trained(), tmp_path / "a")
    file = tmp_path / "a" / "s2ft_adapter.json"
    config = json.loads(file.read_text())
    old = config["base_model"]["fingerprint"]
    assert old["checksum"]["method"] == "float64 mean |W| of each adapted matrix"
    del old["probes"]  # what s2ft wrote before the probes
    file.write_text(json.dumps(config))
    load_adapter(tiny_model("llama-gqa-bias"), tmp_path / "a")
    load_adapter(tiny_model("llama-gqa-bias").to(torch.bfloat16), tmp_path / "a")
    other = tiny_model("llama-gqa-bias", seed=1)
    with pytest.raises(AdapterMismatchError, match=r"checksum \(mean \|W\|\) of model\.layers"):
        load_adapter(other, tmp_path / "a")
    load_adapter(other, tmp_path / "a", force=True)
    # probes of an unknown method (a later s2ft's) are not trusted: mean |W| is checked
    config["base_model"]["fingerprint"]["probes"] = {"method": "later", "seed": 0, "count": 1,
                                                     "values": {}}  # fmt: skip
    file.write_text(json.dumps(config))
    with pytest.raises(AdapterMismatchError, match=r"checksum \(mean \|W\|\)"):
        load_adapter(tiny_model("llama-gqa-bias", seed=1), tmp_path / "a")
    # damaged probe values are named as damage
    config["base_model"]["fingerprint"] = {**old, "probes": fingerprint_of(tmp_path)}
    name = next(iter(old["matrices"]))
    config["base_model"]["fingerprint"]["probes"]["values"][name]["z"] = [0.0]
    file.write_text(json.dumps(config))
    with pytest.raises(S2FTError, match="lacks part of the base model's fingerprint"):
        load_adapter(tiny_model("llama-gqa-bias"), tmp_path / "a")


def fingerprint_of(tmp_path):
    save_adapter(trained(), tmp_path / "fresh")
    config = json.loads((tmp_path / "fresh" / "s2ft_adapter.json").read_text())
    return config["base_model"]["fingerprint"]["probes"]


def test_the_fingerprint_reads_a_weight_in_chunks_and_never_copies_it(monkeypatch):
    from torch.overrides import TorchFunctionMode

    class NoCopyOf(TorchFunctionMode):
        """Fails on any new tensor holding half as many elements as ``weight``."""

        def __init__(self, weight):
            super().__init__()
            self.numel, self.storage = weight.numel(), weight.untyped_storage().data_ptr()

        def __torch_function__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            for t in out if isinstance(out, tuple | list) else [out]:
                if (
                    isinstance(t, torch.Tensor)
                    and t.numel() >= self.numel // 2
                    and t.untyped_storage().data_ptr() != self.storage
                ):
                    raise AssertionError(f"{func.__name__} made a tensor of {t.numel()} elements")
            return out

    weight = torch.randn(300, 200, generator=torch.Generator().manual_seed(0))
    with NoCopyOf(weight), pytest.raises(AssertionError, match="made a tensor"):
        weight.double()  # the guard works
    with NoCopyOf(weight), pytest.raises(AssertionError, match="made a tensor"):
        matrix_print(weight)  # one chunk of 2^22 elements: a whole copy
    whole = matrix_print(weight)
    monkeypatch.setattr(fingerprint_module, "FINGERPRINT_CHUNK", 1000)  # 5 rows at a time
    for w in (weight, weight.bfloat16(), weight.t().contiguous().t()):
        with NoCopyOf(w):
            chunked = matrix_print(w)
        reference = whole if w.dtype == torch.float32 else matrix_print(w.float())
        assert chunked.probes.norm == pytest.approx(reference.probes.norm, rel=1e-12)
        assert chunked.probes.z == pytest.approx(reference.probes.z, abs=1e-12)
        assert chunked.mean_abs == pytest.approx(reference.mean_abs, rel=1e-12)


def test_the_probes_are_the_same_on_every_machine():
    """An adapter written today is checked with the same probes tomorrow: pinned values
    (they change only if torch's seeded CPU generator does)."""
    w = torch.linspace(-1, 1, 35, dtype=torch.float64).view(5, 7) ** 3
    stats = matrix_print(w)
    assert stats.probes.norm == pytest.approx(2.432262028006944, rel=1e-14)
    assert stats.mean_abs == pytest.approx(0.2722689075630252, rel=1e-14)
    expected = [2.528430968639, -0.349297374168, 1.823978334297, -1.823978334297]
    assert list(stats.probes.z[:4]) == pytest.approx(expected, abs=1e-11)
    # rows/columns stored in another order are probed at their original positions
    rows, cols = torch.tensor([4, 0, 3, 1, 2]), torch.tensor([6, 5, 4, 3, 2, 1, 0])
    stored = w[rows][:, cols]
    assert matrix_print(stored, rows, cols).probes.z == pytest.approx(stats.probes.z, abs=1e-13)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_the_same_base_on_a_gpu_is_accepted(tmp_path):
    save_adapter(trained(), tmp_path / "a")
    for dtype in (torch.float32, torch.bfloat16):
        load_adapter(tiny_model("llama-gqa-bias").to("cuda", dtype), tmp_path / "a")
    with pytest.raises(AdapterMismatchError, match=PROBES):
        load_adapter(tiny_model("llama-gqa-bias", seed=1).to("cuda"), tmp_path / "a")


def test_combining_compares_the_bases_by_probes_and_older_adapters_by_mean_abs(tmp_path):
    from s2ft_cli.adapter.combine import combine

    def adapter(base, name, targets, seed):
        model = get_s2ft_model(copy.deepcopy(base), {"targets": targets, "seed": seed})
        with torch.no_grad():
            for p in model.parameters():
                if p.requires_grad:
                    p.normal_(0, 0.01)
        save_adapter(model, tmp_path / name)
        return Adapter.load(tmp_path / name)

    base = tiny_model("llama-gqa-bias")
    a = adapter(base, "a", {"v_proj": 0.5, "o_proj": 0.5}, 1)
    b = adapter(base, "b", {"o_proj": 0.5, "down_proj": 0.2}, 2)
    o_proj = [n for n in a.updates if n.endswith("o_proj")]
    noisy = adapter(changed(base, o_proj, noise(0)), "n", {"o_proj": 0.5}, 3)
    with pytest.raises(
        AdapterMismatchError, match=f"were trained on different weights: .*o_proj {PROBES}"
    ):
        combine([a, noisy])
    combine([a, noisy], force=True)
    # an adapter from before the probes beside a new one: compared by mean |W|
    old = Adapter.load(tmp_path / "a")
    del old.config["base_model"]["fingerprint"]["probes"]
    other = adapter(tiny_model("llama-gqa-bias", seed=5), "o", {"o_proj": 0.5}, 3)
    with pytest.raises(AdapterMismatchError, match=r"different weights: the checksum \(mean"):
        combine([old, other])
    combined, _ = combine([old, b])
    fp = combined.config["base_model"]["fingerprint"]
    assert set(fp["checksum"]["values"]) == set(fp["matrices"]) == set(a.updates) | set(b.updates)
    assert set(fp["probes"]["values"]) == set(b.updates)  # the new one's probes are kept
    combined.save(tmp_path / "ab")
    load_adapter(copy.deepcopy(base), tmp_path / "ab")
    down = sorted(n for n in b.updates if n.endswith("down_proj"))[:1]
    shuffled = changed(base, down, REORDER["rows"])
    with pytest.raises(AdapterMismatchError, match=f"{re.escape(down[0])} {PROBES}"):
        load_adapter(shuffled, tmp_path / "ab")
