"""The PEFT export in vLLM (``make test-engines``: vLLM's CPU build in an environment of
its own, ``.venv-vllm``; too slow on this CPU for every ``make test``): two quickstart
adapters, trained a few steps with different selections, exported with ``s2ft export
--format peft --rank 512``, answer held-out problems in vLLM as ``s2ft eval`` answers them
(greedy, a few prompts, short outputs), the base too; and one vLLM batch with a LoRA per
prompt gives each prompt its own adapter's answer."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from s2ft_cli.engine.gguf_bases import gguf_folder
from s2ft_cli.engine.models import load_tokenizer

REPO = Path(__file__).resolve().parents[1]
VLLM_PYTHON = Path(os.environ.get("S2FT_VLLM_PYTHON", REPO / ".venv-vllm" / "bin" / "python"))
PROMPTS, TOKENS = 3, 16
SMOLLM2 = "smollm2-135m-instruct"


def s2ft(*args, cwd: Path) -> None:
    done = subprocess.run([sys.executable, "-m", "s2ft_cli", *map(str, args)], cwd=cwd,
                          capture_output=True, text=True)  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]


def eval_outputs(run: Path, out: Path) -> dict[str, list[dict]]:
    """``s2ft eval``'s predictions of the base and the run's adapter."""
    s2ft("eval", run, f"eval.limit={PROMPTS}", f"eval.max_new_tokens={TOKENS}", "--out", out,
         cwd=run.parent)  # fmt: skip
    rows = {}
    for column, folder in (("base", "base"), (run.name, run.name)):
        rows[column] = [json.loads(line) for line in (out / folder / "predictions.jsonl").open()]
    return rows


def test_peft_exports_answer_in_vllm_as_in_s2ft(tmp_path):
    if not VLLM_PYTHON.is_file():
        pytest.fail(f"{VLLM_PYTHON} is missing: `make test-engines` installs vLLM's CPU build")
    recipe = REPO / "recipes" / "quickstart.yaml"
    short = ["train.max_steps=4", "data.train.limit=200"]
    for name, seed in (("a", 0), ("b", 1)):
        s2ft("train", recipe, *short, f"s2ft.seed={seed}", f"output_dir={name}", cwd=tmp_path)
        s2ft("export", name, "--format", "peft", "--rank", "512", "--out", f"{name}-peft",
             cwd=tmp_path)  # fmt: skip
    expected = {"a": eval_outputs(tmp_path / "a", tmp_path / "eval-a")}
    expected["b"] = eval_outputs(tmp_path / "b", tmp_path / "eval-b")
    tokenizer = load_tokenizer(SMOLLM2)
    prompts = [
        tokenizer(row["prompt"], add_special_tokens=False)["input_ids"]
        for row in expected["a"]["base"]
    ]
    request = {
        "model": str(gguf_folder(SMOLLM2)), "prompts": prompts, "max_new_tokens": TOKENS,
        "loras": {n: str(tmp_path / f"{n}-peft") for n in ("a", "b")}, "max_lora_rank": 512,
        "mixed": ["a", "b", "a"][:PROMPTS],
    }  # fmt: skip
    (tmp_path / "request.json").write_text(json.dumps(request))
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    done = subprocess.run(
        [str(VLLM_PYTHON), str(REPO / "engines" / "vllm_generate.py"),
         str(tmp_path / "request.json"), str(tmp_path / "vllm.json")],
        capture_output=True, text=True, env=env, timeout=3000,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-4000:]
    texts = json.loads((tmp_path / "vllm.json").read_text())["texts"]
    columns = {"base": expected["a"]["base"], "a": expected["a"]["a"], "b": expected["b"]["b"]}
    same = {
        key: [t.startswith(r["output"]) for t, r in zip(texts[key], rows, strict=True)]
        for key, rows in columns.items()
    }
    assert all(all(v) for v in same.values()), (same, texts, expected)
    alone = [texts[name][i] for i, name in enumerate(request["mixed"])]
    assert texts["mixed"] == alone
