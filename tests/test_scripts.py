"""The benchmark scripts run end to end on a tiny model (their figures come from bigger runs)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from s2ft_cli import S2FTConfig
from s2ft_cli.models import load_model
from s2ft_cli.selection import select_units

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
