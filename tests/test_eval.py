"""`s2ft eval`: likelihoods and generations checked against references computed another
way, adapters unfused, fused and exported alike, torchrun equal to one process."""

from __future__ import annotations

import copy
import json
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from typer.testing import CliRunner

from s2ft_cli import get_s2ft_model, merge_adapter, save_adapter
from s2ft_cli.cli import app
from s2ft_cli.data import alpaca_prompt, arithmetic_problems, prompt_ids
from s2ft_cli.engine.models import char_tokenizer, load_model, load_tokenizer
from s2ft_cli.evaluation import decoding
from s2ft_cli.evaluation.tasks import TASKS, Task
from s2ft_cli.recipe import EvalSection

from .conftest import SHARED, STORIES, smollm2_in_small, stories_model
from .families import FAMILY_CONFIGS, family_model
from .torchrun import torchrun

DATA = SHARED / "data" / "llm-adapters" / "dataset"
runner = CliRunner()


def shared_records(task: str, n: int) -> list[dict]:
    if not DATA.is_dir():
        pytest.skip(f"reference data {DATA} not present (it sits beside the repo)")
    return json.loads((DATA / task / "test.json").read_text())[:n]


def invoke(*args) -> str:
    """Run ``s2ft eval``; its output with line breaks made spaces (rich wraps at 80)."""
    result = runner.invoke(app, ["eval", *map(str, args)])
    assert result.exit_code == 0, result.output
    return " ".join(result.output.split())


def predictions(folder: Path) -> list[dict]:
    return [json.loads(x) for x in (folder / "predictions.jsonl").read_text().splitlines()]


# ---------------------------------------------------------------------------------------
# Likelihood scoring


class FixedNextToken(torch.nn.Module):
    """A hand-built language model: whatever the context, the next token is drawn from
    softmax(bias). The likelihood of any text is then known in closed form."""

    def __init__(self, bias: torch.Tensor):
        super().__init__()
        self.bias = bias

    def forward(self, input_ids, attention_mask=None, **kwargs):
        return SimpleNamespace(logits=self.bias.expand(*input_ids.shape, -1))


@pytest.mark.parametrize("favoured,expected", [("", "true"), ("fals", "false")])
def test_loglik_on_a_hand_built_model_picks_the_known_answer(favoured, expected):
    tok = char_tokenizer()
    bias = torch.zeros(len(tok))
    for ch in favoured:  # letters of "false" but not of "true" made 50x likelier
        bias[tok.convert_tokens_to_ids(ch)] = 4.0
    logp = torch.log_softmax(bias, -1)
    records = [{"instruction": f"Question {i}?\n\nAnswer format: true/false"} for i in range(5)]
    scores = decoding.answer_logliks(
        FixedNextToken(bias), tok, records, TASKS["boolq"], "alpaca", 3, torch.device("cpu")
    )
    for per_label in scores:
        assert decoding.best_label(per_label) == expected
        for label, value in per_label.items():
            sentence = f"the correct answer is {label}"
            closed_form = sum(logp[tok.convert_tokens_to_ids(c)] for c in sentence)
            closed_form += logp[tok.eos_token_id]
            assert value == pytest.approx(closed_form.item(), abs=1e-4)


def test_loglik_batched_equals_each_sequence_alone_on_the_real_model():
    model, tok = stories_model(), load_tokenizer(str(STORIES))
    records = shared_records("ARC-Easy", 3) + shared_records("social_i_qa", 2)
    task = TASKS["ARC-Easy"]
    scores = decoding.answer_logliks(model, tok, records, task, "alpaca", 4, torch.device("cpu"))
    for record, per_label in zip(records, scores, strict=True):
        assert list(per_label) == list(task.candidates(record["instruction"]))
        prompt = alpaca_prompt(record["instruction"])
        for label, value in per_label.items():
            # reference: one unpadded sequence, prompt ids then the rest, log-softmax by hand
            head = [tok.bos_token_id] + tok(prompt, add_special_tokens=False)["input_ids"]
            full = tok(prompt + f"the correct answer is {label}", add_special_tokens=False)
            ids = [tok.bos_token_id] + full["input_ids"] + [tok.eos_token_id]
            with torch.no_grad():
                logits = model(torch.tensor([ids])).logits[0].double()
            logp = torch.log_softmax(logits, -1)
            reference = sum(logp[i - 1, ids[i]].item() for i in range(len(head), len(ids)))
            assert value == pytest.approx(reference, abs=1e-4), label


@pytest.mark.parametrize(
    ("task", "batch_size"),
    [("ARC-Easy", 5), ("boolq", 16), ("social_i_qa", 7)],
)
def test_loglik_reading_shared_prefixes_once_equals_reading_every_choice_whole(
    task, batch_size, smollm2_tokenizer
):
    """SmolLM2's tokenizer and chat template (a system turn every question shares), on a
    two-layer model of its architecture (the readings' agreement does not depend on the
    weights): the batch's common part, each question's prefix and each choice's own tokens
    read in turn give the log-likelihoods of every choice read whole, within 1e-4, and the
    same answers. One question a batch (batch 5, up to 5 choices), several, padded prefixes
    and tails."""
    model = smollm2_in_small(smollm2_tokenizer)
    records = shared_records(task, 8)
    args = (smollm2_tokenizer, records, TASKS[task], "chat", batch_size, torch.device("cpu"))
    shared = decoding.answer_logliks(model, *args)
    whole = decoding.answer_logliks(model, *args, share_prefixes=False)
    for got, want in zip(shared, whole, strict=True):
        assert list(got) == list(want)
        assert max(abs(got[k] - want[k]) for k in got) <= 1e-4
        assert decoding.best_label(got) == decoding.best_label(want)


# ---------------------------------------------------------------------------------------
# Generation


def test_batched_left_padded_generation_equals_one_prompt_at_a_time():
    model, tok = stories_model(), load_tokenizer(str(STORIES))
    records = shared_records("boolq", 3) + shared_records("gsm8k", 3)
    ids = prompt_ids(tok, [alpaca_prompt(r["instruction"]) for r in records])
    assert len({len(x) for x in ids}) > 1  # really padded
    cpu = torch.device("cpu")
    batched = decoding.generate(
        model, tok, ids, EvalSection(max_new_tokens=20, batch_size=4), TASKS["gsm8k"], cpu
    )
    alone = decoding.generate(
        model, tok, ids, EvalSection(max_new_tokens=20, batch_size=1), TASKS["gsm8k"], cpu
    )
    assert batched == alone and all(batched)


@pytest.mark.parametrize(
    ("task", "records", "batch_size", "max_new_tokens"),
    [("ARC-Easy", 9, 3, 20), ("gsm8k", 4, 3, 10)],
)
def test_own_greedy_loop_writes_what_transformers_generate_writes(
    task, records, batch_size, max_new_tokens, smollm2_base, smollm2_tokenizer
):
    """SmolLM2 with its chat template: the own loop (common beginning read once, finished
    rows leaving, waiting prompts joining) writes exactly what ``model.generate`` writes.
    ARC-Easy stops each row at its answer (rows end at different steps, more prompts than
    rows); gsm8k runs every row to the token limit."""
    tok = smollm2_tokenizer
    texts = [decoding.prompt_text(r, tok, "chat") for r in shared_records(task, records)]
    settings = EvalSection(batch_size=batch_size, max_new_tokens=max_new_tokens)
    args = (tok, prompt_ids(tok, texts), settings, TASKS[task], torch.device("cpu"))
    own = decoding.generate(smollm2_base, *args)
    assert own == decoding.generate(smollm2_base, *args, own_loop=False)
    assert len({len(tok(text)["input_ids"]) for text in own}) > 1 or task == "gsm8k"


@pytest.mark.parametrize("name", list(FAMILY_CONFIGS))
def test_own_greedy_loop_equals_generate_on_every_family(name):
    """Each family s2ft knows (MHA, GQA, biases, q/k norms, sliding windows, soft-capping,
    sinks, experts): prompts sharing a beginning, three rows at a time, a token the rows
    first write at different steps made an EOS, so that rows end apart and waiting prompts
    join: the own loop's outputs are ``model.generate``'s."""
    model, tok = family_model(name), char_tokenizer()
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():  # weights large enough that greedy outputs vary along a row
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.5)
    start = [tok.bos_token_id] + torch.randint(4, 97, (6,), generator=g).tolist()
    lengths = (3, 9, 5, 12, 7, 4)
    prompts = [start + torch.randint(4, 97, (n,), generator=g).tolist() for n in lengths]
    args = (tok, prompts, EvalSection(batch_size=3, max_new_tokens=12), TASKS["gsm8k"])
    written = decoding.generate(model, *args, torch.device("cpu"))
    spread = {c: len({text.find(c) for text in written}) for c in sorted(set("".join(written)))}
    model.generation_config.eos_token_id = tok.convert_tokens_to_ids(max(spread, key=spread.get))
    own = decoding.generate(model, *args, torch.device("cpu"))
    assert own == decoding.generate(model, *args, torch.device("cpu"), own_loop=False)
    assert len({len(text) for text in own}) > 1  # rows ended at different steps


def test_generation_ignores_the_models_own_generation_settings():
    model, tok = stories_model(), load_tokenizer(str(STORIES))
    ids = prompt_ids(tok, [alpaca_prompt("Once upon a time")])
    settings, cpu = EvalSection(max_new_tokens=30), torch.device("cpu")
    greedy = decoding.generate(model, tok, ids, settings, TASKS["gsm8k"], cpu)
    config = model.generation_config
    config.repetition_penalty, config.do_sample, config.temperature = 3.0, True, 1.5
    with torch.no_grad():  # the model's own settings do change what generate() writes
        own = model.generate(torch.tensor(ids), max_new_tokens=30)
    assert tok.decode(own[0, len(ids[0]) :], skip_special_tokens=True).strip() != greedy[0]
    assert decoding.generate(model, tok, ids, settings, TASKS["gsm8k"], cpu) == greedy
    assert model.generation_config.repetition_penalty == 3.0  # given back afterwards


def test_stopping_at_the_answer_keeps_every_prediction():
    model, tok = stories_model(), load_tokenizer(str(STORIES))
    # label words the story model writes (one only capitalised: "Okay")
    probe = Task("probe", "commonsense", "label", ("sorry", "cat", "okay"))
    prompts = ["Once upon a time", "One day, a little boy", "The cat", "Tom and Sue"]
    ids = prompt_ids(tok, [alpaca_prompt(p) for p in prompts])
    cpu = torch.device("cpu")
    full = decoding.generate(
        model, tok, ids, EvalSection(max_new_tokens=60, stop_at_answer=False), probe, cpu
    )
    short = decoding.generate(model, tok, ids, EvalSection(max_new_tokens=60), probe, cpu)
    assert [probe.extract(x) for x in short] == [probe.extract(x) for x in full]
    assert all(f.startswith(s) for f, s in zip(full, short, strict=True))
    assert all(len(s) < len(f) for s, f in zip(short, full, strict=True))  # each one stopped


# ---------------------------------------------------------------------------------------
# The command


def test_eval_on_the_real_checkpoint_in_both_modes(tmp_path):
    shared_records("boolq", 1)
    for mode in ("generate", "loglik"):
        out = tmp_path / mode
        output = invoke(
            "--model", STORIES, "--data-dir", DATA.parent, "--tasks", "boolq,piqa,gsm8k,AQuA",
            "--limit", 5, "--max-new-tokens", 24, "--mode", mode, "--out", out,
        )  # fmt: skip
        results = json.loads((out / "results.json").read_text())
        assert list(results["tasks"]) == ["boolq", "piqa", "gsm8k", "AQuA"]
        assert all(r["n"] == 5 for r in results["tasks"].values())
        assert set(results["groups"]) == {"commonsense", "math"}
        rows = predictions(out)
        assert len(rows) == 20
        assert {"task", "prompt", "output", "prediction", "answer", "correct"} <= rows[0].keys()
        assert "commonsense (avg)" in output and "examples/s" in output
        for row in rows:
            assert row["task"] != "boolq" or row["prompt"].startswith("Below is an instruction")
        if mode == "loglik":
            assert "evaluated by generation" in output
            boolq = [r for r in rows if r["task"] == "boolq"]
            assert all(set(r["logliks"]) == {"true", "false"} for r in boolq)
            assert all(r["output"] == f"the correct answer is {r['prediction']}" for r in boolq)
        # re-scoring the written predictions gives the same counts
        invoke("--score-only", out / "predictions.jsonl", "--out", out / "again")
        again = json.loads((out / "again" / "results.json").read_text())
        assert again["tasks"] == results["tasks"]


def test_a_single_test_file_takes_its_task_from_the_path_or_the_option(tmp_path):
    records = shared_records("SVAMP", 4)
    invoke("--model", STORIES, "--data-dir", DATA / "SVAMP" / "test.json", "--limit", 2,
           "--max-new-tokens", 8, "--out", tmp_path / "a")  # fmt: skip
    assert list(json.loads((tmp_path / "a" / "results.json").read_text())["tasks"]) == ["SVAMP"]
    loose = tmp_path / "mine.jsonl"
    loose.write_text("".join(json.dumps(r) + "\n" for r in records))
    invoke("--model", STORIES, "--data-dir", loose, "--tasks", "gsm8k", "--max-new-tokens", 8,
           "--out", tmp_path / "b")  # fmt: skip
    assert json.loads((tmp_path / "b" / "results.json").read_text())["tasks"]["gsm8k"]["n"] == 4


def _math_file(tmp_path: Path) -> Path:
    path = tmp_path / "gsm8k" / "test.json"
    path.parent.mkdir()
    path.write_text(json.dumps(arithmetic_problems(6, seed=3)))
    return path


def test_adapters_unfused_fused_and_exported_give_the_same_answers(tmp_path):
    data = _math_file(tmp_path)
    base = load_model("preset:tiny-llama", seed=0)
    for k, name in enumerate(("a1", "a2")):
        model = get_s2ft_model(copy.deepcopy(base), {"targets": {"o_proj": 0.5, "down_proj": 0.2}})
        torch.manual_seed(k)
        with torch.no_grad():
            for p in model.parameters():
                if p.requires_grad:
                    p.normal_(0, 0.3)
        save_adapter(model, tmp_path / name)
        if name == "a1":
            merge_adapter(model).save_pretrained(tmp_path / "merged")
            char_tokenizer().save_pretrained(tmp_path / "merged")
    common = ["--data-dir", data.parent.parent, "--tasks", "gsm8k", "--max-new-tokens", 12]
    output = invoke("--model", "preset:tiny-llama", "--adapter", tmp_path / "a1", "--adapter",
                    tmp_path / "a2", "--out", tmp_path / "unfused", *common)  # fmt: skip
    assert "accuracy % (95% confidence interval) by adapter" in output
    invoke("--model", "preset:tiny-llama", "--adapter", tmp_path / "a1", "--merge",
           "--out", tmp_path / "fused", *common)  # fmt: skip
    invoke("--model", tmp_path / "merged", "--out", tmp_path / "exported", *common)
    invoke("--model", "preset:tiny-llama", "--out", tmp_path / "base", *common)

    def outputs(folder):
        return [r["output"] for r in predictions(folder)]

    a1 = outputs(tmp_path / "unfused" / "a1")
    assert a1 == outputs(tmp_path / "fused") == outputs(tmp_path / "exported")
    assert a1 != outputs(tmp_path / "base")
    assert outputs(tmp_path / "unfused" / "a2") not in (a1, outputs(tmp_path / "base"))
    settings = json.loads((tmp_path / "fused" / "results.json").read_text())["settings"]
    assert settings["merged"] and settings["adapter"] == str(tmp_path / "a1")


def test_eval_of_a_training_run_uses_its_adapter(tmp_path):
    data = _math_file(tmp_path)
    recipe = tmp_path / "r.yaml"
    recipe.write_text(
        'model: {name_or_path: "preset:tiny-llama"}\n'
        'data: {train: {path: "builtin:arithmetic", limit: 32}, max_seq_len: 256}\n'
        "s2ft: {targets: {down_proj: 0.1}}\n"
        "train: {max_steps: 2, batch_size: 8, warmup_steps: 0, seed: 4}\n"
        f"eval: {{data_dir: {data.parent.parent}, max_new_tokens: 8}}\n"
        "output_dir: run\n"
    )
    assert runner.invoke(app, ["train", str(recipe)]).exit_code == 0
    output = invoke(tmp_path / "run", "eval.limit=3")
    assert "adapter run:" in output
    results = json.loads((tmp_path / "run" / "eval" / "results.json").read_text())
    assert results["tasks"]["gsm8k"]["n"] == 3
    assert results["settings"]["adapter"] == str(tmp_path / "run" / "adapter")


def test_torchrun_two_processes_give_what_one_process_gives(tmp_path):
    shared_records("boolq", 1)
    args = ["eval", "--model", STORIES, "--data-dir", DATA, "--tasks", "boolq,gsm8k", "--limit",
            5, "--mode", "loglik", "--batch-size", 1, "--max-new-tokens", 12]  # fmt: skip
    result = torchrun(*args, "--out", tmp_path / "ddp")
    assert result.returncode == 0, result.stderr[-3000:]
    invoke(*args[1:], "--out", tmp_path / "one")
    ddp, one = predictions(tmp_path / "ddp"), predictions(tmp_path / "one")
    assert [r["index"] for r in ddp] == [r["index"] for r in one] == [0, 1, 2, 3, 4] * 2
    for a, b in zip(ddp, one, strict=True):
        assert (a["output"], a["prediction"], a["correct"]) == (
            b["output"],
            b["prediction"],
            b["correct"],
        )
        for label in a.get("logliks", {}):
            assert a["logliks"][label] == pytest.approx(b["logliks"][label], abs=1e-4)
    settings = json.loads((tmp_path / "ddp" / "results.json").read_text())["settings"]
    assert settings["processes"] == 2


@pytest.mark.parametrize(
    "args,message",
    [
        (["--model", "preset:tiny-llama"], "No test data: give --data-dir"),
        (["--data-dir", "."], "Which model? Give --model"),
        (["--model", "preset:tiny-llama", "--data-dir", "nowhere"], "does not exist"),
        (
            ["--model", "preset:tiny-llama", "--data-dir", ".", "--tasks", "boolq"],
            "No test file for boolq",
        ),
        (["--model", "preset:tiny-llama", "--data-dir", ".", "--limit", "0"], "--limit"),
        (
            ["--model", "preset:tiny-llama", "--data-dir", ".", "--tasks", "boolz"],
            "Unknown task 'boolz'",
        ),
        (
            ["--model", "preset:tiny-llama", "--data-dir", ".", "--num-beams", "2", "--do-sample"],
            "not both",
        ),
        (
            ["--model", "preset:tiny-llama", "--adapter", "missing", "--data-dir", "DATA"],
            "missing does not exist; give an adapter directory",
        ),
    ],
)
def test_user_errors_are_one_paragraph(tmp_path, monkeypatch, args, message):
    monkeypatch.chdir(tmp_path)
    _math_file(tmp_path)
    args = [str(tmp_path) if a == "DATA" else a for a in args]
    result = runner.invoke(app, ["eval", *args])
    assert result.exit_code == 1, result.output
    assert message in " ".join(result.output.split())


def test_torchrun_with_fewer_examples_than_processes(tmp_path):
    data = _math_file(tmp_path)
    result = torchrun("eval", "--model", "preset:tiny-llama", "--data-dir", data, "--limit", 1,
                      "--max-new-tokens", 4, "--out", tmp_path / "o")  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    assert len(predictions(tmp_path / "o")) == 1


def test_problems_found_before_the_model_runs(tmp_path):
    data = _math_file(tmp_path)
    (tmp_path / "file").write_text("x")
    (tmp_path / "boolq").mkdir()
    (tmp_path / "boolq" / "test.json").write_text("[]")
    base = ["eval", "--model", str(STORIES), "--data-dir", str(data)]
    for args, message in [
        (["--out", str(tmp_path / "file")], "Cannot use"),
        (["--prompt-template", "chat", "--out", str(tmp_path / "o")], "needs a tokenizer with"),
        (["--adapter", str(tmp_path), "--out", str(tmp_path / "o")], "not an s2ft adapter"),
    ]:
        result = runner.invoke(app, [*base, *args])
        assert result.exit_code == 1, result.output
        assert message in " ".join(result.output.split()), result.output
        assert "examples/s" not in result.output  # nothing was evaluated
    result = runner.invoke(app, [*base[:-1], str(tmp_path), "--tasks", "boolq"])
    assert result.exit_code == 1 and "holds no test records" in result.output


def test_a_wrong_second_adapter_stops_the_run_before_the_first_is_evaluated(tmp_path):
    data = _math_file(tmp_path)
    save_adapter(get_s2ft_model(load_model("preset:tiny-llama"), {"targets": {"v_proj": 0.5}}),
                 tmp_path / "good")  # fmt: skip
    save_adapter(get_s2ft_model(load_model("preset:tiny-llama", seed=9),
                                {"targets": {"v_proj": 0.5}}), tmp_path / "other")  # fmt: skip
    args = ["eval", "--model", "preset:tiny-llama", "--data-dir", str(data), "--adapter",
            str(tmp_path / "good"), "--adapter", str(tmp_path / "other"),
            "--out", str(tmp_path / "o")]  # fmt: skip
    result = runner.invoke(app, args)
    assert result.exit_code == 1
    assert "was trained on other weights" in " ".join(result.output.split())
    assert not (tmp_path / "o" / "good" / "results.json").exists()


def test_a_malformed_test_record_is_named(tmp_path):
    path = tmp_path / "boolq" / "test.json"
    path.parent.mkdir()
    path.write_text(json.dumps([{"instruction": "q", "answer": "true"}, {"instruction": "q"}]))
    result = runner.invoke(app, ["eval", "--model", "preset:tiny-llama", "--data-dir", tmp_path])
    assert result.exit_code == 1
    assert f"{path}: record 2 is malformed: it has no 'answer'" in " ".join(result.output.split())
