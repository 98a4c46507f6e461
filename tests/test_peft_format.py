"""S²FT adapters as PEFT LoRA adapters (`s2ft export --format peft`): PEFT reads an export
of a trained run on stories260K and computes the S²FT adapter's logits, merge_and_unload
gives the merged export's weights, padded ranks are exact, and s2ft reads an export back
as the adapter it came from; our own adapter directories are not taken for PEFT's."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from peft import PeftModel
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM
from transformers.utils import find_adapter_config_file
from typer.testing import CliRunner

from s2ft_cli import S2FTError, load_adapter, merge_adapter
from s2ft_cli.adapter.format import V1_FILES, Adapter
from s2ft_cli.adapter.serving import adapters_per_sequence, serve_adapters
from s2ft_cli.cli import app
from s2ft_cli.recipe import load_recipe
from s2ft_cli.training.trainer import train

from .conftest import STORIES, batch, logit_tol, stories_model

runner = CliRunner()

# row updates (v_proj, up_proj) and column updates (o_proj, down_proj)
RECIPE = f"""\
model: {{name_or_path: {STORIES}}}
data: {{train: {{path: "builtin:arithmetic", limit: 48}}, val_size: 0, max_seq_len: 256}}
s2ft: {{targets: {{v_proj: 0.5, o_proj: 0.25, up_proj: 0.1, down_proj: 0.1}},
        seed: 2}}
train: {{max_steps: 3, batch_size: 8, lr: 2.0e-2, warmup_steps: 0, eval_every: 0}}
output_dir: run
"""


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A short `s2ft train` run of stories260K."""
    folder = tmp_path_factory.mktemp("peft")
    (folder / "r.yaml").write_text(RECIPE)
    train(load_recipe(folder / "r.yaml", [f"output_dir={folder / 'run'}"]))
    return folder / "run"


def export(source, out, *options) -> None:
    result = runner.invoke(app, ["export", str(source), "--out", str(out), *options])
    assert result.exit_code == 0, result.output


def logits(model, ids):
    with torch.no_grad():
        return model(ids).logits


@pytest.mark.parametrize("rank", [None, 48])
def test_peft_computes_the_adapters_logits_and_merges_into_its_weights(run, tmp_path, rank):
    out = tmp_path / "peft"
    export(run, out, "--format", "peft", *(["--rank", str(rank)] if rank else []))
    adapter = Adapter.load(run / "adapter")
    ranks = {name: len(u.index) for name, u in adapter.updates.items()}
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and sorted(config["target_modules"]) == sorted(ranks)
    assert config["r"] == config["lora_alpha"] == (rank or max(ranks.values()))
    assert len(set(ranks.values())) > 1  # the patterns matter
    assert config["rank_pattern"] == config["alpha_pattern"]
    assert len(config["rank_pattern"]) == (0 if rank else len(ranks))
    tensors = load_file(out / "adapter_model.safetensors")
    for name, k in ranks.items():
        a = tensors[f"base_model.model.{name}.lora_A.weight"]
        assert a.shape[0] == (rank or k)

    ids = batch(stories_model(), size=2, length=24)
    s2ft = load_adapter(stories_model(), run / "adapter")
    expected = logits(s2ft, ids)
    peft = PeftModel.from_pretrained(stories_model(), out).eval()
    got = logits(peft, ids)
    assert (got - expected).abs().max().item() <= logit_tol(expected)
    assert (got - logits(stories_model(), ids)).abs().max().item() > 1e-3  # it adapts

    merged = peft.merge_and_unload().state_dict()
    reference = merge_adapter(s2ft).state_dict()
    assert merged.keys() == reference.keys()
    for key in merged:
        torch.testing.assert_close(merged[key], reference[key], rtol=0, atol=1e-7, msg=key)


def test_an_export_reads_back_as_the_adapter_it_came_from(run, tmp_path):
    export(run, tmp_path / "peft", "--format", "peft", "--rank", "40")
    original, back = Adapter.load(run / "adapter"), Adapter.load(tmp_path / "peft")
    assert back.config == original.config and back.updates.keys() == original.updates.keys()
    for name, u in original.updates.items():
        v = back.updates[name]
        assert v.axis == u.axis and torch.equal(v.index, u.index) and torch.equal(v.delta, u.delta)
    # `s2ft eval --adapter` and the serving API take it as the adapter it is
    ids = batch(stories_model(), size=2, length=16)
    expected = logits(load_adapter(stories_model(), run / "adapter"), ids)
    assert torch.equal(logits(load_adapter(stories_model(), tmp_path / "peft"), ids), expected)
    served = serve_adapters(stories_model(), {"p": tmp_path / "peft"})
    with adapters_per_sequence(served, ["p", "p"]):
        assert (logits(served, ids) - expected).abs().max().item() <= logit_tol(expected)
    # and exports back to the s2ft format unchanged
    export(tmp_path / "peft", tmp_path / "again")
    for file in ("s2ft_adapter.json", "s2ft_adapter.safetensors"):
        assert (tmp_path / "again" / file).read_bytes() == (run / "adapter" / file).read_bytes()


def test_a_damaged_export_is_refused(run, tmp_path):
    export(run, tmp_path / "peft", "--format", "peft")
    weights = tmp_path / "peft" / "adapter_model.safetensors"
    tensors = load_file(weights)
    key = next(k for k in tensors if k.endswith("o_proj.lora_A.weight"))  # the one-hot side
    tensors[key][0, 0] += 0.5
    save_file(tensors, weights)
    with pytest.raises(S2FTError, match="not an s2ft export's; the export is damaged"):
        Adapter.load(tmp_path / "peft")
    (tmp_path / "peft" / "s2ft_source.json").write_text("[]")
    with pytest.raises(S2FTError, match="not an s2ft export record"):
        Adapter.load(tmp_path / "peft")


def test_ranks_above_the_padding_or_vllms_limit_are_refused(run, tmp_path):
    result = runner.invoke(
        app,
        ["export", str(run), "--format", "peft", "--rank", "1024", "--out", str(tmp_path / "x")],
    )
    assert result.exit_code == 1 and "above vLLM's largest LoRA rank, 512" in result.output
    result = runner.invoke(app, ["export", str(run), "--rank", "8", "--out", str(tmp_path / "y")])
    assert result.exit_code == 1 and "--format peft" in result.output


def test_our_adapter_directory_is_not_taken_for_a_peft_adapter_and_version_1_still_reads(
    run, tmp_path
):
    adapter = run / "adapter"
    assert find_adapter_config_file(str(adapter)) is None  # transformers' probe for PEFT
    with pytest.raises((OSError, ValueError), match="config.json"):  # a model it looks for
        AutoModelForCausalLM.from_pretrained(adapter)
    # a version-1 directory: the same contents under PEFT's file names
    v1 = tmp_path / "v1"
    v1.mkdir()
    config = json.loads((adapter / "s2ft_adapter.json").read_text())
    (v1 / V1_FILES[1][0]).write_text(json.dumps({**config, "version": 1}))
    shutil.copy(adapter / "s2ft_adapter.safetensors", v1 / V1_FILES[1][1])
    ids = batch(stories_model(), size=1, length=16)
    assert torch.equal(
        logits(load_adapter(stories_model(), v1), ids),
        logits(load_adapter(stories_model(), adapter), ids),
    )
