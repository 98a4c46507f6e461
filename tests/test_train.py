"""`s2ft train`: the loss falls, runs resume exactly after SIGKILL, torchrun matches one
process, and user errors are one clear paragraph."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from typer.testing import CliRunner

from s2ft_cli import load_adapter
from s2ft_cli.cli import app
from s2ft_cli.data import load_datasets
from s2ft_cli.engine.models import load_model, load_tokenizer
from s2ft_cli.errors import S2FTError
from s2ft_cli.recipe import load_recipe
from s2ft_cli.training.methods import TrainingMethod
from s2ft_cli.training.trainer import Trainer, token_loss_sums, train

from .torchrun import torchrun

REPO = Path(__file__).resolve().parents[1]
RECIPE = """\
model: {name_or_path: "preset:tiny-llama"}
data:
  train: {path: "builtin:arithmetic", limit: 112}
  val_size: 16
  max_seq_len: 256
s2ft: {targets: {o_proj: 0.25, down_proj: 0.1}, seed: 1}
train:
  max_steps: 12
  batch_size: 8
  lr: 3.0e-2
  warmup_steps: 2
  eval_every: 6
  save_every: 4
  log_every: 2
output_dir: run
"""


def recipe_file(tmp_path: Path, text: str = RECIPE) -> Path:
    path = tmp_path / "recipe.yaml"
    path.write_text(text)
    return path


def s2ft(*args, timeout=240, env=None):
    return subprocess.run(
        [sys.executable, "-m", "s2ft_cli", *map(str, args)],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=env,
    )


def cli(*args):
    """``s2ft ARGS`` in this process: for what the command does, where the process it runs in
    is not what a test is about (a subprocess costs seconds of imports)."""
    return CliRunner().invoke(app, [str(a) for a in args])


def metrics(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def max_diff(a: Path, b: Path) -> float:
    ta, tb = load_file(a / "s2ft_adapter.safetensors"), load_file(b / "s2ft_adapter.safetensors")
    assert ta.keys() == tb.keys()
    return max((ta[k].double() - tb[k].double()).abs().max().item() for k in ta)


def test_loss_falls_and_the_adapter_reproduces_the_trained_model(tmp_path):
    recipe = load_recipe(recipe_file(tmp_path))
    last = train(recipe)
    run = tmp_path / "run"
    rows = metrics(run)
    assert [r["step"] for r in rows] == [0, 2, 4, 6, 8, 10, 12]
    assert rows[0].keys() == {"step", "eval_loss"}  # before the first step
    assert all({"loss", "lr", "tokens_per_s"} <= r.keys() for r in rows[1:])
    assert [r["step"] for r in rows if "eval_loss" in r] == [0, 6, 12]
    assert rows[-1]["eval_loss"] < 0.7 * rows[0]["eval_loss"]
    assert rows[-1]["loss"] < 0.7 * rows[1]["loss"]
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == [
        "step-0000008",
        "step-0000012",
    ]
    assert (run / "recipe.yaml").is_file() and (run / "selection.json").is_file()

    # the adapter on a fresh base gives the trained model's validation loss
    tokenizer = load_tokenizer("preset:tiny-llama")
    _, val, _ = load_datasets(recipe.data, recipe.train.seed, tokenizer)
    base = load_adapter(load_model("preset:tiny-llama", seed=recipe.train.seed), run / "adapter")
    total, count = token_loss_sums(base, val, tokenizer.pad_token_id, 8)
    assert abs(total / count - last["eval_loss"]) <= 1e-5 * last["eval_loss"]


def test_resume_after_sigkill_ends_with_the_same_adapter(tmp_path):
    text = RECIPE.replace("max_steps: 12", "max_steps: 40").replace("limit: 112", "limit: 400")
    path = recipe_file(tmp_path, text)
    train(load_recipe(path, [f"output_dir={tmp_path / 'straight'}"]))

    proc = subprocess.Popen(
        [sys.executable, "-m", "s2ft_cli", "train", str(path)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    marker = tmp_path / "run" / "checkpoints" / "step-0000008" / "meta.json"
    deadline = time.monotonic() + 180
    while not marker.exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.005)
    assert proc.poll() is None, "the run ended before it could be killed"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    done = json.loads(marker.read_text())["step"]
    assert done == 8 and not (tmp_path / "run" / "adapter").exists()

    result = cli("train", path, "--resume")
    assert result.exit_code == 0, result.output
    assert max_diff(tmp_path / "run" / "adapter", tmp_path / "straight" / "adapter") <= 1e-5
    steps = [r["step"] for r in metrics(tmp_path / "run")]
    assert steps == sorted(set(steps)) and steps[-1] == 40  # no step logged twice


def test_malformed_record_stops_before_training(tmp_path):
    records = [{"instruction": "q", "output": "a"}] * 5 + [{"instruction": "q"}]
    (tmp_path / "data.json").write_text(json.dumps(records))
    data = f"data.train.path={tmp_path / 'data.json'}"
    result = cli("train", recipe_file(tmp_path), data, "data.val_size=0")
    assert result.exit_code == 1 and isinstance(result.exception, SystemExit)  # no traceback
    assert "data.json: record 6 is malformed: it has no 'output' field" in result.output
    assert not (tmp_path / "run").exists()


def test_resume_without_checkpoint_and_rerun_into_a_run_are_refused(tmp_path):
    path = recipe_file(tmp_path)
    result = cli("train", path, "--resume")
    assert result.exit_code == 1 and "no checkpoint" in result.output
    train(load_recipe(path, ["train.max_steps=4"]))
    result = cli("train", path)
    assert result.exit_code == 1 and "already holds checkpoints" in result.output


def test_bundled_recipes_are_valid_and_init_copies_them(tmp_path):
    from s2ft_cli.cli import _recipe_files

    names = set(_recipe_files())
    assert {
        "quickstart",
        "llama2-7b-commonsense",
        "llama2-7b-math",
        "llama3-8b-commonsense",
        "llama3-8b-math",
        "stories260k-math",
    } <= names
    for path in _recipe_files().values():
        recipe = load_recipe(path)
        assert recipe.data is not None
    paper = load_recipe(REPO / "recipes" / "llama3-8b-math.yaml")
    assert paper.s2ft.targets == {"o_proj": 0.052, "down_proj": 0.03}
    assert (paper.train.lr, paper.train.epochs, paper.train.batch_size) == (1e-3, 3, 16)
    assert paper.model.gradient_checkpointing and paper.model.dtype == "bfloat16"
    listing = s2ft("recipes")
    assert listing.returncode == 0 and "stories260k-math" in listing.stdout
    assert s2ft("init", "quickstart", tmp_path / "mine.yaml").returncode == 0
    assert (tmp_path / "mine.yaml").read_text() == (
        REPO / "recipes" / "quickstart.yaml"
    ).read_text()
    again = s2ft("init", "quickstart", tmp_path / "mine.yaml")
    assert again.returncode == 1 and "already exists" in again.stderr


@pytest.mark.parametrize("warmup,total", [(2, 6), (0, 9), (5, 40), (3, 4)])
def test_a_recipe_takes_the_schedules_that_run_on_warmup_and_total_steps(tmp_path, warmup, total):
    """train.scheduler: every name a recipe accepts is a transformers schedule, and the
    loop's (``training/schedules.py``) gives transformers' learning rate at every step (and
    past the end); the others (a metric to step on, or arguments a recipe has no key for)
    are refused by the recipe, before any model loads."""
    from typing import get_args

    from transformers import SchedulerType, get_scheduler

    from s2ft_cli.recipe import Scheduler
    from s2ft_cli.training.schedules import schedule

    accepted = set(get_args(Scheduler))
    assert accepted < {s.value for s in SchedulerType}
    for name in accepted:
        ours, theirs = (
            torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))], lr=1e-3) for _ in range(2)
        )
        stepped = (
            schedule(name, ours, warmup, total),
            get_scheduler(name, theirs, num_warmup_steps=warmup, num_training_steps=total),
        )
        for step in range(total + 3):
            assert ours.param_groups[0]["lr"] == theirs.param_groups[0]["lr"], (name, step)
            for optimizer, scheduler in zip((ours, theirs), stepped, strict=True):
                optimizer.step()
                scheduler.step()
    for name in {s.value for s in SchedulerType} - accepted:
        with pytest.raises(S2FTError, match=f"train.scheduler: .*got '{name}'"):
            load_recipe(recipe_file(tmp_path), [f"train.scheduler={name}"])


def test_paths_resolve_against_the_recipe_or_the_current_folder(tmp_path, monkeypatch):
    (tmp_path / "sub").mkdir()
    path = recipe_file(tmp_path / "sub", RECIPE.replace('"builtin:arithmetic"', "d.json"))
    monkeypatch.chdir(tmp_path)
    recipe = load_recipe(path)
    assert recipe.output_dir == str(tmp_path / "sub" / "run")
    assert recipe.data.train.path == str(tmp_path / "sub" / "d.json")
    recipe = load_recipe(path, ["output_dir=out", "data.train.path=e.json"])
    assert recipe.output_dir == str(tmp_path / "out")
    assert recipe.data.train.path == str(tmp_path / "e.json")
    assert load_recipe(path, ["data.train=f.json"]).data.train.path == str(tmp_path / "f.json")


def test_torchrun_processes_train_the_selection_rank_0_measured(tmp_path):
    """Rank 0 measures the selection on the whole weights, before FSDP shards them, and
    every process trains it (DDP shares it the same way: ``Processes.on_main``)."""
    path = recipe_file(
        tmp_path,
        RECIPE.replace("max_steps: 12", "max_steps: 2").replace(
            "seed: 1}", "seed: 1, strategy: gradient, calibration: {samples: 16}}"
        ),
    )
    train(load_recipe(path, [f"output_dir={tmp_path / 'single'}", "train.batch_size=8"]))
    result = torchrun("train", path, f"output_dir={tmp_path / 'fsdp'}", "train.batch_size=4",
                      "train.distributed=fsdp")  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    single = json.loads((tmp_path / "single" / "selection.json").read_text())["units"]
    assert json.loads((tmp_path / "fsdp" / "selection.json").read_text())["units"] == single
    assert max_diff(tmp_path / "fsdp" / "adapter", tmp_path / "single" / "adapter") <= 1e-4


def test_same_recipe_and_seed_give_byte_identical_adapters_on_cpu(tmp_path):
    path = recipe_file(tmp_path)
    for name in ("first", "second"):
        train(load_recipe(path, [f"output_dir={tmp_path / name}"]))
    for file in ("s2ft_adapter.safetensors", "s2ft_adapter.json"):
        first = (tmp_path / "first" / "adapter" / file).read_bytes()
        assert first == (tmp_path / "second" / "adapter" / file).read_bytes(), file


def test_data_seed_keeps_the_examples_while_train_seed_varies(tmp_path):
    """``data.seed`` draws the generated records and the validation split, so that
    ``train.seed`` varies only the order and initialisation (a study's seeds over one
    split); unset, the data follow ``train.seed``."""
    path = recipe_file(tmp_path)

    def examples(*overrides: str) -> list[list]:
        out = f"output_dir={tmp_path / '-'.join(overrides)}"
        trainer = Trainer(load_recipe(path, [*overrides, out]))
        try:
            trainer.setup()
        finally:
            trainer.cleanup()
        return [[e.input_ids for e in part] for part in (trainer.train_examples, trainer.val_set)]

    first = examples("train.seed=0")
    assert examples("train.seed=1", "data.seed=0") == first
    assert examples("train.seed=0", "data.seed=1") == examples("train.seed=1")
    assert examples("train.seed=1")[1] != first[1]


def test_report_to_tensorboard_writes_the_metrics_jsonl_values(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    path = recipe_file(tmp_path)
    train(load_recipe(path, ["train.max_steps=4", "train.report_to=[tensorboard]"]))
    run = tmp_path / "run"
    events = EventAccumulator(str(run / "tensorboard"))
    events.Reload()
    logged: dict[tuple[str, int], float] = {}
    for tag in events.Tags()["scalars"]:
        for event in events.Scalars(tag):
            logged[tag, event.step] = event.value
    expected = {(k, r["step"]): v for r in metrics(run) for k, v in r.items() if k != "step"}
    assert logged.keys() == expected.keys()
    assert ("eval_loss", 0) in logged and ("loss", 4) in logged
    for key, value in expected.items():  # event files hold float32
        assert abs(logged[key] - value) <= 1e-6 * max(1.0, abs(value)), key


def test_report_to_tensorboard_without_the_package_is_one_message(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)  # import fails
    path = recipe_file(tmp_path)
    with pytest.raises(S2FTError, match="pip install tensorboard"):
        train(load_recipe(path, ["train.report_to=[tensorboard]"]))
    assert not (tmp_path / "run").exists()  # refused before anything was written


def test_a_step_makes_one_all_reduce_and_counts_tokens_on_the_cpu(tmp_path, monkeypatch):
    """Target and token counts come from the examples at collate time; the loss sum and
    the stop requests travel in one all-reduce per step (evaluations add their own)."""
    from s2ft_cli.training.distributed import Processes

    calls, real = [], Processes.all_sum

    def counted(self, *values):
        calls.append(len(values))
        return real(self, *values)

    real_step, tokens = Trainer.train_step, []

    def step_and_count(self, step):
        loss, n = real_step(self, step)
        masks = [self._micro_batch(step, m)["attention_mask"] for m in range(2)]
        tokens.append((n, sum(int(mask.sum()) for mask in masks)))  # counted vs collated
        return loss, n

    monkeypatch.setattr(Processes, "all_sum", counted)
    monkeypatch.setattr(Trainer, "train_step", step_and_count)
    path = recipe_file(tmp_path)
    train(load_recipe(path, ["train.max_steps=4", "train.eval_every=0", "train.grad_accum=2"]))
    assert calls == [2] + [3] * 4 + [2]  # eval at step 0, 4 steps, eval at the end
    assert len(tokens) == 4 and all(n == collated for n, collated in tokens)


def test_a_resumed_run_drops_the_tensorboard_scalars_logged_after_its_checkpoint(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    path = recipe_file(tmp_path)  # a checkpoint every 4 steps, a metrics line every 2
    overrides = ["train.max_steps=8", "train.report_to=[tensorboard]"]
    train(load_recipe(path, overrides))
    run = tmp_path / "run"
    shutil.rmtree(run / "checkpoints" / "step-0000008")  # as if killed after step 8's log
    shutil.rmtree(run / "adapter")
    train(load_recipe(path, overrides), resume=True)
    events = EventAccumulator(str(run / "tensorboard"))
    events.Reload()
    steps = [e.step for e in events.Scalars("loss")]
    assert steps == [2, 4, 6, 8]  # steps 6 and 8 once, from the resumed run
    values = {e.step: e.value for e in events.Scalars("loss")}
    for row in metrics(run)[1:]:
        assert abs(values[row["step"]] - row["loss"]) <= 1e-6 * max(1.0, row["loss"])


class TrainNorms(TrainingMethod):
    """Another set of trainable parameters: the RMSNorm weights of every layer."""

    def prepare(self, model, trainer):
        for name, p in model.named_parameters():
            p.requires_grad_(name.endswith("layernorm.weight"))
        return model

    def checkpoint_meta(self, model):
        return {"trains": "norms"}

    def save(self, model, out, trainer):
        model.save_pretrained(out / "model")
        return "saved"


def test_another_method_trains_through_the_same_loop_and_resumes_exactly(tmp_path):
    """The loop is the method's: only its parameters move, on the given examples, and its
    checkpoints continue exactly (what the benchmarks' baselines rely on)."""
    path = recipe_file(tmp_path)
    recipe = load_recipe(path, ["train.max_steps=8"])
    tokenizer = load_tokenizer(recipe.model.name_or_path)
    datasets = load_datasets(recipe.data, recipe.train.seed, tokenizer)

    def run(out: str, resume: bool = False, steps: int = 8) -> Trainer:
        r = load_recipe(path, [f"train.max_steps={steps}", f"output_dir={tmp_path / out}"])
        trainer = Trainer(r, resume=resume, method=TrainNorms(), datasets=datasets)
        try:
            trainer.setup()
            trainer.train()
        finally:
            trainer.cleanup()
        return trainer

    straight = run("straight")
    base = load_model(recipe.model.name_or_path, seed=recipe.train.seed).state_dict()
    trained = straight.model.state_dict()
    moved = {n for n in base if not torch.equal(base[n], trained[n])}
    assert moved == {n for n in base if n.endswith("layernorm.weight")}
    assert (tmp_path / "straight" / "model" / "config.json").is_file()
    assert not (tmp_path / "straight" / "selection.json").exists()
    meta = json.loads((tmp_path / "straight/checkpoints/step-0000008/meta.json").read_text())
    assert meta["trains"] == "norms" and "selection" not in meta

    run("halves", steps=8)  # the same schedule, killed after step 4's checkpoint:
    shutil.rmtree(tmp_path / "halves" / "checkpoints" / "step-0000008")
    resumed = run("halves", resume=True).model.state_dict()
    assert all(torch.equal(resumed[n], trained[n]) for n in moved)
