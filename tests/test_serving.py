"""Adapters at run time (paper §5): exports, fuse/unfuse/switch, combining, and batches in
which every sequence has its own adapter."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer
from typer.testing import CliRunner

from s2ft_cli import get_s2ft_model, load_adapter, save_adapter
from s2ft_cli.adapter.combine import combine
from s2ft_cli.adapter.format import Adapter
from s2ft_cli.adapter.runtime import fuse, switch, unfuse
from s2ft_cli.adapter.serving import adapters_per_sequence, serve_adapters, stop_serving
from s2ft_cli.cli import app
from s2ft_cli.engine.models import load_model
from s2ft_cli.errors import AdapterMismatchError, S2FTError
from s2ft_cli.export import _trained_model, find_checkpoint
from s2ft_cli.recipe import load_recipe
from s2ft_cli.training.trainer import train

from .conftest import STORIES, llama_cpp_logits, logit_tol, tiny_model

runner = CliRunner()


def random_adapter(base, path, targets, seed, scale=0.3):
    """Save an adapter of ``base`` with random deltas; returns the trained model."""
    model = get_s2ft_model(copy.deepcopy(base), {"targets": targets, "seed": seed})
    torch.manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.normal_(0, scale)
    save_adapter(model, path)
    return model


def logits(model, ids):
    with torch.no_grad():
        return model(ids).logits


@pytest.fixture
def two_adapters(tmp_path):
    base = tiny_model("llama-gqa-bias")
    random_adapter(base, tmp_path / "a", {"o_proj": 0.5, "down_proj": 0.2}, seed=1)
    random_adapter(base, tmp_path / "b", {"v_proj": 0.5, "up_proj": 0.2, "q_proj": 0.25}, 2)
    return base, tmp_path / "a", tmp_path / "b"


# ---------------------------------------------------------------------------------------
# Export


RECIPE = """\
model: {name_or_path: "preset:tiny-llama"}
data: {train: {path: "builtin:arithmetic", limit: 64}, max_seq_len: 256}
s2ft: {targets: {o_proj: 0.25, down_proj: 0.1}, seed: 1}
train: {max_steps: 6, batch_size: 8, lr: 3.0e-2, warmup_steps: 1, save_every: 3, seed: 5}
output_dir: run
"""


def test_merged_export_loads_with_plain_transformers_and_gives_the_trained_logits(tmp_path):
    (tmp_path / "r.yaml").write_text(RECIPE)
    train(load_recipe(tmp_path / "r.yaml"))
    run = tmp_path / "run"
    result = runner.invoke(app, ["export", str(run), "--out", str(tmp_path / "m"), "--merged"])
    assert result.exit_code == 0, result.output
    plain = AutoModelForCausalLM.from_pretrained(tmp_path / "m", dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(tmp_path / "m")
    trained = load_adapter(load_model("preset:tiny-llama", seed=5), run / "adapter").eval()
    ids = torch.tensor([tokenizer("Tom has 3 apples.")["input_ids"]])
    expected = logits(trained, ids)
    assert (logits(plain, ids) - expected).abs().max().item() <= 1e-5
    # and the co-permuted trained model itself (the last checkpoint's deltas)
    recipe = load_recipe(run / "recipe.yaml")
    converted = _trained_model(run, recipe, find_checkpoint(run, "6")).eval()
    assert (logits(plain, ids) - logits(converted, ids)).abs().max().item() <= 1e-5
    assert (tmp_path / "m" / "generation_config.json").is_file()
    # the adapter of the last checkpoint is the run's adapter; an earlier one differs
    for step, same in (("6", True), ("step-0000003", False)):
        out = tmp_path / f"ckpt-{step}"
        result = runner.invoke(app, ["export", str(run), "--checkpoint", step, "--out", str(out)])
        assert result.exit_code == 0, result.output
        mine, final = (
            load_file(out / "s2ft_adapter.safetensors"),
            load_file(run / "adapter" / "s2ft_adapter.safetensors"),
        )
        assert mine.keys() == final.keys()
        assert all(torch.equal(mine[k], final[k]) for k in mine) is same
    # errors: no such checkpoint (the ones there are listed), an existing --out
    result = runner.invoke(app, ["export", str(run), "--checkpoint", "4", "--out", "x"])
    assert result.exit_code == 1 and "step-0000003, step-0000006" in result.output
    result = runner.invoke(app, ["export", str(run), "--out", str(tmp_path / "m")])
    assert result.exit_code == 1 and "already exists" in result.output
    result = runner.invoke(app, ["export", str(tmp_path), "--out", str(tmp_path / "n")])
    assert result.exit_code == 1 and "not a training run" in result.output


def test_gguf_exports_of_a_run_on_a_hugging_face_base_run_in_llama_cpp(tmp_path, s2ft_cache):
    """A run on a Hugging Face base: its base converted once by llama.cpp's converter, the
    merged model (f32, q8_0) and the LoRA placed in that file; llama.cpp gives the trained
    logits (f32: to its own sums; q8_0: near), and the LoRA on the base file the merged
    file's."""
    (tmp_path / "r.yaml").write_text(RECIPE.replace('"preset:tiny-llama"', f'"{STORIES}"'))
    train(load_recipe(tmp_path / "r.yaml"))
    run = tmp_path / "run"
    files = {}
    for name, args in {
        "f32": ["--format", "gguf"],
        "q8_0": ["--format", "gguf", "--quant", "q8_0"],
        "lora": ["--format", "gguf-lora"],
    }.items():
        files[name] = tmp_path / f"{name}.gguf"
        result = runner.invoke(app, ["export", str(run), "--out", str(files[name]), *args])
        assert result.exit_code == 0, result.output
    (base_file,) = s2ft_cache.glob("gguf-export/*/base-f32.gguf")
    trained = load_adapter(load_model(str(STORIES)), run / "adapter").eval()
    ids = [1, 403, 261, 429, 300, 46, 13]
    expected = logits(trained, torch.tensor([ids]))[0]

    scale = expected.abs().max()
    merged = llama_cpp_logits(files["f32"], ids)
    assert (merged - expected).abs().max() <= 1e-3 * scale
    assert (llama_cpp_logits(files["q8_0"], ids) - expected).abs().max() <= 5e-2 * scale
    with_lora = llama_cpp_logits(base_file, ids, files["lora"])
    assert (with_lora - merged).abs().max() <= 1e-4 * scale
    # --quant is for --format gguf; GGUF formats need a run, not an adapter directory
    bad = {
        "--quant": ["export", str(run), "--out", "x", "--quant", "q8_0"],
        "a training run": ["export", str(run / "adapter"), "--out", "x", "--format", "gguf"],
        "one of": ["export", str(run), "--out", "x", "--format", "gguf", "--quant", "q3"],
    }
    for words, args in bad.items():
        result = runner.invoke(app, args)
        assert result.exit_code == 1 and words in result.output, result.output


# ---------------------------------------------------------------------------------------
# Fuse, unfuse, switch


def test_fuse_unfuse_and_switching_restore_the_base(two_adapters):
    base, path_a, path_b = two_adapters
    ids = torch.randint(0, 97, (2, 9))
    a, b = Adapter.load(path_a), Adapter.load(path_b)
    model = copy.deepcopy(base)
    original = {k: v.clone() for k, v in model.state_dict().items()}
    a.check_base(model)
    fuse(model, a)
    with_a = logits(load_adapter(copy.deepcopy(base), path_a), ids)
    assert (logits(model, ids) - with_a).abs().max() <= logit_tol(with_a)
    unfuse(model, a)
    assert all(torch.equal(v, original[k]) for k, v in model.state_dict().items())
    fuse(model, a)
    switch(model, a, b)
    with_b = logits(load_adapter(copy.deepcopy(base), path_b), ids)
    assert (logits(model, ids) - with_b).abs().max() <= logit_tol(with_b)
    switch(model, b, a)
    assert (logits(model, ids) - with_a).abs().max() <= logit_tol(with_a)
    switch(model, a, None)
    for k, v in model.state_dict().items():
        assert (v - original[k]).abs().max().item() <= 1e-6, k


def test_unfusing_out_of_order_on_shared_matrices_is_refused(tmp_path):
    base = tiny_model("llama-mha")
    random_adapter(base, tmp_path / "a", {"down_proj": 0.5}, seed=1)
    random_adapter(base, tmp_path / "b", {"down_proj": 0.5}, seed=2)
    a, b = Adapter.load(tmp_path / "a"), Adapter.load(tmp_path / "b")
    model = copy.deepcopy(base)
    fuse(model, a)
    fuse(model, b)
    with pytest.raises(S2FTError, match="fused after .*; unfuse that one first"):
        unfuse(model, a)
    unfuse(model, b)
    unfuse(model, a)
    assert all(torch.equal(v, base.state_dict()[k]) for k, v in model.state_dict().items())


def test_a_mismatched_base_is_refused_naming_what_differs(two_adapters):
    _, path_a, _ = two_adapters
    adapter = Adapter.load(path_a)
    with pytest.raises(AdapterMismatchError, match="hidden_size is 64, this model's is 48"):
        adapter.check_base(tiny_model("llama-mha"))
    other = tiny_model("llama-gqa-bias", seed=7)
    with pytest.raises(AdapterMismatchError, match="trained on other weights"):
        serve_adapters(other, {"a": path_a})
    serve_adapters(other, {"a": path_a}, force=True)  # same shapes: force accepts


# ---------------------------------------------------------------------------------------
# Combining


def test_combining_disjoint_adapters_equals_applying_both(two_adapters, tmp_path):
    base, path_a, path_b = two_adapters
    combined, overlaps = combine([Adapter.load(path_a), Adapter.load(path_b)])
    assert all(o.overlapping == 0 for o in overlaps)
    both = copy.deepcopy(base)
    fuse(both, Adapter.load(path_a))
    fuse(both, Adapter.load(path_b))
    combined.save(tmp_path / "ab")
    merged = load_adapter(copy.deepcopy(base), tmp_path / "ab")
    ids = torch.randint(0, 97, (2, 9))
    expected = logits(both, ids)
    assert (logits(merged, ids) - expected).abs().max() <= logit_tol(expected)


def test_combining_overlapping_adapters_counts_units_and_weights_the_sum(tmp_path):
    base = tiny_model("llama-gqa-bias")
    ma = random_adapter(base, tmp_path / "a", {"o_proj": 0.5, "down_proj": 0.5}, seed=1)
    mb = random_adapter(base, tmp_path / "b", {"o_proj": 0.5, "down_proj": 0.5}, seed=2)
    result = runner.invoke(
        app,
        ["combine", str(tmp_path / "a"), str(tmp_path / "b"), "--out", str(tmp_path / "ab")]
        + ["--weights", "0.5,2"],
    )
    assert result.exit_code == 0, result.output
    a, b = Adapter.load(tmp_path / "a"), Adapter.load(tmp_path / "b")
    ab = Adapter.load(tmp_path / "ab")
    _, overlaps = combine([a, b])
    sel_a, sel_b = ma.s2ft_selection.units, mb.s2ft_selection.units
    for o in overlaps:
        layer, matrix = int(o.matrix.split(".")[2]), o.matrix.rsplit(".", 1)[1]
        shared = set(sel_a[layer][matrix]) & set(sel_b[layer][matrix])
        union = set(sel_a[layer][matrix]) | set(sel_b[layer][matrix])
        assert (o.overlapping, o.units) == (len(shared), len(union)), o
        assert f"{o.matrix} │ {o.units} │ {o.overlapping}" in " ".join(result.output.split())
    assert any(o.overlapping for o in overlaps)
    for name, u in ab.updates.items():  # every column: 0.5·Δa + 2·Δb where each has one
        expected = torch.zeros_like(u.delta)
        for adapter, w in ((a, 0.5), (b, 2.0)):
            theirs = adapter.updates[name]
            at = torch.searchsorted(u.index, theirs.index)
            expected.index_add_(u.dim, at, w * theirs.delta)
        assert torch.allclose(u.delta, expected, atol=1e-7), name
    config = json.loads((tmp_path / "ab" / "s2ft_adapter.json").read_text())
    assert [c["weight"] for c in config["combined_from"]] == [0.5, 2.0]


def test_combining_adapters_of_different_bases_is_refused(tmp_path):
    random_adapter(tiny_model("llama-gqa-bias"), tmp_path / "a", {"o_proj": 0.5}, seed=1)
    random_adapter(tiny_model("llama-mha"), tmp_path / "b", {"o_proj": 0.5}, seed=1)
    args = ["combine", str(tmp_path / "a"), str(tmp_path / "b"), "--out", str(tmp_path / "ab")]
    result = runner.invoke(app, args)
    assert result.exit_code == 1 and "belong to different base models" in result.output
    result = runner.invoke(app, [*args[:3], "--weights", "1", "--out", str(tmp_path / "c")])
    assert result.exit_code == 1


# ---------------------------------------------------------------------------------------
# Many adapters in one batch


def test_each_sequence_of_a_batch_uses_its_own_adapter(two_adapters):
    base, path_a, path_b = two_adapters
    names = ["a", None, "b", "a"]
    ids = torch.randint(0, 97, (4, 11))
    alone = []
    for i, name in enumerate(names):
        model = copy.deepcopy(base)
        if name is not None:
            load_adapter(model, path_a if name == "a" else path_b)
        alone.append(logits(model, ids[i : i + 1]))
    alone = torch.cat(alone)
    served = serve_adapters(copy.deepcopy(base), {"a": path_a, "b": path_b})
    with adapters_per_sequence(served, names):
        batched = logits(served, ids)
    assert (batched - alone).abs().max() <= logit_tol(alone)
    # generate: greedy and beam search (beams repeat each sequence), as each alone
    for beams in (1, 2):
        with adapters_per_sequence(served, names), torch.no_grad():
            out = served.generate(ids, max_new_tokens=6, do_sample=False, num_beams=beams)
        for i, name in enumerate(names):
            model = copy.deepcopy(base)
            if name is not None:
                load_adapter(model, path_a if name == "a" else path_b)
            with torch.no_grad():
                own = model.generate(ids[i : i + 1], max_new_tokens=6, do_sample=False,
                                     num_beams=beams)  # fmt: skip
            assert torch.equal(out[i, : own.shape[1]], own[0]), (beams, i)
    with pytest.raises(S2FTError, match="'c' is not served"):
        with adapters_per_sequence(served, ["c"]):
            pass
    stop_serving(served)
    assert all(torch.equal(v, base.state_dict()[k]) for k, v in served.state_dict().items())
    assert (logits(served, ids) - logits(base, ids)).abs().max() == 0


def test_misuse_is_refused_and_leaves_the_weights_alone(two_adapters, tmp_path):
    base, path_a, path_b = two_adapters
    model = copy.deepcopy(base)
    original = {k: v.clone() for k, v in model.state_dict().items()}
    # an adapter of another shape fails before any matrix is changed
    random_adapter(tiny_model("llama-mha"), tmp_path / "other", {"o_proj": 0.5}, seed=1)
    with pytest.raises(S2FTError, match="needs a delta of shape"):
        fuse(model, Adapter.load(tmp_path / "other"))
    assert all(torch.equal(v, original[k]) for k, v in model.state_dict().items())
    # fused, then cast: unfusing still restores (in the new dtype)
    a = Adapter.load(path_a)
    fuse(model, a)
    model.to(torch.bfloat16)
    unfuse(model, a)
    for k, v in model.state_dict().items():
        assert torch.equal(v, original[k].to(torch.bfloat16)), k
    # serving: names once, no S² layers underneath, one name per sequence, nesting
    served = serve_adapters(copy.deepcopy(base), {"a": path_a})
    with pytest.raises(S2FTError, match="named 'a' is served already"):
        serve_adapters(served, {"a": path_b})
    with pytest.raises(S2FTError, match="needs one adapter name"):
        with adapters_per_sequence(served, []):
            pass
    ids = torch.randint(0, 97, (2, 7))
    with adapters_per_sequence(served, ["a", "a"]):
        outer = logits(served, ids)
        with adapters_per_sequence(served, [None, None]):
            assert torch.equal(logits(served, ids), logits(base, ids))
        assert torch.equal(logits(served, ids), outer)
    with pytest.raises(S2FTError, match="carries an S²FT adapter"):
        serve_adapters(load_adapter(copy.deepcopy(base), path_a), {"b": path_b})
    with pytest.raises(S2FTError, match="already carries"):
        load_adapter(served, path_b)


def test_combining_refuses_unknowable_bases_and_bad_weights(tmp_path):
    random_adapter(tiny_model("llama-gqa-bias"), tmp_path / "a", {"o_proj": 0.5}, seed=1)
    other = tiny_model("llama-gqa-bias", seed=3)
    other.config._name_or_path = "another-base"
    random_adapter(other, tmp_path / "b", {"down_proj": 0.5}, seed=1)
    a, b = Adapter.load(tmp_path / "a"), Adapter.load(tmp_path / "b")
    with pytest.raises(AdapterMismatchError, match="adapt no matrix in common"):
        combine([a, b])
    combine([a, b], force=True)
    with pytest.raises(S2FTError, match="must be finite"):
        combine([a, b], [1.0, float("nan")], force=True)
