"""s2ft installed as users install it: a wheel in a fresh virtualenv, not the editable
checkout. The bundled recipes ship inside the package; a recipe that needs files s2ft does
not ship says so and names the missing path; the paper recipes evaluate as the paper did."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

from typer.testing import CliRunner

from s2ft_cli.cli import _recipe_files, app
from s2ft_cli.engine.gguf_bases import PACKAGED_MODELS
from s2ft_cli.recipe import EvalSection, load_recipe

REPO = Path(__file__).resolve().parents[1]
# Generous: the machines that run the suite are small and shared.
TIMEOUT = 600


def _run(cmd: list, cwd: Path, env: dict) -> subprocess.CompletedProcess:
    result = subprocess.run(
        [str(c) for c in cmd], cwd=cwd, env=env, capture_output=True, text=True, timeout=TIMEOUT
    )
    assert result.returncode == 0, f"{cmd} failed:\n{result.stdout}\n{result.stderr}"
    return result


def _source_copy(dest: Path) -> Path:
    """The repository without its virtualenv, caches and build outputs: building there
    leaves the working tree untouched."""

    def ignore(folder: str, names: list[str]) -> set[str]:
        skip = {"runs", "build", "dist", "__pycache__"}
        return {n for n in names if n.startswith(".") or n in skip or n.endswith(".egg-info")}

    return Path(shutil.copytree(REPO, dest, ignore=ignore))


def test_the_wheel_installs_and_runs_the_quickstart_from_its_bundled_recipe(tmp_path):
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME")}
    env |= {"PIP_DISABLE_PIP_VERSION_CHECK": "1", "HF_HUB_OFFLINE": "1", "COLUMNS": "200"}
    src = _source_copy(tmp_path / "src")

    # Build the wheel with this environment's setuptools (dev extra): no download.
    wheels = tmp_path / "wheels"
    pip = [sys.executable, "-m", "pip"]
    _run(
        [*pip, "wheel", "--no-deps", "--no-build-isolation", "--no-index", "-w", wheels, src],
        tmp_path,
        env,
    )
    (wheel,) = wheels.glob("s2ft-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    modules = {p.relative_to(src).as_posix() for p in (src / "s2ft_cli").rglob("*.py")}
    assert modules - names == set(), "modules missing from the wheel (pyproject.toml packages)"
    recipes = {f"s2ft_cli/recipes/{p.name}" for p in (src / "recipes").glob("*.yaml")}
    assert "s2ft_cli/recipes/quickstart.yaml" in recipes and recipes <= names

    # A fresh virtualenv that sees the already-installed dependencies (torch, transformers,
    # ...) through a plain path .pth file: site does not run the .pth files inside that
    # folder, so the editable s2ft of this environment stays out.
    venv = tmp_path / "venv"
    _run([sys.executable, "-m", "venv", "--without-pip", venv], tmp_path, env)
    python = venv / "bin" / "python"
    site = _run(
        [python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"], tmp_path, env
    ).stdout.strip()
    deps = [p for p in sys.path if Path(p).name in ("site-packages", "dist-packages")]
    Path(site, "_s2ft_test_deps.pth").write_text("\n".join(deps) + "\n")
    install = [*pip, "--python", python, "install", "--no-deps", "--no-index"]
    _run([*install, "--ignore-installed", wheel], tmp_path, env)

    work = tmp_path / "work"
    work.mkdir()
    s2ft = venv / "bin" / "s2ft"
    listing = _run([s2ft, "recipes"], work, env).stdout
    assert "quickstart" in listing and "llama3-8b-math" in listing
    _run([s2ft, "init", "quickstart", "q.yaml"], work, env)
    assert (work / "q.yaml").read_text() == (src / "recipes" / "quickstart.yaml").read_text()
    _run(
        [s2ft, "train", "q.yaml", "train.max_steps=1", "data.train.limit=120", "output_dir=runs/q"],
        work,
        env,
    )
    assert (work / "runs" / "q" / "adapter" / "s2ft_adapter.safetensors").is_file()
    assert (work / "runs" / "q" / "adapter" / "s2ft_adapter.json").is_file()
    assert not list(venv.rglob("runs")), "a run wrote into the installed package"
    # the PEFT export, from the wheel
    _run([s2ft, "export", "runs/q", "--format", "peft", "--out", "p"], work, env)
    assert json.loads((work / "p" / "adapter_config.json").read_text())["peft_type"] == "LORA"
    _run([s2ft, "export", "runs/q", "--format", "gguf-lora", "--out", "l.gguf"], work, env)
    assert (work / "l.gguf").read_bytes()[:4] == b"GGUF"  # a llama.cpp LoRA of the packaged base
    # the package the venv imports is the wheel's
    where = "import s2ft_cli, s2ft_cli.recipes; print(s2ft_cli.__file__, s2ft_cli.recipes.__file__)"
    where = _run([python, "-c", where], work, env).stdout.split()
    assert all(Path(p).resolve().is_relative_to(venv.resolve()) for p in where), where


def test_recipes_that_need_outside_files_say_so_and_name_the_missing_path(tmp_path):
    runner = CliRunner()
    for name, path in _recipe_files().items():
        recipe = load_recipe(path)
        model = recipe.model.name_or_path
        local = (model.startswith("preset:") or model in PACKAGED_MODELS) and all(
            s is None or s.path.startswith("builtin:")
            for s in (*recipe.data.train_sources, recipe.data.validation)
        )
        header = "".join(line for line in path.read_text().splitlines() if line.startswith("#"))
        assert local or "Needs what s2ft does not ship" in header, name

    # A copy outside the repository: its relative model and data paths lead nowhere.
    copy = tmp_path / "mine" / "s.yaml"
    assert runner.invoke(app, ["init", "stories260k-math", str(copy)]).exit_code == 0
    model_dir = (copy.parent / "../../shared/models/stories260K").resolve()
    run = f"output_dir={tmp_path / 'run'}"
    result = runner.invoke(app, ["train", str(copy), run])
    assert result.exit_code == 1 and str(model_dir) in result.output
    data_file = load_recipe(copy).data.train.path
    result = runner.invoke(app, ["train", str(copy), run, "model.name_or_path=preset:tiny-llama"])
    assert result.exit_code == 1 and data_file in result.output


def test_paper_recipes_evaluate_with_the_official_protocol():
    """The official S²FT evaluation scripts decode with 4 beams and up to 256 new tokens,
    without sampling; s2ft eval's own default stays greedy."""
    paper = ["llama2-7b-math", "llama2-7b-commonsense", "llama3-8b-math", "llama3-8b-commonsense"]
    paper.append("llama3-70b-fsdp-nf4")  # the LLaMA-3 math setup on a 70B model
    for name in paper:
        path = _recipe_files()[name]
        ev = load_recipe(path).eval
        assert (ev.mode, ev.num_beams, ev.max_new_tokens, ev.do_sample) == (
            "generate",
            4,
            256,
            False,
        ), name
    assert EvalSection().num_beams == 1 and not EvalSection().do_sample
