"""Loading models: presets, shapes read from configs, missing folders named (the family
table's own checks: ``test_families.py``)."""

from __future__ import annotations

import pytest
import torch

from s2ft_cli import S2FTError
from s2ft_cli.engine.models import load_model
from s2ft_cli.engine.shapes import model_shape

from .conftest import tiny_model


def test_qwen3_head_dim_comes_from_the_config():
    shape = model_shape(tiny_model("qwen3"))
    assert shape.head_dim == 12 and shape.hidden_size // shape.num_heads == 8
    assert shape.group_size == 2


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
