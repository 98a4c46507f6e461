"""The ``s2ft`` command line."""

from __future__ import annotations

import json
import subprocess
import sys

from typer.testing import CliRunner

from s2ft_cli import Selection
from s2ft_cli.cli import app
from s2ft_cli.engine.models import load_model
from s2ft_cli.engine.permute import plan_layout
from s2ft_cli.engine.selection import select_units
from s2ft_cli.recipe import load_recipe

from .conftest import QUICKSTART, STORIES

runner = CliRunner()


def s2ft(*args):
    return subprocess.run(
        [sys.executable, "-m", "s2ft_cli.cli", *map(str, args)], capture_output=True, text=True
    )


def test_select_prints_the_table_and_writes_the_library_selection(tmp_path):
    result = runner.invoke(
        app, ["select", str(QUICKSTART), "s2ft.seed=5", "--json", str(tmp_path / "sel.json")]
    )
    assert result.exit_code == 0, result.output
    assert "down_proj" in result.output and "trainable parameters:" in result.output
    written = Selection.from_json((tmp_path / "sel.json").read_text())
    recipe = load_recipe(QUICKSTART, ["s2ft.seed=5"])
    model = load_model(recipe.model.name_or_path)
    expected = plan_layout(select_units(model, recipe.s2ft))[1]
    assert written.units == expected.units
    total = json.loads((tmp_path / "sel.json").read_text())["trainable_params"]
    assert f"{total:,}" in result.output


def test_select_on_the_real_checkpoint(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text(
        f"model: {{name_or_path: {STORIES}}}\n"
        "s2ft: {targets: {v_proj: 0.25, o_proj: 0.2}, allocation: per_layer}\n"
    )
    result = runner.invoke(app, ["select", str(recipe)])
    assert result.exit_code == 0, result.output
    assert result.output.count("v_proj") == 5 and "of 260,032" in result.output


def test_bad_recipe_key_names_it_without_traceback(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text(
        "model: {name_or_path: preset:tiny-llama}\n"
        "s2ft: {targets: {o_proj: 0.2}, alocation: global}\n"
    )
    result = s2ft("select", recipe)
    assert result.returncode == 1
    assert "unknown key 's2ft.alocation'. Did you mean 's2ft.allocation'?" in result.stderr
    assert "Traceback" not in result.stderr
    debug = s2ft("--debug", "select", recipe)
    assert debug.returncode != 0 and "Traceback" in debug.stderr


def test_bad_value_and_missing_recipe(tmp_path):
    result = s2ft("select", QUICKSTART, "s2ft.targets.o_proj=2")
    assert result.returncode == 1 and "must be in (0, 1]" in result.stderr
    result = s2ft("select", tmp_path / "nope.yaml")
    assert result.returncode == 1 and "does not exist" in result.stderr
    result = s2ft("select", QUICKSTART, "s2ft.seed")
    assert result.returncode == 1 and "is not key=value" in result.stderr


def test_help_listings_and_recipe_mistakes_answer_without_loading_torch(tmp_path):
    """The command line imports torch and transformers (2-3 s) only once a recipe is
    valid: --help, recipes, models, init and a recipe's mistakes answer without them."""
    commands = [
        ["--help"],
        ["recipes"],
        ["models"],
        ["init", "quickstart", str(tmp_path / "q.yaml")],
        ["select", str(QUICKSTART), "s2ft.targets.o_proj=2"],
        ["train", str(QUICKSTART), "train.scheduler=cosinee"],
        ["train", str(QUICKSTART), "eval.tasks=[gsm9k]"],
        ["data", str(QUICKSTART), "data.max_seq_len=0"],
        ["plan", str(tmp_path / "nope.yaml")],
        ["eval", "--score-only", str(tmp_path / "nope.jsonl")],
    ]
    script = (
        "import sys, json; from s2ft_cli.cli import app\n"
        "try:\n    app(json.loads(sys.argv[1]))\nexcept SystemExit as stop:\n    code = stop.code\n"
        "heavy = sorted({'torch', 'transformers'} & set(sys.modules))\n"
        "print(json.dumps([code, heavy]), file=sys.stderr)\n"
    )
    for args in commands:
        result = subprocess.run(
            [sys.executable, "-c", script, json.dumps(args)], capture_output=True, text=True
        )
        code, heavy = json.loads(result.stderr.splitlines()[-1])
        assert heavy == [], (args, heavy)
        assert code == (0 if args[0] in ("--help", "recipes", "models", "init") else 1), (
            args,
            result,
        )


def test_models_lists_every_family_with_its_roles():
    """The rows (data) name each family's roles and places; the table shows every family
    (its cells wrap with the terminal's width, so the rendering is checked by name)."""
    from s2ft_cli.engine.families import FAMILIES, family_rows

    result = runner.invoke(app, ["models"])
    assert result.exit_code == 0, result.output
    assert all(name in result.output for name in FAMILIES)
    rows = {row["model type"]: " ".join(row.values()) for row in family_rows()}
    assert set(rows) == set(FAMILIES)
    assert "q, k, v, o, up, down" in rows["gpt2"] and "attn.c_attn (q|k|v" in rows["gpt2"]
    assert "q, k, v, o, gate, up, down" in rows["qwen3_moe"]
    assert "mlp.experts.gate_up_proj (gate|up, per expert" in rows["qwen3_moe"]


def test_unsupported_model_fails_cleanly(tmp_path):
    from transformers import OPTConfig

    OPTConfig(num_hidden_layers=1, hidden_size=16, num_attention_heads=2).save_pretrained(
        tmp_path / "opt"
    )
    recipe = tmp_path / "r.yaml"
    recipe.write_text("model: {name_or_path: ./opt}\ns2ft: {targets: {o_proj: 0.5}}\n")
    result = s2ft("select", recipe)
    assert result.returncode == 1 and "'opt' is not supported" in result.stderr
    assert "s2ft models" in result.stderr
    assert "Traceback" not in result.stderr


def test_combine_is_listed_and_merge_is_its_hidden_old_name(tmp_path):
    """`s2ft combine` writes the combined adapter; `s2ft merge` (kept for one release) is
    missing from --help, says it was renamed and writes the same adapter."""
    import torch

    from s2ft_cli.adapter.format import Adapter

    from .conftest import tiny_model
    from .test_serving import random_adapter

    sources = []
    for seed in (1, 2):
        random_adapter(tiny_model("llama-gqa-bias"), tmp_path / f"a{seed}", {"o_proj": 0.5}, seed)
        sources.append(str(tmp_path / f"a{seed}"))

    listed = runner.invoke(app, ["--help"])
    assert listed.exit_code == 0, listed.output
    commands = [line.split()[1] for line in listed.output.splitlines() if line.startswith("│ ")]
    assert "combine" in commands and "merge" not in commands, commands

    new = runner.invoke(app, ["combine", *sources, "--out", str(tmp_path / "new")])
    old = runner.invoke(app, ["merge", *sources, "--out", str(tmp_path / "old")])
    assert new.exit_code == 0 and old.exit_code == 0, new.output + old.output
    assert "is now `s2ft combine`" not in " ".join(new.output.split())
    assert "`s2ft merge` is now `s2ft combine`" in " ".join(old.output.split())
    a, b = Adapter.load(tmp_path / "new"), Adapter.load(tmp_path / "old")
    assert a.updates.keys() == b.updates.keys() and a.updates
    for name, u in a.updates.items():
        assert torch.equal(u.index, b.updates[name].index), name
        assert torch.equal(u.delta, b.updates[name].delta), name


def test_eval_options_are_the_recipe_eval_section():
    """One source of names, help and defaults: every field of EvalSection is an option of
    s2ft eval with its description as help, and s2ft eval has no other settings."""
    import typer.main

    from s2ft_cli.cli import EVAL_FLAGS
    from s2ft_cli.recipe import EvalSection

    command = typer.main.get_command(app).commands["eval"]
    options = {p.name: p for p in command.params if p.param_type_name == "option"}
    assert set(options) - {"model", "score_only", "help"} == set(EvalSection.model_fields)
    for name, field in EvalSection.model_fields.items():
        assert field.description in options[name].help, name
        assert (
            EVAL_FLAGS.get(name, "--" + name.replace("_", "-")).split("/")[0] in options[name].opts
        )
