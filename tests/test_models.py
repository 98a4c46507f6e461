"""The architecture registry: shapes read from configs, unsupported types refused."""

from __future__ import annotations

import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel

from s2ft_cli import S2FTError, get_s2ft_model
from s2ft_cli.engine.models import get_linear, load_model, model_shape
from s2ft_cli.engine.targets import TARGETS, Unit

from .conftest import TINY_CONFIGS, tiny_model


@pytest.mark.parametrize("arch", list(TINY_CONFIGS))
def test_shape_matches_the_modules(arch):
    model = tiny_model(arch)
    shape = model_shape(model)
    for matrix in ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"):
        w = get_linear(model, 1, matrix).weight
        assert tuple(w.shape) == shape.matrix_shape(matrix), matrix


@pytest.mark.parametrize("arch", list(TINY_CONFIGS))
def test_target_table_matches_the_modules(arch):
    """Each matrix of the table sits in the block of its structure, and its units, counted
    from the config, fill its axis; the other axis is the hidden size."""
    model = tiny_model(arch)
    config, shape = model.config, model_shape(model)
    heads, kv_heads = config.num_attention_heads, config.num_key_value_heads
    counts = {
        Unit.QUERY_HEAD: heads,
        Unit.KV_HEAD: kv_heads,
        Unit.CHANNEL: config.intermediate_size,
    }
    blocks = {"attention": model.model.layers[0].self_attn, "ffn": model.model.layers[0].mlp}
    assert set(TARGETS) == {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj",
                            "down_proj"}  # fmt: skip
    for name, target in TARGETS.items():
        w = getattr(blocks[target.structure], name).weight
        axis = {"rows": 0, "cols": 1}[target.axis]
        assert w.shape[1 - axis] == config.hidden_size, name
        assert shape.num_units(name) == counts[target.unit], name
        assert w.shape[axis] == counts[target.unit] * shape.unit_width(name), name
    assert shape.layout_units("attention") == (heads, heads // kv_heads)
    assert shape.layout_units("ffn") == (config.intermediate_size, 1)


def test_qwen3_head_dim_comes_from_the_config():
    shape = model_shape(tiny_model("qwen3"))
    assert shape.head_dim == 12 and shape.hidden_size // shape.num_heads == 8
    assert shape.group_size == 2


def test_unsupported_architecture_lists_the_supported_ones():
    model = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=50))
    with pytest.raises(S2FTError, match="'gpt2' is not supported.*llama.*mistral.*qwen2.*qwen3"):
        get_s2ft_model(model, {"targets": {"o_proj": 0.5}})


def test_presets_build_without_download_and_meta_needs_no_memory():
    model = load_model("preset:tiny-llama")
    assert model_shape(model).num_kv_heads == 4
    meta = load_model("preset:bench-llama", weights=False)
    assert all(p.device == torch.device("meta") for p in meta.parameters())
    assert model_shape(meta).num_layers == 12
    with pytest.raises(S2FTError, match="Built-in presets: preset:tiny-llama"):
        load_model("preset:nope")


def test_missing_local_directory_is_named(tmp_path):
    with pytest.raises(S2FTError, match="does not exist"):
        load_model(str(tmp_path / "missing-model"))
