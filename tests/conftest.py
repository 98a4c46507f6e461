"""Tiny models built from configs, and the shared reference checkpoint."""

from __future__ import annotations

import fcntl
import os
import shutil
from pathlib import Path

import pytest
import torch
from transformers import (
    AutoModelForCausalLM,
    LlamaConfig,
    MistralConfig,
    Qwen2Config,
    Qwen3Config,
)

# Under pytest-xdist (make test: two workers) every worker computes with one thread, and so
# do the processes its tests start: two torch processes each spinning two threads on two
# cores run several times slower than one.
if os.environ.get("PYTEST_XDIST_WORKER"):
    os.environ["OMP_NUM_THREADS"] = "1"
    torch.set_num_threads(1)

SHARED = Path(__file__).resolve().parents[2] / "shared"
STORIES = SHARED / "models" / "stories260K"

COMMON = dict(vocab_size=97, max_position_embeddings=64, num_hidden_layers=2)

# name -> config; every family the registry supports, MHA and GQA, with and without biases
TINY_CONFIGS = {
    "llama-mha": lambda: LlamaConfig(
        hidden_size=48, intermediate_size=80, num_attention_heads=6, num_key_value_heads=6, **COMMON
    ),
    "llama-gqa-bias": lambda: LlamaConfig(
        hidden_size=64,
        intermediate_size=96,
        num_attention_heads=8,
        num_key_value_heads=2,
        attention_bias=True,
        mlp_bias=True,
        **COMMON,
    ),
    "mistral": lambda: MistralConfig(
        hidden_size=32, intermediate_size=64, num_attention_heads=4, num_key_value_heads=2, **COMMON
    ),
    "qwen2": lambda: Qwen2Config(
        hidden_size=48, intermediate_size=64, num_attention_heads=6, num_key_value_heads=2, **COMMON
    ),
    "qwen3": lambda: Qwen3Config(
        hidden_size=32,
        intermediate_size=64,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=12,
        **COMMON,
    ),
}


def tiny_model(name: str, seed: int = 0, dtype=torch.float32):
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(TINY_CONFIGS[name](), dtype=dtype)
    with torch.no_grad():  # non-zero biases, so that permuting them is tested
        for module_name, p in model.named_parameters():
            if module_name.endswith("bias"):
                p.normal_(0, 0.1)
    return model.eval()


def llama_cpp_logits(model: Path, ids: list[int], lora: Path | None = None) -> torch.Tensor:
    """llama.cpp's logits of every position of ``ids`` in the GGUF file ``model`` (with a
    LoRA adapter file): llama-cpp-python, one thread, a float32 cache."""
    from llama_cpp import Llama

    llm = Llama(
        model_path=str(model), lora_path=str(lora) if lora else None, n_ctx=64,
        logits_all=True, verbose=False, n_threads=1, type_k=0, type_v=0,
    )  # fmt: skip
    llm.eval(ids)
    logits = torch.tensor(llm.scores[: len(ids)])
    llm.close()
    return logits


SMOLLM2 = "smollm2-135m-instruct"  # the packaged real model (make install installs it)


@pytest.fixture(scope="session", autouse=True)
def s2ft_cache(tmp_path_factory) -> Path:
    """Converted GGUF models go to a cache of this session's (the first test that needs the
    packaged model converts it, ~20 s), never the user's; subprocesses inherit it. The
    workers of one pytest-xdist session share it (a conversion holds the cache's lock: one
    worker converts, the other waits and reads)."""
    root = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):
        root = root.parent  # the session's folder; each worker's is inside it
    folder = root / "s2ft-cache"
    folder.mkdir(exist_ok=True)
    old = os.environ.get("S2FT_CACHE")
    os.environ["S2FT_CACHE"] = str(folder)
    yield folder
    if old is None:
        os.environ.pop("S2FT_CACHE", None)
    else:
        os.environ["S2FT_CACHE"] = old


@pytest.fixture(scope="session")
def smollm2_base():
    """SmolLM2-135M-Instruct from its package (float32, eval mode); copy it before changing
    it. A missing package fails the test with the command that installs it."""
    from s2ft_cli.engine.models import load_model

    return load_model(SMOLLM2).eval()


@pytest.fixture(scope="session")
def smollm2_tokenizer():
    from s2ft_cli.engine.models import load_tokenizer

    return load_tokenizer(SMOLLM2)


QUICKSTART = Path(__file__).resolve().parents[1] / "recipes" / "quickstart.yaml"
# the quickstart cut to 3 steps of batch 4
QUICK = ["data.train.limit=48", "data.val_size=8", "train.max_steps=3", "train.batch_size=4"]
QUICK += ["train.eval_every=0", "train.log_every=1", "train.warmup_steps=1"]


@pytest.fixture(scope="session")
def smollm2_run(s2ft_cache) -> Path:
    """The quickstart recipe (``QUICK``) trained by ``s2ft train``, once a session: the
    pytest-xdist workers share it (the first that needs it trains it holding a lock, the
    other waits and reads). Tests write their outputs elsewhere (``--out``)."""
    from typer.testing import CliRunner

    from s2ft_cli.cli import app

    folder = s2ft_cache.parent / "smollm2-run"
    folder.mkdir(exist_ok=True)
    run = folder / "run"
    with open(folder / "lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not (run / "adapter").is_dir():
            shutil.rmtree(run, ignore_errors=True)  # a run that failed part way
            args = ["train", str(QUICKSTART), *QUICK, f"output_dir={run}"]
            result = CliRunner().invoke(app, args)
            assert result.exit_code == 0, result.output
    return run


def smollm2_in_small(tokenizer, seed: int = 0):
    """A two-layer random model of SmolLM2's architecture (LLaMA, grouped queries, tied
    embeddings) and vocabulary: for the paths where what matters is the tokenizer and the
    chat template, not the weights, at a fraction of the real model's time."""
    from transformers import LlamaConfig

    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=64, intermediate_size=96, num_hidden_layers=2,
        num_attention_heads=8, num_key_value_heads=4, tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
    )  # fmt: skip
    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(config).eval()


def stories_model():
    if not STORIES.is_dir():
        pytest.skip(f"reference checkpoint {STORIES} not present (it sits beside the repo)")
    return AutoModelForCausalLM.from_pretrained(STORIES, dtype=torch.float32).eval()


def batch(model, size: int = 2, length: int = 12, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, model.config.vocab_size, (size, length), generator=g)


def logit_tol(logits: torch.Tensor) -> float:
    """GUIDE: unchanged within 1e-5 × max(1, max |logit|) in fp32."""
    return 1e-5 * max(1.0, logits.abs().max().item())


@pytest.fixture(scope="module")
def one_process_batch_8(tmp_path_factory) -> Path:
    """The reference recipe and run of the multi-process tests: one process, batch 8, no
    accumulation, 6 steps."""
    from s2ft_cli.recipe import load_recipe
    from s2ft_cli.training.trainer import train

    from .test_train import RECIPE, recipe_file

    folder = tmp_path_factory.mktemp("single")
    path = recipe_file(folder, RECIPE.replace("max_steps: 12", "max_steps: 6"))
    train(load_recipe(path, [f"output_dir={folder / 'run'}", "train.batch_size=8"]))
    return path
