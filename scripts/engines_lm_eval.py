"""A run's PEFT export in lm-evaluation-harness against ``s2ft eval``: the same held-out
problems, answered by ``lm_eval --model hf --model_args pretrained=BASE,peft=EXPORT``.

``s2ft eval RUN`` answers ``--limit`` held-out problems with the adapter (greedy,
``--max-new-tokens`` at most); the run is exported with ``s2ft export --format peft``; a
local lm-eval task holds the same problems (the user turns s2ft asks, through the
tokenizer's chat template: ``--apply_chat_template``), generates until the template's end
of turn with the same budget, and scores an answer as ``s2ft eval`` does (its extraction,
``scoring.py`` beside the task). Printed and written: how many answers are the same text,
both accuracies and lm-eval's examples per second (model loading included).

    python scripts/engines_lm_eval.py runs/quickstart --limit 100
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from engines_llama_cpp import eval_predictions

from s2ft_cli.data.templates import user_message
from s2ft_cli.engine.gguf_bases import gguf_folder, is_gguf_source
from s2ft_cli.evaluation.runner import load_test_sets
from s2ft_cli.export import export_run
from s2ft_cli.recipe import EvalSection, load_recipe

REPO = Path(__file__).resolve().parents[1]
TASK = "s2ft_arithmetic"
TASK_YAML = """\
task: {task}
dataset_path: json
dataset_kwargs:
  data_files: {{test: {data}}}
test_split: test
output_type: generate_until
doc_to_text: "{{{{question}}}}"
doc_to_target: "{{{{answer}}}}"
generation_kwargs: {{until: [{stop}], do_sample: false, max_gen_toks: {tokens}}}
process_results: !function scoring.process_results
metric_list: [{{metric: acc, aggregation: mean, higher_is_better: true}}]
"""
SCORING = '''\
from s2ft_cli.evaluation.tasks import task_named


def process_results(doc, results):
    """s2ft eval's scoring: the last number of the output against the answer."""
    task = task_named("arithmetic")
    return {"acc": float(task.is_correct(task.extract(results[0]), task.gold(doc["answer"])))}
'''


def write_task(folder: Path, rows: list[dict], limit: int, tokens: int, stop: str) -> None:
    """The lm-eval task of the rows' problems: their user turns and gold answers."""
    (test,), _ = load_test_sets(EvalSection(data_dir="builtin:arithmetic", limit=limit))
    records = [test.records[row["index"]] for row in rows]
    docs = folder / "test.jsonl"
    folder.mkdir(parents=True)
    docs.write_text("".join(
        json.dumps({"question": user_message(r["instruction"], r.get("input") or ""),
                    "answer": r["answer"]}) + "\n"
        for r in records
    ))  # fmt: skip
    task = TASK_YAML.format(task=TASK, data=docs, stop=json.dumps(stop), tokens=tokens)
    (folder / f"{TASK}.yaml").write_text(task)
    (folder / "scoring.py").write_text(SCORING)


def lm_eval_answers(base: str, peft: Path, tasks: Path, batch: int, out: Path) -> tuple:
    """lm-eval's answers (in the task's order), its accuracy and its seconds."""
    command = [sys.executable, "-m", "lm_eval", "--model", "hf", "--model_args"]
    command += [f"pretrained={base},peft={peft},dtype=float32", "--tasks", TASK]
    command += ["--include_path", str(tasks), "--apply_chat_template", "--batch_size", str(batch)]
    command += ["--device", "cpu", "--output_path", str(out), "--log_samples"]
    start = time.perf_counter()
    done = subprocess.run(command, capture_output=True, text=True)
    seconds = time.perf_counter() - start
    if done.returncode != 0:
        raise SystemExit(f"lm_eval failed:\n{done.stderr[-3000:]}")
    (results,) = out.rglob("results_*.json")
    (samples,) = out.rglob(f"samples_{TASK}_*.jsonl")
    rows = sorted((json.loads(line) for line in samples.open()), key=lambda s: s["doc_id"])
    accuracy = json.loads(results.read_text())["results"][TASK]["acc,none"]
    return [r["filtered_resps"][0] for r in rows], accuracy, seconds


def compare(run: Path, limit: int, tokens: int, batch: int, work: Path) -> dict:
    """The figures of one comparison (``work``: a scratch folder)."""
    from transformers import AutoTokenizer

    recipe = load_recipe(run / "recipe.yaml")
    name = recipe.model.name_or_path
    base = str(gguf_folder(name)) if is_gguf_source(name) else name
    ours = eval_predictions(run, limit, tokens, work / "eval", base=False)["adapter"]
    stop = AutoTokenizer.from_pretrained(base).eos_token  # the chat template's end of turn
    write_task(work / "task", ours, limit, tokens, stop)
    peft = export_run(run, work / "peft", format="peft")
    theirs, accuracy, seconds = lm_eval_answers(base, peft, work / "task", batch, work / "out")
    return {
        "n": len(ours),
        # s2ft strips the white space around an output
        "same_text": sum(a.strip() == row["output"] for a, row in zip(theirs, ours, strict=True)),
        "accuracy": 100 * accuracy,
        "s2ft_accuracy": 100 * sum(row["correct"] for row in ours) / len(ours),
        "examples_per_s": len(ours) / seconds,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run", nargs="?", default=str(REPO / "runs" / "quickstart"))
    parser.add_argument("--limit", type=int, default=100)
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument("--batch-size", type=int, default=32, help="lm-eval's batch size")
    parser.add_argument("--out", default=str(REPO / "docs" / "results" / "engines_lm_eval.json"))
    args = parser.parse_args()
    run = Path(args.run)
    with tempfile.TemporaryDirectory() as work:
        figures = compare(run, args.limit, args.max_new_tokens, args.batch_size, Path(work))
    record = {"command": " ".join(sys.argv), "run": str(run), **vars(args), **figures}
    Path(args.out).write_text(json.dumps(record, indent=1) + "\n")
    print(
        f"{run.name}, {figures['n']} held-out problems: lm-eval's answer is s2ft eval's on "
        f"{figures['same_text']}; accuracy {figures['accuracy']:.1f}% against s2ft's "
        f"{figures['s2ft_accuracy']:.1f}%; {figures['examples_per_s']:.2f} examples/s"
    )


if __name__ == "__main__":
    main()
