"""The quickstart ends with a judgeable number: held-out generated problems (none of whose
operation and operands is ever trained on) scored for the base and the trained adapter."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from typer.testing import CliRunner

from s2ft_cli.cli import app
from s2ft_cli.data import load_records
from s2ft_cli.data.arithmetic import TEST_PERCENT, arithmetic_problems
from s2ft_cli.errors import S2FTError
from s2ft_cli.evaluation.report import wilson_interval
from s2ft_cli.evaluation.runner import adapter_names
from s2ft_cli.recipe import DataSource, load_recipe

from .conftest import QUICKSTART, SMOLLM2
from .test_eval import predictions

_WORK = re.compile(r"^(\d+) ([-+*]) (\d+) = (-?\d+)\. The answer is (-?\d+)\.$")
_OPS = {"+": lambda a, b: a + b, "-": lambda a, b: a - b, "*": lambda a, b: a * b}
runner = CliRunner()


def keys(records: list[dict]) -> set[tuple[str, int, int]]:
    """(operation, a, b) of each problem, read back from its worked answer (and checked)."""
    found = set()
    for r in records:
        a, op, b, result, answer = _WORK.match(r["output"]).groups()
        assert int(result) == int(answer) == int(r["answer"]) == _OPS[op](int(a), int(b))
        assert a in r["instruction"] and b in r["instruction"]
        found.add((op, int(a), int(b)))
    return found


def test_held_out_problems_never_share_operation_and_operands_with_training():
    train: set = set()
    test: set = set()
    for seed in range(12):
        for count in (1, 37, 400):
            train |= keys(arithmetic_problems(count, seed))
            test |= keys(arithmetic_problems(count, seed, split="test"))
    assert not train & test
    for op in _OPS:  # every operation has problems on both sides
        on_train = sum(k[0] == op for k in train)
        on_test = sum(k[0] == op for k in test)
        assert on_train and on_test
        assert 0.5 * TEST_PERCENT < 100 * on_test / (on_train + on_test) < 1.5 * TEST_PERCENT
    # the same seed gives the same problems; names and things vary within a split
    assert arithmetic_problems(50, 3, "test") == arithmetic_problems(50, 3, "test")
    assert len({r["instruction"].split()[0] for r in arithmetic_problems(50, 3, "test")}) > 3


def test_builtin_source_splits_and_refuses_other_splits():
    train = load_records(DataSource(path="builtin:arithmetic", limit=200))[1]
    test = load_records(DataSource(path="builtin:arithmetic", split="test", limit=200))[1]
    assert len(train) == len(test) == 200 and not keys(train) & keys(test)
    with pytest.raises(S2FTError, match="splits train and test"):
        load_records(DataSource(path="builtin:arithmetic", split="validation"))


def test_quickstart_recipe_evaluates_held_out_problems_with_the_base():
    recipe = load_recipe(QUICKSTART)
    assert recipe.data.train.path == "builtin:arithmetic" and recipe.data.train.split == "train"
    ev = recipe.eval
    assert ev.data_dir == "builtin:arithmetic"  # not resolved as a path
    assert ev.include_base and ev.limit and ev.limit >= 100
    assert ev.max_new_tokens <= 64


def test_eval_of_a_run_on_held_out_problems_has_a_base_row_and_an_adapter_row(
    smollm2_run, tmp_path
):
    """``s2ft eval RUN`` of a quickstart run (its eval section): the base row equals an
    evaluation of the base alone, the adapter row one of the adapter alone, and both are
    scored on the same held-out problems, with Wilson intervals."""
    run, short = smollm2_run, ["eval.limit=6", "eval.max_new_tokens=8"]
    result = runner.invoke(app, ["eval", str(run), *short, "--out", tmp_path / "eval"])
    assert result.exit_code == 0, result.output
    assert (
        "accuracy % (95% confidence interval) by adapter" in result.output
    )  # the comparison table
    rows = {}
    for name in ("base", run.name):
        results = json.loads((tmp_path / "eval" / name / "results.json").read_text())
        arithmetic = results["tasks"]["arithmetic"]
        assert arithmetic["n"] == 6
        assert arithmetic["ci95"] == list(wilson_interval(arithmetic["correct"], 6))
        assert results["settings"]["adapter"] == (
            "none" if name == "base" else str(run / "adapter")
        )
        rows[name] = predictions(tmp_path / "eval" / name)
        assert {r["task"] for r in rows[name]} == {"arithmetic"}
    held_out = arithmetic_problems(6, split="test")
    for name in rows:
        assert [r["answer"] for r in rows[name]] == [r["answer"] for r in held_out]

    # the adapter alone (--no-base overrides the recipe), and the base model alone
    result = runner.invoke(app, ["eval", str(run), *short, "--no-base", "--out", tmp_path / "a"])
    assert result.exit_code == 0, result.output
    assert [r["output"] for r in predictions(tmp_path / "a")] == [
        r["output"] for r in rows[run.name]
    ]
    base = ["--model", SMOLLM2, "--data-dir", "builtin:arithmetic", "--limit", "6"]
    base += ["--max-new-tokens", "8", "--prompt-template", "chat", "--out", str(tmp_path / "b")]
    result = runner.invoke(app, ["eval", *base])
    assert result.exit_code == 0, result.output
    assert [r["output"] for r in predictions(tmp_path / "b")] == [r["output"] for r in rows["base"]]
    assert rows["base"] != rows[run.name]


def test_an_adapter_called_base_keeps_its_results_apart():
    names = adapter_names([Path("runs/base/adapter"), Path("x/base")], ("base",))
    assert names == ["base-2", "base-3"]
