"""GGUF bases of every family that transformers' GGUF reader takes: a tiny model of the
family made into a GGUF file by llama.cpp's own converter (``convert_hf_to_gguf.py``, which
``make install`` takes from the llama-cpp-python source distribution), as users' files are
made, then loaded by s2ft as a base: its logits are the original model's, and it converts
for training with the logits unchanged. Where transformers' reader drops a setting the file
states (Qwen3's head_dim, the experts' widths, Gemma's soft-capping, GPT-2's context),
s2ft reads it from the file (``Family.gguf_config``)."""

from __future__ import annotations

import copy
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from s2ft_cli import get_s2ft_model
from s2ft_cli.engine.models import load_model

from .conftest import llama_cpp_logits, logit_tol
from .families import family_config

REPO = Path(__file__).resolve().parents[1]
CONVERTER = REPO / ".venv" / "llama.cpp" / "convert_hf_to_gguf.py"
# family -> (tokenizer, config changes). "spm": a sentencepiece model of 320 pieces trained
# here; "bpe": the packaged SmolLM2's byte-level BPE, for the families whose converter takes
# only a BPE it knows (by its hash: a tokenizer trained here is refused), whose 49k pieces
# transformers parses for 15 s a file: two of those, Qwen3-MoE and GPT-2 (StableLM's and
# StarCoder2's files, made and read the same way, loaded exactly when checked by hand:
# docs/FAMILIES.md). The changes are what llama.cpp's converter (0.3.36's) or transformers'
# reader cannot carry: a GPT-2 FFN other than 4 × hidden, Qwen3-MoE's unnormalised top-k
# weights (the real models have neither).
GGUF_FAMILIES = {
    "llama": ("spm", {"attention_bias": False}),
    "qwen2": ("spm", {}),
    "phi3": ("spm", {}),
    "gemma2": ("spm", {}),
    "gemma3_text": ("spm", {}),
    "qwen3": ("spm", {}),
    "qwen3_moe": ("bpe", {"norm_topk_prob": True}),
    "gpt2": ("bpe", {"n_inner": None, "n_ctx": 256}),
}
SPM_PIECES = 320


def train_sentencepiece(folder) -> None:
    """A small sentencepiece model (BPE, byte fallback) and its transformers tokenizer."""
    import random

    import sentencepiece
    from transformers import LlamaTokenizer

    rng = random.Random(0)
    words = "Mia Tom has gets more apples how many the answer is 1 2 3 4 5 6 7 8 9 0 + = .".split()
    text = folder / "text.txt"
    text.write_text("\n".join(" ".join(rng.choices(words, k=12)) for _ in range(2000)))
    sentencepiece.SentencePieceTrainer.train(
        input=str(text), model_prefix=str(folder / "tokenizer"), vocab_size=SPM_PIECES,
        model_type="bpe", byte_fallback=True, character_coverage=1.0, bos_id=1, eos_id=2,
        unk_id=0, pad_id=-1, minloglevel=2,
    )  # fmt: skip
    text.unlink()
    (folder / "tokenizer.vocab").unlink()
    LlamaTokenizer(vocab_file=str(folder / "tokenizer.model")).save_pretrained(folder)


# One process converts every folder: llama.cpp's script, run as its command line does.
DRIVER = """
import os, runpy, sys
script, *folders = sys.argv[1:]
sys.path.insert(0, os.path.dirname(script))
for folder in folders:
    sys.argv = [script, folder, "--outfile", folder + "/model.gguf", "--outtype", "f32"]
    runpy.run_path(script, run_name="__main__")
"""


@pytest.fixture(scope="module")
def gguf_files(tmp_path_factory, smollm2_tokenizer):
    """Each family's tiny model, its folder (the original) and its GGUF file."""
    if not CONVERTER.is_file():
        pytest.fail(f"{CONVERTER} is missing: `make install` takes it from llama-cpp-python")
    root = tmp_path_factory.mktemp("gguf-bases")
    bpe, spm = root / "bpe-tokenizer", root / "spm-tokenizer"
    smollm2_tokenizer.save_pretrained(bpe)
    spm.mkdir()
    train_sentencepiece(spm)
    folders = {}
    for model_type, (tokenizer, changes) in GGUF_FAMILIES.items():
        config = family_config(model_type)
        vocab = SPM_PIECES if tokenizer == "spm" else len(smollm2_tokenizer)
        config.vocab_size, config.bos_token_id, config.eos_token_id = vocab, 1, 2
        config.pad_token_id = 0
        for key, value in changes.items():
            setattr(config, key, value)
        torch.manual_seed(0)
        folder = root / model_type
        AutoModelForCausalLM.from_config(config).save_pretrained(folder)
        for file in (spm if tokenizer == "spm" else bpe).iterdir():
            (folder / file.name).write_bytes(file.read_bytes())
        folders[model_type] = folder
    done = subprocess.run(
        [sys.executable, "-c", DRIVER, str(CONVERTER), *map(str, folders.values())],
        capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    return folders


@pytest.mark.parametrize("model_type", list(GGUF_FAMILIES))
def test_a_gguf_file_made_by_llama_cpp_is_a_base(gguf_files, model_type):
    folder = gguf_files[model_type]
    original = AutoModelForCausalLM.from_pretrained(folder).eval()
    base = load_model(str(folder / "model.gguf")).eval()
    assert base.config.model_type in (model_type, "llama")
    ids = torch.randint(3, SPM_PIECES, (2, 12))
    with torch.no_grad():
        expected = original(ids).logits
        assert (base(ids).logits - expected).abs().max() <= logit_tol(expected)
        converted = get_s2ft_model(base, {"targets": {"o_proj": 0.5, "down_proj": 0.2}})
        assert (converted(ids).logits - expected).abs().max() <= logit_tol(expected)


# llama.cpp's Phi-3 vocabulary loader looks up Phi-3's own special tokens, which the tiny
# 320-piece tokenizer here lacks (it refuses the converter's file of it as well):
# transformers' reading back checks Phi-3's fused q|k|v and gate|up
LLAMA_CPP_LOADS = set(GGUF_FAMILIES) - {"phi3"}


@pytest.mark.parametrize("model_type", list(GGUF_FAMILIES))
def test_gguf_exports_hold_the_trained_update_in_transformers_and_llama_cpp(
    gguf_files, model_type, tmp_path
):
    """``--format gguf`` (f32): transformers reads the file back as the merged model, its
    logits exactly; llama.cpp runs it as transformers runs the merged model; the
    ``gguf-lora`` file on the base's file gives llama.cpp's logits of the merged file.
    That is: q/k rows in llama.cpp's rope order, fused q|k|v and gate|up kept whole or
    split per the architecture, GPT-2's transposed weights, experts split into gate and
    up. Exceptions: Phi-3 is checked through transformers only (``LLAMA_CPP_LOADS``);
    Gemma 2/3 are not compared with transformers in llama.cpp (see below); Qwen3-MoE's
    LoRA export is refused (experts have no llama.cpp LoRA form)."""
    from s2ft_cli import merge_adapter
    from s2ft_cli.adapter.format import adapter_of
    from s2ft_cli.errors import S2FTError
    from s2ft_cli.export.gguf import export_gguf, export_gguf_lora

    source = gguf_files[model_type] / "model.gguf"
    targets = {"q_proj": 0.5, "k_proj": 0.5, "up_proj": 0.3, "down_proj": 0.3}
    base = load_model(str(source)).eval()
    model = get_s2ft_model(copy.deepcopy(base), {"targets": targets})
    torch.manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.normal_(0, 0.05)
    adapter = adapter_of(model)
    merged_file = export_gguf(str(source), copy.deepcopy(base), adapter, tmp_path / "m.gguf")
    merged = merge_adapter(model).eval()
    back = AutoModelForCausalLM.from_pretrained(
        tmp_path, gguf_file="m.gguf", config=merged.config, dtype=torch.float32
    ).eval()
    ids = torch.randint(3, SPM_PIECES, (1, 12))
    with torch.no_grad():
        expected, original = merged(ids).logits[0], base(ids).logits[0]
        assert (back(ids).logits[0] - expected).abs().max() <= logit_tol(expected)
    if model_type not in LLAMA_CPP_LOADS:
        return
    scale = expected.abs().max()
    in_llama_cpp = llama_cpp_logits(merged_file, ids[0].tolist())
    base_alone = llama_cpp_logits(source, ids[0].tolist())
    # llama.cpp computes these tiny Gemma 2/3 models otherwise than transformers (their
    # base files too: 1.3% and 79% of the largest logit, its sliding window and rope
    # details); elsewhere it reproduces transformers to float32 noise, the exports as well
    if not model_type.startswith("gemma"):
        assert (base_alone - original).abs().max() <= 1e-3 * scale
        assert (in_llama_cpp - expected).abs().max() <= 1e-3 * scale
    assert (base_alone - in_llama_cpp).abs().max() > 1e-2 * scale  # the update shows
    lora_file = tmp_path / "l.gguf"
    if base.config.model_type.endswith("moe"):
        with pytest.raises(S2FTError, match="tensor of experts"):
            export_gguf_lora(str(source), base, adapter, lora_file)
        return
    export_gguf_lora(str(source), base, adapter, lora_file)
    with_lora = llama_cpp_logits(source, ids[0].tolist(), lora_file)
    assert (with_lora - in_llama_cpp).abs().max() <= 1e-4 * scale


def test_source_types_keep_untouched_tensors_and_widen_a_replaced_4_bit_one(tmp_path):
    """``--quant source``: untouched tensors keep their bytes; a replaced tensor keeps its
    type when it has 8 bits or more (F16 here) and becomes Q8_0 when it had fewer (Q4_0),
    whose grid would round a fine-tuning update away."""
    from gguf import GGMLQuantizationType as T
    from gguf import GGUFReader, GGUFWriter
    from gguf.quants import dequantize, quantize

    from s2ft_cli.export.gguf_file import rewrite_gguf

    g = torch.Generator().manual_seed(0)
    weights = {name: torch.randn(8, 64, generator=g).numpy() for name in ("a", "b", "c")}
    types = {"a": T.Q4_0, "b": T.Q4_0, "c": T.F16}
    writer = GGUFWriter(tmp_path / "source.gguf", "llama")
    for name, w in weights.items():
        data = quantize(w, types[name])
        writer.add_tensor(name, data, raw_dtype=types[name])
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()

    source = GGUFReader(tmp_path / "source.gguf")
    update = {name: weights[name] + 0.01 for name in ("b", "c")}
    replaced = {name: (lambda w=w: w) for name, w in update.items()}
    out = rewrite_gguf(source, tmp_path / "out.gguf", "source", replaced, {})
    written = {t.name: t for t in GGUFReader(out).tensors}
    before = {t.name: t for t in source.tensors}
    assert bytes(written["a"].data) == bytes(before["a"].data)  # untouched: the same bytes
    assert (written["b"].tensor_type, written["c"].tensor_type) == (T.Q8_0, T.F16)
    for name, w in update.items():
        back = dequantize(written[name].data, written[name].tensor_type).reshape(w.shape)
        assert abs(back - w).max() <= abs(w).max() / 100  # Q8_0's and F16's rounding
