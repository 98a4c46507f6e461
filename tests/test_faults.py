"""Faults during `s2ft train`: Ctrl-C or SIGTERM, SIGKILL while a checkpoint or a metrics
line is written, a loss that becomes NaN, a full disk, a resume with another batch layout.
None of them may cost what was already saved."""

from __future__ import annotations

import errno
import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
from safetensors.torch import load_file
from typer.testing import CliRunner

from s2ft_cli.cli import app
from s2ft_cli.errors import S2FTError
from s2ft_cli.recipe import load_recipe
from s2ft_cli.training import checkpoints as checkpoints_module
from s2ft_cli.training.checkpoints import checkpoints_of
from s2ft_cli.training.trainer import Trainer, train

from .test_train import RECIPE, cli, max_diff, metrics, recipe_file

LONG = RECIPE.replace("max_steps: 12", "max_steps: 40").replace("limit: 112", "limit: 400")


def wait_for(path: Path, proc: subprocess.Popen, seconds: float = 180) -> None:
    deadline = time.monotonic() + seconds
    while not path.exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.005)
    assert proc.poll() is None, "the run ended before the fault could be injected"


@pytest.fixture(scope="module")
def straight(tmp_path_factory) -> Path:
    """The adapter of the LONG recipe trained without interruption."""
    folder = tmp_path_factory.mktemp("straight")
    train(load_recipe(recipe_file(folder, LONG), [f"output_dir={folder / 'run'}"]))
    return folder / "run" / "adapter"


def test_a_stop_signal_saves_a_checkpoint_and_prints_the_resume_command(tmp_path, straight):
    """Ctrl-C (SIGINT) and SIGTERM (kill, cluster schedulers, torchrun) stop at the end of
    the step with a checkpoint; the exit status is the shell's 128 + signal number. A run
    stopped by one, resumed and stopped by the other, then resumed to the end, ends where
    the uninterrupted run does."""
    path = recipe_file(tmp_path, LONG)
    step = 0
    for sig, status, name in ((signal.SIGINT, 130, "Ctrl-C"), (signal.SIGTERM, 143, "SIGTERM")):
        resume = ["--resume"] if step else []
        proc = subprocess.Popen(
            [sys.executable, "-m", "s2ft_cli", "train", str(path), *resume],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        after = (step // 4 + 1) * 4  # the next regular checkpoint (save_every: 4)
        wait_for(tmp_path / "run" / "checkpoints" / f"step-{after:07d}" / "meta.json", proc)
        proc.send_signal(sig)
        stdout, stderr = proc.communicate(timeout=120)
        assert proc.returncode == status and "Traceback" not in stderr
        assert f"{name}: saving a checkpoint after this step" in stdout
        assert "Interrupted at step" in stderr and f"s2ft train {path} --resume" in stderr
        newest = checkpoints_of(tmp_path / "run")[-1]
        step = int(newest.name.split("-")[1])
        assert after <= step < 40 and f"step {step} of 40" in stderr
        assert not (tmp_path / "run" / "adapter").exists()

    result = cli("train", path, "--resume")
    assert result.exit_code == 0, result.output
    assert max_diff(tmp_path / "run" / "adapter", straight) <= 1e-5


KILL_WHILE_WRITING = """\
import os, signal, sys
import s2ft_cli.training.checkpoints as c
from s2ft_cli.cli import main
real, calls = c.save_file, []
def save_then_die(tensors, filename, *args, **kwargs):
    calls.append(filename)
    real(tensors, filename, *args, **kwargs)
    if len(calls) == 2:  # the second checkpoint: its tensors are written, the rest is not
        os.kill(os.getpid(), signal.SIGKILL)
c.save_file = save_then_die
sys.argv = ["s2ft", "train", sys.argv[1]]
main()
"""


def test_sigkill_while_a_checkpoint_is_written_keeps_the_previous_one(tmp_path, straight):
    path = recipe_file(tmp_path, LONG)
    proc = subprocess.run(
        [sys.executable, "-c", KILL_WHILE_WRITING, str(path)], capture_output=True, timeout=240
    )
    assert proc.returncode == -signal.SIGKILL
    run = tmp_path / "run"
    assert [c.name for c in checkpoints_of(run)] == ["step-0000004"]
    assert list((run / "checkpoints").glob(".step-0000008*"))  # the half-written one

    result = cli("train", path, "--resume")
    assert result.exit_code == 0, result.output
    assert not list((run / "checkpoints").glob(".step-*"))  # cleaned up on resume
    assert max_diff(run / "adapter", straight) <= 1e-5


def test_resume_drops_a_metrics_line_a_kill_cut_short(tmp_path):
    path = recipe_file(tmp_path)  # 12 steps, a checkpoint every 4, a metrics line every 2
    train(load_recipe(path))
    run = tmp_path / "run"
    finished = load_file(run / "adapter" / "s2ft_adapter.safetensors")
    lines = (run / "metrics.jsonl").read_text().splitlines()
    # as if killed at step 10 while appending its line: no step-12 checkpoint, no adapter
    shutil.rmtree(run / "checkpoints" / "step-0000012")
    shutil.rmtree(run / "adapter")
    up_to_8 = [line for line in lines if json.loads(line)["step"] <= 8]
    cut = lines[len(up_to_8)][:20]
    (run / "metrics.jsonl").write_text("".join(line + "\n" for line in up_to_8) + cut)

    train(load_recipe(path), resume=True)
    assert [r["step"] for r in metrics(run)] == [0, 2, 4, 6, 8, 10, 12]
    resumed = load_file(run / "adapter" / "s2ft_adapter.safetensors")
    assert all(resumed[k].equal(finished[k]) for k in finished)

    # a damaged line before the last is not a kill's doing: named, not silently dropped
    damaged = (run / "metrics.jsonl").read_text().splitlines()
    damaged[2] = damaged[2][:20]
    (run / "metrics.jsonl").write_text("".join(line + "\n" for line in damaged))
    with pytest.raises(S2FTError, match="metrics.jsonl: line 3 is not valid JSON"):
        train(load_recipe(path), resume=True)


def test_resume_with_another_global_batch_or_process_count_is_refused(tmp_path):
    """Step N is the N-th global batch of the data order: a resume must keep the global
    batch (and the process count); the message says how to go on from the checkpoint."""
    path = recipe_file(tmp_path)
    train(load_recipe(path, ["train.max_steps=4"]))  # a checkpoint at step 4
    meta_file = tmp_path / "run" / "checkpoints" / "step-0000004" / "meta.json"
    meta = json.loads(meta_file.read_text())
    layout = {k: meta[k] for k in ("global_batch", "batch_size", "grad_accum", "processes")}
    assert layout == {"global_batch": 8, "batch_size": 8, "grad_accum": 1, "processes": 1}

    resume = ["train", str(path), "train.max_steps=4", "--resume"]
    result = CliRunner().invoke(app, [*resume, "train.batch_size=4"])
    message = " ".join(result.output.split())
    assert result.exit_code == 1 and "Traceback" not in message
    assert "global batch 8 (batch_size 8 × 1 process × grad_accum 1)" in message
    assert "this run has global batch 4 (batch_size 4 × 1 process × grad_accum 1)" in message
    assert "resume with train.batch_size=8 train.grad_accum=1 on 1 process" in message
    assert f"s2ft export {tmp_path / 'run'} --checkpoint 4 --merged --out MERGED" in message
    assert "model.name_or_path=MERGED" in message

    # the same global batch split otherwise continues; so does any checkpoint older than
    # the record of its layout (as before)
    result = CliRunner().invoke(app, [*resume, "train.batch_size=4", "train.grad_accum=2"])
    assert result.exit_code == 0, result.output
    for key in layout:
        del meta[key]
    meta_file.write_text(json.dumps(meta))
    assert CliRunner().invoke(app, [*resume, "train.batch_size=4"]).exit_code == 0


def test_a_nan_loss_stops_the_run_and_keeps_the_last_good_checkpoint(tmp_path, monkeypatch):
    path = recipe_file(tmp_path)
    real_step = Trainer.train_step

    def diverge_at_step_6(self, step):
        loss, tokens = real_step(self, step)
        return (float("nan") if step == 5 else loss), tokens

    monkeypatch.setattr(Trainer, "train_step", diverge_at_step_6)
    with pytest.raises(S2FTError) as err:
        train(load_recipe(path))
    message = str(err.value)
    assert "became nan at step 6" in message and "step-0000004" in message
    assert "train.lr" in message
    run = tmp_path / "run"
    assert [c.name for c in checkpoints_of(run)] == ["step-0000004"]
    assert not (run / "adapter").exists()

    monkeypatch.undo()
    train(load_recipe(path), resume=True)  # the kept checkpoint continues
    assert (run / "adapter" / "s2ft_adapter.safetensors").exists()


def test_a_full_disk_is_reported_and_loses_nothing_saved(tmp_path, monkeypatch):
    path = recipe_file(tmp_path)
    real_save, calls = checkpoints_module.save_file, []

    def disk_full_at_second_checkpoint(tensors, filename, *args, **kwargs):
        calls.append(filename)
        if len(calls) == 2:
            Path(filename).write_bytes(b"\0" * 10)  # a partial file, then the disk is full
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), filename)
        return real_save(tensors, filename, *args, **kwargs)

    monkeypatch.setattr(checkpoints_module, "save_file", disk_full_at_second_checkpoint)
    run = tmp_path / "run"
    with pytest.raises(S2FTError) as err:
        train(load_recipe(path))
    message = str(err.value)
    assert "checkpoint of step 8" in message and "the disk is full" in message
    assert "step-0000004" in message and "--resume" in message
    assert [c.name for c in checkpoints_of(run)] == ["step-0000004"]
    assert not list((run / "checkpoints").glob(".step-*"))  # the partial one is removed
    load_file(run / "checkpoints" / "step-0000004" / "trainable.safetensors")

    monkeypatch.undo()
    train(load_recipe(path), resume=True)
    assert (run / "adapter" / "s2ft_adapter.safetensors").exists()


def test_a_full_disk_anywhere_is_one_message_from_the_cli(tmp_path):
    """Writes outside the checkpoints (here the adapter) go through the CLI's handler."""
    script = textwrap.dedent(
        """\
        import errno, os, sys
        from s2ft_cli.adapter.format import Adapter
        from s2ft_cli.cli import main
        def full(adapter, folder):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(folder))
        Adapter.save = full
        sys.argv = ["s2ft", "train", sys.argv[1], "train.max_steps=2", "train.save_every=0"]
        main()
        """
    )
    result = subprocess.run(
        [sys.executable, "-c", script, str(recipe_file(tmp_path))],
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert "could not write" in result.stderr and "No space left on device" in result.stderr
    assert str(tmp_path / "run" / "adapter") in result.stderr.replace("\n", "")
