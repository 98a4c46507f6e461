"""A run's GGUF exports in llama.cpp (llama-cpp-python) against ``s2ft eval``: how many
held-out prompts get the same greedy text, and the accuracy of each file.

For a finished run (the quickstart's by default), ``s2ft eval RUN`` scores the base and
the adapter on ``--limit`` held-out problems (its predictions keep every prompt and
output); the run is exported with ``s2ft export --format gguf`` (f32, f16, q8_0, the
source file's own types) and ``--format gguf-lora``; each file then answers the same
prompts in llama.cpp, greedily, ``--max-new-tokens`` at most: the adapter's exports and the
LoRA on the base file (F32: the source rewritten in float32) against the adapter's
outputs, the base's file (as shipped, and in F32) against the base's. A text agrees when
llama.cpp's begins with s2ft's (``s2ft eval`` stops as soon as the answer is complete).
Also counted: prompts whose tokens llama.cpp's tokenizer gives otherwise than the Hugging
Face tokenizer s2ft uses.

    python scripts/engines_llama_cpp.py runs/quickstart --limit 100
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from gguf import GGUFReader
from rich.console import Console
from rich.table import Table

from s2ft_cli.engine.gguf_bases import gguf_file
from s2ft_cli.engine.models import load_tokenizer
from s2ft_cli.evaluation.report import score
from s2ft_cli.export import export_run
from s2ft_cli.export.gguf_file import rewrite_gguf
from s2ft_cli.recipe import load_recipe

REPO = Path(__file__).resolve().parents[1]


def eval_predictions(
    run: Path, limit: int, tokens: int, out: Path, base: bool = True
) -> dict[str, list[dict]]:
    """``s2ft eval``'s predictions of the base (unless not ``base``) and the run's adapter,
    by column."""
    command = [sys.executable, "-m", "s2ft_cli", "eval", str(run), f"eval.limit={limit}"]
    command += [f"eval.max_new_tokens={tokens}", f"eval.include_base={str(base).lower()}"]
    subprocess.run([*command, "--out", str(out)], check=True, capture_output=True)
    if not base:  # one column: its files in the folder itself
        return {"adapter": [json.loads(line) for line in (out / "predictions.jsonl").open()]}
    return {
        column: [json.loads(line) for line in (out / folder / "predictions.jsonl").open()]
        for column, folder in (("base", "base"), ("adapter", run.name))
    }


def in_llama_cpp(model: Path, rows: list[dict], tokenizer, tokens: int, threads: int,
                 lora: Path | None = None) -> dict:  # fmt: skip
    """llama.cpp's greedy answers to the rows' prompts, scored, beside s2ft's outputs."""
    from llama_cpp import Llama

    llm = Llama(
        model_path=str(model), lora_path=str(lora) if lora else None, n_ctx=512,
        n_threads=threads, verbose=False,
    )  # fmt: skip
    answers, same, tokenized_otherwise = [], 0, 0
    start = time.perf_counter()
    for row in rows:
        ids = tokenizer(row["prompt"], add_special_tokens=False)["input_ids"]
        theirs = llm.tokenize(row["prompt"].encode(), add_bos=False, special=True)
        tokenized_otherwise += theirs != ids
        text = llm.create_completion(ids, max_tokens=tokens, temperature=0.0, top_k=1)
        text = text["choices"][0]["text"]
        same += text.startswith(row["output"])
        answers.append({**row, "output": text})
    seconds = time.perf_counter() - start
    llm.close()
    correct = sum(r["correct"] for r in score(answers, str(model)))
    return {
        "agree": same,
        "n": len(rows),
        "accuracy": 100 * correct / len(rows),
        "s2ft_accuracy": 100 * sum(r["correct"] for r in rows) / len(rows),
        "examples_per_s": len(rows) / seconds,
        "tokenized_otherwise": tokenized_otherwise,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run", nargs="?", default=str(REPO / "runs" / "quickstart"))
    parser.add_argument("--limit", type=int, default=100)
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", default=str(REPO / "docs" / "results" / "engines_llama_cpp.json"))
    args = parser.parse_args()
    run = Path(args.run)
    recipe = load_recipe(run / "recipe.yaml")
    tokenizer = load_tokenizer(recipe.model.name_or_path)
    source = gguf_file(recipe.model.name_or_path)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        predictions = eval_predictions(run, args.limit, args.max_new_tokens, tmp / "eval")
        files, export_seconds = {}, {}
        for name, format, quant in (
            ("f32", "gguf", "f32"), ("f16", "gguf", "f16"), ("q8_0", "gguf", "q8_0"),
            ("source", "gguf", "source"), ("lora", "gguf-lora", None),
        ):  # fmt: skip
            start = time.perf_counter()
            files[name] = export_run(run, tmp / f"{name}.gguf", format=format, quant=quant)
            export_seconds[name] = time.perf_counter() - start
        base_f32 = rewrite_gguf(GGUFReader(source), tmp / "base-f32.gguf", "f32", {}, {})
        checks = {
            "adapter: merged f32": (files["f32"], None, "adapter"),
            "adapter: merged f16": (files["f16"], None, "adapter"),
            "adapter: merged q8_0": (files["q8_0"], None, "adapter"),
            "adapter: merged, source types": (files["source"], None, "adapter"),
            "adapter: LoRA on the F32 base": (base_f32, files["lora"], "adapter"),
            "adapter: LoRA on the source base": (source, files["lora"], "adapter"),
            "base: F32": (base_f32, None, "base"),
            "base: source file": (source, None, "base"),
        }
        results = {}
        for label, (model, lora, column) in checks.items():
            rows = predictions[column]
            results[label] = in_llama_cpp(
                model, rows, tokenizer, args.max_new_tokens, args.threads, lora
            )
            print(label, results[label], flush=True)
    record = {
        "command": " ".join(sys.argv),
        "run": str(run),
        "limit": args.limit,
        "max_new_tokens": args.max_new_tokens,
        "threads": args.threads,
        "export_seconds": export_seconds,
        "results": results,
    }
    Path(args.out).write_text(json.dumps(record, indent=1))
    table = Table(title=f"{run.name}: llama.cpp against s2ft eval, {args.limit} prompts")
    for column in ("file", "same text", "accuracy %", "s2ft's %", "examples/s", "tokens differ"):
        table.add_column(column, justify="left" if column == "file" else "right")
    for label, r in results.items():
        table.add_row(
            label, f"{r['agree']}/{r['n']}", f"{r['accuracy']:.1f}", f"{r['s2ft_accuracy']:.1f}",
            f"{r['examples_per_s']:.1f}", str(r["tokenized_otherwise"]),
        )  # fmt: skip
    Console().print(table)


if __name__ == "__main__":
    main()
