"""The benchmark scripts run end to end on a tiny model (their figures come from bigger runs)."""

from __future__ import annotations

import json
import statistics
import subprocess
import sys
from pathlib import Path

import pytest

from s2ft_cli import S2FTConfig
from s2ft_cli.models import load_model
from s2ft_cli.selection import select_units

from .conftest import STORIES

SCRIPTS = Path(__file__).resolve().parents[1] / "scripts"


def test_bench_train_measures_every_method(tmp_path):
    targets = {"o_proj": 0.25, "down_proj": 0.1}
    out = tmp_path / "bench.json"
    cmd = [sys.executable, str(SCRIPTS / "bench_train.py"), "--model", "preset:tiny-llama"]
    cmd += ["--shapes", "1x32", "--steps", "1", "--warmup", "0", "--threads", "1"]
    cmd += ["--targets", json.dumps(targets), "--json", str(out)]
    subprocess.run(cmd, check=True, capture_output=True, timeout=600)

    (config,) = json.loads(out.read_text())["configs"]
    results = config["rounds"][0]["results"]
    model = load_model("preset:tiny-llama")
    assert results["full"]["trainable"] == sum(p.numel() for p in model.parameters())
    assert results["floor"]["trainable"] == results["lean-floor"]["trainable"] == 0
    selection = select_units(model, S2FTConfig(targets=targets))
    assert results["s2ft"]["trainable"] == selection.trainable_params()
    ratio = config["median_ratios"]["s2ft/full"]
    assert ratio["time"] == results["s2ft"]["step_s"] / results["full"]["step_s"]
    assert ratio["memory"] == results["s2ft"]["peak_bytes"] / results["full"]["peak_bytes"]


def test_bench_train_times_a_users_loop_and_alternating_steps(tmp_path):
    """``--loop plain``: the model's own loss for ``labels=`` (what Hugging Face's Trainer
    computes) trains a converted model with the loss of s2ft's loop; ``--interleave``: the
    time ratios are the medians of per-step ratios from one process."""

    def bench(name, *args):
        out = tmp_path / f"{name}.json"
        cmd = [sys.executable, str(SCRIPTS / "bench_train.py"), "--model", "preset:tiny-llama"]
        cmd += ["--shapes", "1x32", "--steps", "3", "--warmup", "0", "--threads", "1"]
        cmd += ["--targets", json.dumps({"o_proj": 0.25, "down_proj": 0.1})]
        cmd += ["--json", str(out), *args]
        subprocess.run(cmd, check=True, capture_output=True, timeout=600)
        (config,) = json.loads(out.read_text())["configs"]
        return config

    trainer = bench("trainer", "--methods", "s2ft")["rounds"][0]["results"]["s2ft"]
    config = bench("plain", "--methods", "lora,s2ft", "--loop", "plain", "--interleave")
    plain = config["rounds"][0]["results"]["s2ft"]
    assert plain["loss"] == pytest.approx(trainer["loss"], rel=1e-5)
    times = config["interleaved_step_times"]
    assert [len(times[m]) for m in ("lora", "s2ft")] == [3, 3]
    ratio = statistics.median(a / b for a, b in zip(times["s2ft"], times["lora"], strict=True))
    assert config["median_ratios"]["s2ft/lora"]["time"] == ratio
    assert all(r["forward_s"] > 0 for r in config["rounds"][0]["results"].values())


def test_experiment_forgetting_records_every_run(tmp_path):
    cmd = [sys.executable, str(SCRIPTS / "experiment_forgetting.py"), "--steps", "1"]
    cmd += ["--val", "4", "--held-out", "4", "--stories", "2", "--story-tokens", "8"]
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
    for method, sweep in results["sweeps"].items():
        best = min(sweep, key=lambda r: r["val_loss"])
        assert runs[method, "medium"]["lr"] == best["lr"] == runs[method, "large"]["lr"]
    model = load_model(str(STORIES))
    small = select_units(model, S2FTConfig(targets=runs["s2ft", "small"]["budget"]))
    assert runs["s2ft", "small"]["trainable"] == small.trainable_params()
    assert runs["full", "large"]["trainable"] == sum(p.numel() for p in model.parameters())
    assert all(r["drift"] > 0 for r in results["runs"])
