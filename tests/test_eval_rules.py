"""Answer extraction and scoring follow the paper's evaluation code; re-scoring saved
outputs needs no model."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from s2ft_cli.cli import app
from s2ft_cli.errors import S2FTError
from s2ft_cli.evaluation.report import score, summarize, wilson_interval
from s2ft_cli.evaluation.tasks import GROUPS, TASKS, resolve_tasks, task_in_path, task_named

runner = CliRunner()

# (task, output, gold answer, expected prediction, expected correct)
CASES = [
    # commonsense: first label word in the lower-cased output, plain substring search
    ("boolq", "The answer is True.", "true", "true", True),
    ("boolq", "false, not true", "true", "false", False),
    ("boolq", "it is untrue", "true", "true", True),  # the original regex has no word boundary
    ("boolq", "yes", "true", None, False),
    ("piqa", "Solution2 is better than solution1", "solution2", "solution2", True),
    ("social_i_qa", "the correct answer is answer10", "answer1", "answer1", True),
    ("ARC-Easy", "the correct answer is answer5", "answer5", "answer5", True),
    ("ARC-Challenge", "ANSWER3", "Answer3", "answer3", True),  # gold is lower-cased too
    ("openbookqa", "answer4 answer2", "answer2", "answer4", False),
    ("winogrande", "option2", "option2", "option2", True),
    ("hellaswag", "ending3 then ending1", "ending3", "ending3", True),
    # arithmetic: the last number, commas removed, within 0.001
    ("gsm8k", "He pays 1,234.5 dollars.", "1234.5", 1234.5, True),
    ("gsm8k", "3 + 4 = 7. The answer is 7.", "7.0", 7.0, True),
    ("gsm8k", "The answer is 15.", "15", 15.0, True),
    ("MultiArith", "no number here", "3", None, False),
    ("SVAMP", "20 - 25 = -5", "-5", -5.0, True),
    ("AddSub", "about 2.0005", "2", 2.0005, True),
    ("SingleEq", "about 2.002", "2", 2.002, False),
    ("mawps", "x = 0.25", "0.25", 0.25, True),
    ("gsm8k", "1-2", "-2", -2.0, True),  # '-?\d+' reads '1' then '-2'
    ("gsm8k", "answer: .5", "5", 5.0, True),  # no leading-dot numbers in the paper's regex
    ("gsm8k", "9" * 400, "1", None, False),  # too long for a float: inf, never correct
    # AQuA: the first capital A-E anywhere in the output
    ("AQuA", "The answer is (D).", "D", "D", True),  # 'T' is not A-E: 'D' comes first
    ("AQuA", "(b) so B", "B", "B", True),
    ("AQuA", "Apples cost 3", "C", "A", False),
    ("AQuA", "none", "A", None, False),
]


@pytest.mark.parametrize("task,output,answer,prediction,correct", CASES)
def test_extraction_follows_the_paper(task, output, answer, prediction, correct):
    [row] = score([{"task": task, "output": output, "answer": answer}], "cases")
    assert row["prediction"] == prediction
    assert row["correct"] is correct


def test_groups_and_names():
    assert len(GROUPS["commonsense"]) == 8 and len(GROUPS["math"]) == 7
    assert [t.name for t in resolve_tasks("math")] == list(GROUPS["math"])
    assert [t.name for t in resolve_tasks(["arc_easy,GSM8K", "boolq"])] == [
        "boolq",
        "ARC-Easy",
        "gsm8k",
    ]
    assert task_named("Social-I-QA").name == "social_i_qa"
    assert [task_named(n).name for n in ("siqa", "OBQA", "arc_c", "arc-e")] == [
        "social_i_qa",
        "openbookqa",
        "ARC-Challenge",
        "ARC-Easy",
    ]
    with pytest.raises(S2FTError, match="Unknown task 'boolx'.*groups: commonsense, math"):
        resolve_tasks("boolx")
    assert task_in_path(Path("/x/dataset/SVAMP/test.json")).name == "SVAMP"


def test_candidates_are_the_offered_labels():
    arc = TASKS["ARC-Easy"]
    question = "Q?\n\nAnswer1: a Answer2: b Answer3: c\n\nAnswer format: answer1/answer2/answer3"
    assert arc.candidates(question) == ("answer1", "answer2", "answer3")
    assert arc.candidates("no format line") == arc.labels


def test_summary_averages_tasks_within_groups():
    rows = [
        {"task": "boolq", "correct": True},
        {"task": "boolq", "correct": False},
        {"task": "piqa", "correct": True},
        {"task": "gsm8k", "correct": False},
    ]
    results = summarize(rows)
    boolq = results["tasks"]["boolq"]
    assert {k: boolq[k] for k in ("accuracy", "correct", "n")} == {
        "accuracy": 0.5,
        "correct": 1,
        "n": 2,
    }
    assert boolq["ci95"] == pytest.approx([0.0945, 0.9055], abs=1e-4)  # Wilson, tabulated
    assert results["groups"]["commonsense"] == {
        "accuracy": 0.75,
        "n": 3,
        "tasks": ["boolq", "piqa"],
    }
    assert results["groups"]["math"]["accuracy"] == 0.0


def test_score_only_rescores_saved_outputs(tmp_path):
    lines = [{"task": t, "output": o, "answer": a} for t, o, a, _, _ in CASES]
    lines[0]["correct"] = False  # stale fields are recomputed, not trusted
    path = tmp_path / "predictions.jsonl"
    path.write_text("".join(json.dumps(x) + "\n" for x in lines) + "\n")
    result = runner.invoke(app, ["eval", "--score-only", str(path), "--out", str(tmp_path / "o")])
    assert result.exit_code == 0, result.output
    results = json.loads((tmp_path / "o" / "results.json").read_text())
    for name, r in results["tasks"].items():
        expected = [c for t, *_, c in CASES if t == name]
        assert (r["correct"], r["n"]) == (sum(expected), len(expected)), name
    rescored = [
        json.loads(x) for x in (tmp_path / "o" / "predictions.jsonl").read_text().splitlines()
    ]
    assert [r["correct"] for r in rescored] == [c for *_, c in CASES]
    assert "boolq" in result.output and "math (avg)" in result.output


@pytest.mark.parametrize(
    "line,message",
    [
        ({"task": "gsm8k", "output": "7"}, "line 2 cannot be scored: it has no 'answer'"),
        ({"task": "nope", "output": "7", "answer": "7"}, "line 2 cannot be scored: Unknown task"),
        ({"task": "gsm8k", "output": "7", "answer": "seven"}, "could not convert"),
        ({"task": "boolq", "output": 1, "answer": "true"}, "'output' must be a string"),
    ],
)
def test_score_only_names_a_bad_line(tmp_path, line, message):
    path = tmp_path / "p.jsonl"
    good = {"task": "boolq", "output": "true", "answer": "true"}
    path.write_text(json.dumps(good) + "\n" + json.dumps(line) + "\n")
    result = runner.invoke(app, ["eval", "--score-only", str(path), "--out", str(tmp_path / "o")])
    assert result.exit_code == 1
    assert message in result.output and str(path) in result.output
    assert not (tmp_path / "o").exists()


def test_score_only_lines_without_a_task_take_the_one_named(tmp_path):
    path = tmp_path / "p.jsonl"
    rows = [{"output": "so 12", "answer": "12"}, {"output": "x", "answer": "3", "task": "SVAMP"}]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    args = ["eval", "--score-only", str(path), "--tasks", "gsm8k"]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    results = json.loads((tmp_path / "rescored" / "results.json").read_text())
    assert {t: (r["accuracy"], r["correct"], r["n"]) for t, r in results["tasks"].items()} == {
        "gsm8k": (1.0, 1, 1),
        "SVAMP": (0.0, 0, 1),
    }
    result = runner.invoke(app, ["eval", "--score-only", str(path), "--out", str(tmp_path / "o")])
    assert result.exit_code == 1 and "line 1 cannot be scored: it has no 'task'" in result.output


@pytest.mark.parametrize("correct,n", [(0, 5), (1, 2), (105, 500), (283, 500), (500, 500)])
def test_wilson_intervals_solve_the_score_equation(correct, n):
    """Each end of the 95 % Wilson interval is a p whose score statistic is 1.96:
    (p̂ − p)² = z² p (1 − p) / n, with p̂ between the ends."""
    low, high = wilson_interval(correct, n)
    p_hat, z = correct / n, 1.96
    assert low <= p_hat <= high
    for p in (low, high):
        assert (p_hat - p) ** 2 == pytest.approx(z * z * p * (1 - p) / n, abs=1e-12)
