"""One S²FT state per model: every operation is checked against it in one place, the
served updates follow the model, and a converted model saves itself as an adapter."""

from __future__ import annotations

import copy

import pytest
import torch

from s2ft_cli import S2FTError, get_s2ft_model, load_adapter, merge_adapter, unmerge_adapter
from s2ft_cli.adapter.format import Adapter, adapter_of
from s2ft_cli.adapter.runtime import fuse, unfuse, unload_adapter
from s2ft_cli.adapter.serving import adapters_per_sequence, serve_adapters, stop_serving
from s2ft_cli.engine.state import state_of

from .conftest import batch, logit_tol, tiny_model
from .test_adapter import CFG, trained


def test_states_and_their_transitions(tmp_path):
    base = tiny_model("llama-gqa-bias")
    assert state_of(base).name == "plain"
    model = get_s2ft_model(copy.deepcopy(base), CFG)
    assert state_of(model).name == "converted" and model.s2ft_selection is not None
    model.save_pretrained(tmp_path / "a")
    merge_adapter(model)
    assert state_of(model).name == "plain" and len(state_of(model).fused) == 1
    assert not hasattr(model, "s2ft_selection") and "save_pretrained" not in model.__dict__
    loaded = load_adapter(copy.deepcopy(base), tmp_path / "a")
    assert state_of(loaded).name == "loaded"
    assert state_of(unload_adapter(loaded)).name == "plain"
    served = serve_adapters(copy.deepcopy(base), {"a": tmp_path / "a"})
    assert state_of(served).name == "serving" and state_of(served).served == ["a"]
    assert state_of(stop_serving(served)).name == "plain"


def test_converting_over_fused_adapters_is_refused_until_they_are_unmerged(tmp_path):
    """merge → convert → unmerge would write the saved rows back at co-permuted places."""
    trained().save_pretrained(tmp_path / "a")
    base = tiny_model("llama-gqa-bias")
    before = copy.deepcopy(base.state_dict())
    merge_adapter(load_adapter(base, tmp_path / "a"))
    with pytest.raises(S2FTError, match="fused into its weights.*unmerge_adapter"):
        get_s2ft_model(base, CFG)
    unmerge_adapter(base)
    assert all(torch.equal(base.state_dict()[k], v) for k, v in before.items())
    get_s2ft_model(base, CFG)  # the plain base again


def test_fusing_into_a_co_permuted_model_is_refused(tmp_path):
    trained(seed=1).save_pretrained(tmp_path / "a")
    adapter = Adapter.load(tmp_path / "a")
    model = trained()
    weights = copy.deepcopy(model.state_dict())
    for operation in (fuse, unfuse):
        with pytest.raises(S2FTError, match="co-permuted.*merge_adapter"):
            operation(model, adapter)
    assert all(torch.equal(model.state_dict()[k], v) for k, v in weights.items())


def test_served_updates_follow_the_model_to_another_dtype_and_device(tmp_path):
    trained(delta_seed=1).save_pretrained(tmp_path / "a")
    trained(delta_seed=2).save_pretrained(tmp_path / "b")
    base = tiny_model("llama-gqa-bias")
    ids = batch(base, size=3)
    alone = {}
    for name in ("a", "b"):
        single = load_adapter(copy.deepcopy(base), tmp_path / name).double()
        alone[name] = single(ids).logits
    model = serve_adapters(base, {"a": tmp_path / "a", "b": tmp_path / "b"}).double()
    with adapters_per_sequence(model, ["a", None, "b"]):
        logits = model(ids).logits
    assert logits.dtype == torch.float64
    plain = base(ids).logits  # outside the block: the base
    for row, want in ((0, alone["a"][0]), (1, plain[1]), (2, alone["b"][2])):
        assert (logits[row] - want).abs().max() <= logit_tol(want)
    model.to("meta")
    layers = [m for m in model.modules() if hasattr(m, "updates")]
    assert layers and all(
        u.delta.device.type == "meta" and u.index.dtype == torch.long
        for layer in layers
        for u in layer.updates.values()
    )


def test_save_pretrained_of_a_converted_model_writes_its_adapter(tmp_path):
    model = trained()
    ids = batch(model)
    want = model(ids).logits
    model.save_pretrained(tmp_path / "hf", safe_serialization=True)  # Trainer's arguments
    assert sorted(p.name for p in (tmp_path / "hf").iterdir()) == [
        "s2ft_adapter.json",
        "s2ft_adapter.safetensors",
    ]
    fresh = load_adapter(tiny_model("llama-gqa-bias"), tmp_path / "hf")
    got = fresh(ids).logits
    assert (got - want).abs().max() <= logit_tol(want)
    fresh.save_pretrained(tmp_path / "again")  # a loaded adapter saves itself too
    assert Adapter.load(tmp_path / "again").updates.keys() == adapter_of(model).updates.keys()
    with pytest.raises(S2FTError, match="no S²FT adapter to save"):
        state_of(tiny_model("mistral")).check("save")


def test_hugging_face_trainer_saves_the_adapter_it_trained(tmp_path):
    """A Trainer (or TRL) user converts the model, trains it with ``Trainer`` and saves it
    with ``save_model``: the folder is the S²FT adapter, and it loads back onto a fresh
    base to the trained model's logits; Trainer's checkpoints hold it too."""
    from transformers import Trainer, TrainingArguments

    base = tiny_model("llama-gqa-bias")
    rows = [{"input_ids": ids, "labels": ids} for ids in batch(base, size=16, seed=3).tolist()]
    model = get_s2ft_model(copy.deepcopy(base), CFG)
    args = TrainingArguments(
        output_dir=str(tmp_path / "run"),
        per_device_train_batch_size=4,
        max_steps=4,
        save_steps=2,
        learning_rate=1e-2,
    )
    Trainer(model=model, args=args, train_dataset=rows).train()
    Trainer(model=model, args=args).save_model(str(tmp_path / "final"))
    for folder in (tmp_path / "final", tmp_path / "run" / "checkpoint-4"):
        assert (folder / "s2ft_adapter.json").is_file(), sorted(folder.iterdir())
        assert not any(folder.glob("model*.safetensors"))  # no permuted base weights
    ids = batch(base)
    want = model(ids).logits
    got = load_adapter(copy.deepcopy(base), tmp_path / "final")(ids).logits
    assert (got - want).abs().max() <= logit_tol(want)
    assert (want - base(ids).logits).abs().max() > 1e-3  # the training moved the logits
