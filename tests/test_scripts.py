"""The benchmark scripts run end to end on a tiny model (their figures come from bigger runs)."""

from __future__ import annotations

import gzip
import json
import random
import statistics
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

from s2ft_cli import S2FTConfig
from s2ft_cli.engine.models import load_model
from s2ft_cli.engine.selection import select_units

from .conftest import STORIES, smollm2_in_small

SCRIPTS = Path(__file__).resolve().parents[1] / "scripts"
TARGETS = {"o_proj": 0.25, "down_proj": 0.1}  # the benchmark's S²FT on the tiny model


def bench_train(out: Path, *args: str) -> dict:
    """``scripts/bench_train.py`` on the tiny model, one 1 × 32 shape; its one config."""
    cmd = [sys.executable, str(SCRIPTS / "bench_train.py"), "--model", "preset:tiny-llama"]
    cmd += ["--shapes", "1x32", "--warmup", "0", "--threads", "1"]
    cmd += ["--targets", json.dumps(TARGETS), "--json", str(out), *args]
    subprocess.run(cmd, check=True, capture_output=True, timeout=600)
    (config,) = json.loads(out.read_text())["configs"]
    return config


def test_bench_train_measures_every_method(tmp_path):
    """The methods through s2ft's loop; ``--interleave``: the time ratios are the medians of
    per-step ratios from one process; ``--loop plain``: the model's own loss for ``labels=``
    (what Hugging Face's Trainer computes) trains a converted model with s2ft's loss."""
    # LoRA: test_experiment_quality_smoke_...; the floor with transformers' loss is the lean
    # floor's method (baselines.Floor) with the loss the full fine-tuning here computes
    methods = "s2ft,full,lean-floor"
    config = bench_train(
        tmp_path / "bench.json", "--steps", "2", "--interleave", "--methods", methods
    )
    results = config["rounds"][0]["results"]
    model = load_model("preset:tiny-llama")
    assert results["full"]["trainable"] == sum(p.numel() for p in model.parameters())
    assert results["lean-floor"]["trainable"] == 0
    selection = select_units(model, S2FTConfig(targets=TARGETS))
    assert results["s2ft"]["trainable"] == selection.trainable_params()
    assert all(r["forward_s"] > 0 for r in results.values())
    ratio = config["median_ratios"]["s2ft/full"]
    assert ratio["memory"] == results["s2ft"]["peak_bytes"] / results["full"]["peak_bytes"]
    times = config["interleaved_step_times"]
    assert {len(t) for t in times.values()} == {2} and set(times) == set(results)
    per_step = statistics.median(a / b for a, b in zip(times["s2ft"], times["full"], strict=True))
    assert ratio["time"] == per_step

    plain = bench_train(
        tmp_path / "plain.json", "--steps", "2", "--methods", "s2ft", "--loop", "plain"
    )
    loss = plain["rounds"][0]["results"]["s2ft"]["loss"]
    assert loss == pytest.approx(results["s2ft"]["loss"], rel=1e-5)


def test_bench_fsdp_measures_every_process_beside_the_plan(tmp_path):
    """``scripts/bench_fsdp.py`` on the tiny model: one nf4 process, and FSDP2 + nf4 under
    torchrun, each process's step time and peak beside ``s2ft plan``'s prediction."""
    out = tmp_path / "fsdp.json"
    cmd = [sys.executable, str(SCRIPTS / "bench_fsdp.py"), "--model", "preset:tiny-llama"]
    cmd += ["--targets", json.dumps(TARGETS), "--shapes", "1x16", "--steps", "1"]
    cmd += ["--warmup", "0", "--configs", "nf4,fsdp-nf4", "--json", str(out)]
    subprocess.run(cmd, check=True, capture_output=True, timeout=600)
    records = {r["config"]: r for r in json.loads(out.read_text())["records"]}
    assert [len(records[c]["ranks"]) for c in ("nf4", "fsdp-nf4")] == [1, 2]
    for record in records.values():
        assert all(r["step_s"] > 0 and r["peak_bytes"] > 0 for r in record["ranks"])
        assert all(r["planned_bytes"] > 0 for r in record["ranks"])


def test_experiment_forgetting_records_every_run(tmp_path):
    cmd = [sys.executable, str(SCRIPTS / "experiment_forgetting.py"), "--steps", "1"]
    cmd += ["--batch", "2", "--rates", "2", "--val", "4", "--held-out", "4"]
    cmd += ["--stories", "2", "--story-tokens", "8"]
    cmd += ["--threads", "1", "--out", str(tmp_path)]
    subprocess.run(cmd, check=True, capture_output=True, timeout=600)

    results = json.loads((tmp_path / "results" / "forgetting.json").read_text())
    stories = json.loads((tmp_path / "results" / "forgetting_stories.json").read_text())
    assert [len(s["ids"]) for s in stories["stories"]] == [1 + 8, 1 + 8]
    assert (tmp_path / "forgetting.png").stat().st_size > 0
    runs = {(r["method"], r["budget_name"]): r for r in results["runs"]}
    assert set(runs) == {
        *((m, b) for m in ("s2ft", "lora") for b in ("small", "medium", "large")),
        ("full", "medium"),
        ("full", "large"),
    }
    assert {len(sweep) for sweep in results["sweeps"].values()} == {2}  # --rates 2
    for method, sweep in results["sweeps"].items():
        best = min(sweep, key=lambda r: r["val_loss"])
        assert runs[method, "medium"]["lr"] == best["lr"] == runs[method, "large"]["lr"]
    model = load_model(str(STORIES))
    small = select_units(model, S2FTConfig(targets=runs["s2ft", "small"]["budget"]))
    assert runs["s2ft", "small"]["trainable"] == small.trainable_params()
    assert runs["full", "large"]["trainable"] == sum(p.numel() for p in model.parameters())
    assert all(r["drift"] > 0 for r in results["runs"])


def test_bench_loglik_times_both_readings_and_checks_they_agree(tmp_path):
    """``scripts/bench_loglik.py`` on stories260K: both readings timed, the same answers and
    log-likelihoods within 1e-4 (the script asserts it), written to its JSON."""
    out = tmp_path / "loglik.json"
    cmd = [sys.executable, str(SCRIPTS / "bench_loglik.py"), "--model", str(STORIES)]
    cmd += ["--prompt-template", "alpaca", "--tasks", "boolq,ARC-Easy", "--limit", "6"]
    cmd += ["--rounds", "1", "--batch-size", "4", "--threads", "1", "--json", str(out)]
    subprocess.run(cmd, check=True, capture_output=True, timeout=600)
    rows = json.loads(out.read_text())["tasks"]
    assert [r["task"] for r in rows] == ["boolq", "ARC-Easy"]
    for row in rows:
        assert row["same_answers"] == row["records"] == 6 and row["max_abs_diff"] <= 1e-4
        assert len(row["whole_per_s"]) == len(row["shared_per_s"]) == 1
        assert row["ratio"] == row["shared_per_s"][0] / row["whole_per_s"][0]


def test_bench_generate_times_both_loops_and_checks_they_agree(tmp_path):
    """``scripts/bench_generate.py`` on stories260K: the own loop and ``generate`` timed
    on the same prompts, no output differing (the script asserts it), written to its JSON."""
    out = tmp_path / "generate.json"
    cmd = [sys.executable, str(SCRIPTS / "bench_generate.py"), "--model", str(STORIES)]
    cmd += ["--prompt-template", "alpaca", "--tasks", "ARC-Easy", "--limit", "6"]
    cmd += ["--rounds", "1", "--batch-size", "4", "--max-new-tokens", "8", "--threads", "1"]
    subprocess.run([*cmd, "--json", str(out)], check=True, capture_output=True, timeout=600)
    (row,) = json.loads(out.read_text())["tasks"]
    assert row["task"] == "ARC-Easy" and row["outputs_differing"] == 0
    assert row["ratio"] == row["own_loop_per_s"][0] / row["generate_per_s"][0]


def test_experiment_quality_smoke_runs_every_stage_and_resumes(smollm2_tokenizer, tmp_path):
    """``scripts/experiment_quality.py --smoke`` on one regime and one method (matched
    LoRA: the study's own baseline; S²FT's training and merge are tested throughout): the
    grid picks the rate by validation loss (grown past its edge), the final run (seed 0:
    the grid's trained weights, not trained again) records both regimes' test sets, the
    prose loss and the cost, the base model is scored, the tables and the plot are written,
    and a second invocation finds every job done. On a two-layer model of SmolLM2's
    architecture with its tokenizer and chat template (the study's data and prompts; the
    real model's weights would only slow the stages down)."""
    model = tmp_path / "smollm2-small"
    small = smollm2_in_small(smollm2_tokenizer)
    small.save_pretrained(model)
    smollm2_tokenizer.save_pretrained(model)
    out = tmp_path / "quality.json"
    cmd = [sys.executable, str(SCRIPTS / "experiment_quality.py"), "--smoke", "--out", str(out)]
    cmd += ["--regimes", "commonsense", "--methods", "lora-matched", "--threads", "1"]
    cmd += ["--model", str(model)]
    first = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert first.returncode == 0, first.stderr[-3000:]
    jobs = json.loads(out.read_text())["jobs"]
    grid = {name: r for name, r in jobs.items() if name.startswith("grid/")}
    assert all(r["steps"] == 1 and r["val_loss"] > 0 for r in grid.values())
    final = jobs["final/commonsense/lora-matched/0"]
    rates = {r["lr"]: r["val_loss"] for r in grid.values()}
    assert final["lr"] == min(sorted(rates), key=rates.get)  # a tie: the lowest rate
    # two planned rates, so the best is at an edge: the grid grew past it, until the best
    # was inside or twice
    assert len(grid) == 4 or min(rates) < final["lr"] < max(rates) and len(grid) == 3
    assert len(final["commonsense"]["tasks"]) == 7 and len(final["arithmetic"]["tasks"]) == 7
    hidden, inner = small.config.hidden_size, small.config.intermediate_size
    matched = 2 * 24 * (hidden + hidden + inner + hidden)  # r 24 on o_proj and down_proj
    assert final["prose_loss"] > 0 and final["trainable"] == matched
    best = next(r for r in grid.values() if r["lr"] == final["lr"])  # seed 0: the grid's run
    assert final["from_grid"] and final["train_seconds"] == best["train_seconds"]
    assert not list((tmp_path / "quality_models").iterdir())  # kept weights deleted once used
    assert set(jobs["base"]) >= {"commonsense", "arithmetic", "prose_loss"}
    assert "commonsense: accuracy %" in first.stdout
    tables = out.with_suffix(".md").read_text()  # the tables as Markdown, and the plot
    assert "| lora-matched | 1 |" in tables and "| base | 1 |" in tables
    assert "| chance | - | 50.0 |" in tables  # BoolQ: true or false
    assert out.with_suffix(".png").read_bytes().startswith(b"\x89PNG")
    again = subprocess.run(cmd, check=True, capture_output=True, text=True, timeout=600)
    assert "grid/" not in again.stdout and json.loads(out.read_text())["jobs"] == jobs
    outputs = gzip.decompress(
        (tmp_path / "quality_outputs" / "base-arithmetic.jsonl.gz").read_bytes()
    )
    rows = [json.loads(line) for line in outputs.decode().splitlines()]  # every answer, kept
    assert len(rows) == 7 and {"output", "prediction", "correct", "record"} <= set(rows[0])
    assert final["commonsense"]["tasks"]["boolq"]["correct_each"] in ("0", "1")
    grid_job = f"grid/commonsense/lora-matched/{final['lr']:g}"  # rerun: the same figures
    rerun = subprocess.run([*cmd, "--check", grid_job], capture_output=True, text=True, timeout=600)
    assert rerun.returncode == 0 and "val_loss" in rerun.stdout, rerun.stdout + rerun.stderr[-2000:]
    assert json.loads(out.read_text())["jobs"] == jobs  # the record untouched


def test_experiment_quality_pairs_methods_on_the_same_examples(tmp_path):
    """The report's paired table: S²FT-R minus each method, its point estimate the
    difference of the averages and its 95% bootstrap interval close to the normal
    approximation's (385 paired outcomes, seeds alike); seeds that disagree widen it."""
    rng = random.Random(1)
    mine = "".join(str(int(rng.random() < 0.6)) for _ in range(385))
    theirs = "".join(str(int(rng.random() < 0.5)) for _ in range(385))

    def run(bits: str, seed: int) -> dict:
        tasks = {"boolq": {"accuracy": bits.count("1") / len(bits), "correct_each": bits}}
        cost = {"trainable": 1, "steps": 1, "tokens": 1, "train_seconds": 1.0, "peak_mem_gb": 1}
        return cost | {"seed": seed, "prose_loss": 2.0, "commonsense": {"tasks": tasks}}

    def interval(lora_seeds: list[str]) -> tuple[float, float, float]:
        jobs = {f"final/commonsense/s2ft-r/{s}": run(mine, s) for s in range(3)}
        jobs |= {f"final/commonsense/lora-matched/{s}": run(b, s) for s, b in enumerate(lora_seeds)}
        out = tmp_path / "quality.json"
        out.write_text(json.dumps({"jobs": jobs}))
        cmd = [sys.executable, str(SCRIPTS / "experiment_quality.py"), "--report", "--out"]
        subprocess.run([*cmd, str(out)], check=True, capture_output=True, timeout=600)
        tables = out.with_suffix(".md").read_text().split("**commonsense: s2ft-r minus")
        (row,) = [r for r in tables[1].splitlines() if r.startswith("| lora-matched |")]
        delta, bounds = row.split(" | ")[1:3]
        low, high = (float(x) for x in bounds.strip("[]").split(", "))
        return float(delta), low, high

    delta, low, high = interval([theirs] * 3)
    d = [int(a) - int(b) for a, b in zip(mine, theirs, strict=True)]
    mean, half = statistics.mean(d), 1.96 * statistics.stdev(d) / len(d) ** 0.5
    assert delta == pytest.approx(100 * mean, abs=0.05)
    assert low == pytest.approx(100 * (mean - half), abs=1.0)
    assert high == pytest.approx(100 * (mean + half), abs=1.0)
    spread = [theirs, "1" * 385, "0" * 385]  # the same mean over seeds, seeds far apart
    delta_spread, low_spread, high_spread = interval(spread)
    expected = 100 * (mine.count("1") - statistics.mean(b.count("1") for b in spread)) / 385
    assert delta_spread == pytest.approx(expected, abs=0.05)
    assert high_spread - low_spread > 3 * (high - low)


def test_experiment_quality_extends_a_grid_whose_best_is_at_its_edge(tmp_path, monkeypatch):
    """A grid whose best rate is its highest (lowest) gets one more rate past that edge, at
    most twice; a final run recorded at a rate the grown grid no longer chooses is not done,
    and its redone result moves the old one to ``superseded``."""
    monkeypatch.syspath_prepend(str(SCRIPTS))
    import experiment_quality as study_script

    jobs: dict[str, dict] = {}
    study = SimpleNamespace(smoke=False, record={"jobs": jobs}, path=tmp_path / "q.json")

    def ran(method: str, lr: float, loss: float) -> None:
        jobs[f"grid/arithmetic/{method}/{lr:g}"] = {"lr": lr, "val_loss": loss}

    def grid(method: str) -> list[float]:
        return study_script.lrs(study, "arithmetic", method)

    assert grid("s2ft-r") == [5e-4, 1e-3, 2e-3]
    for lr, loss in ((5e-4, 0.49), (1e-3, 0.45), (2e-3, 0.42)):
        ran("s2ft-r", lr, loss)
    assert grid("s2ft-r") == [5e-4, 1e-3, 2e-3, 4e-3]  # best at the top: one more
    assert not study_script.grid_complete(study, "arithmetic", "s2ft-r")
    ran("s2ft-r", 4e-3, 0.44)  # worse: 2e-3 is now inside the grid
    assert grid("s2ft-r") == [5e-4, 1e-3, 2e-3, 4e-3]
    assert study_script.best_lr(study.record, "arithmetic", "s2ft-r") == 2e-3

    for lr, loss in ((1e-5, 0.40), (3e-5, 0.41), (1e-4, 0.45), (5e-6, 0.39), (2.5e-6, 0.38)):
        ran("full", lr, loss)  # the best at the bottom three times: extended twice only
    assert grid("full") == [2.5e-6, 5e-6, 1e-5, 3e-5, 1e-4]
    assert study_script.best_lr(study.record, "arithmetic", "full") == 2.5e-6

    final = "final/arithmetic/s2ft-r/1"
    jobs[final] = {"lr": 1e-3, "accuracy": 0.1}  # chosen before the grid grew
    assert not study_script.Study.done(study, final)
    study_script.Study.save(study, final, {"lr": 2e-3, "accuracy": 0.2})
    assert study_script.Study.done(study, final)
    saved = json.loads(study.path.read_text())
    assert saved["superseded"] == {f"{final}@0.001": {"lr": 1e-3, "accuracy": 0.1}}


def test_experiment_quality_floor_levels_average_only_floors_that_cover_every_task(monkeypatch):
    """The chance and majority lines of the report and the plot: a floor's average (%) over
    the tasks shown, none for a floor that misses one (arithmetic: only AQuA has choices)."""
    monkeypatch.syspath_prepend(str(SCRIPTS))
    import experiment_quality as study_script

    floors = {
        "commonsense": {"chance": {"boolq": 0.5, "ARC-Easy": 0.25}, "majority": {"boolq": 0.6}},
        "arithmetic": {"chance": {"AQuA": 0.2}},
    }
    record = {"settings": {"floors": floors}}
    levels = study_script.floor_levels(record, "commonsense", ["boolq", "ARC-Easy"])
    assert levels == pytest.approx({"chance": 37.5})
    assert study_script.floor_levels(record, "arithmetic", ["AQuA", "gsm8k"]) == {}
    assert study_script.floor_levels({}, "arithmetic", ["AQuA"]) == {}


def test_experiment_quality_check_takes_a_loss_to_its_last_digits_and_the_rest_exactly(
    monkeypatch,
):
    """``--check``'s comparison: a rerun's loss may move within ``LOSS_RTOL`` (two threads
    sum in an order of their own); an accuracy, an outcome, a missing figure or a loss
    beyond it may not."""
    monkeypatch.syspath_prepend(str(SCRIPTS))
    import experiment_quality as study_script

    recorded = {"prose_loss": 2.850430567124311, "boolq/accuracy": 0.6, "boolq/correct_each": "01"}
    rows, same = study_script.compare(recorded, recorded | {"prose_loss": 2.8504304474475335})
    assert same and [row[3] for row in rows] == ["same", "same", "within 1e-06"]
    assert rows[1][1:3] == ["2 outcomes", "0 differ"]
    changes = {"prose_loss": 2.851}, {"boolq/accuracy": 0.6000001}, {"boolq/correct_each": "11"}
    for changed in changes:
        assert not study_script.compare(recorded, recorded | changed)[1]
    assert not study_script.compare(recorded, {"prose_loss": 2.850430567124311})[1]  # one missing
