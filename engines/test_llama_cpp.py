"""The quickstart's GGUF exports in llama.cpp on 100 held-out problems (``make
test-engines``; about 10 minutes on 2 cores, too long for every ``make test``, where
llama.cpp checks every family's exports on logits): ``scripts/engines_llama_cpp.py`` on a
quickstart run trained here. The float exports and the LoRA file on the float base give
``s2ft eval``'s greedy text on at least 90 of the 100 prompts; the quantized ones (q8_0, the
source's types, the LoRA file on the packaged Q4_1 base) score within 5 points of its
accuracy (issue 39)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PROMPTS = 100
EXACT = ("adapter: merged f32", "adapter: merged f16", "adapter: LoRA on the F32 base")
QUANTIZED = (
    "adapter: merged q8_0",
    "adapter: merged, source types",
    "adapter: LoRA on the source base",
)


def test_quickstart_exports_answer_in_llama_cpp_as_in_s2ft(tmp_path):
    run = tmp_path / "quickstart"
    train = [sys.executable, "-m", "s2ft_cli", "train", str(REPO / "recipes" / "quickstart.yaml")]
    done = subprocess.run([*train, f"output_dir={run}"], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]
    out = tmp_path / "llama_cpp.json"
    script = [sys.executable, str(REPO / "scripts" / "engines_llama_cpp.py"), str(run)]
    done = subprocess.run([*script, "--limit", str(PROMPTS), "--out", str(out)],
                          capture_output=True, text=True)  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    results = json.loads(out.read_text())["results"]
    for label in EXACT:
        assert results[label]["agree"] >= 0.9 * PROMPTS, (label, results[label])
    for label in QUANTIZED:
        r = results[label]
        assert abs(r["accuracy"] - r["s2ft_accuracy"]) <= 5, (label, r)
    assert all(r["tokenized_otherwise"] == 0 for r in results.values())
