"""What a run reports: its set-up summary, and the training metrics and where they go:
``metrics.jsonl`` in the run folder (always), a console line per record when the output is
not a terminal (logs of batch jobs), and TensorBoard event files under
``<output_dir>/tensorboard/`` with ``train.report_to: [tensorboard]``. Rank 0 writes; every
process calls the logger, which goes through ``Processes.on_main`` so that a failed write
stops every process."""

from __future__ import annotations

import json
import resource
from pathlib import Path

import torch
from rich.console import Console

from ..errors import S2FTError
from ..files import atomic_write_text
from .distributed import Processes
from .quantization import weight_total

METRICS = "metrics.jsonl"
TENSORBOARD = "tensorboard"


def status_line(last: dict, loss: float) -> str:
    """Loss, validation loss, learning rate, throughput and peak memory, compactly."""
    parts = [f"loss {loss:.3f}"]
    if "eval_loss" in last:
        parts.append(f"eval {last['eval_loss']:.3f}")
    if "lr" in last:
        parts.append(f"lr {last['lr']:.1e}")
    if "tokens_per_s" in last:
        parts.append(f"{last['tokens_per_s'] / 1000:.1f}k tok/s")
    if "peak_mem_gb" in last:
        parts.append(f"{last['peak_mem_gb']:.2f} GB")
    return " ".join(parts)


class JsonlBackend:
    """``metrics.jsonl``: one JSON object per record, appended."""

    def __init__(self, run: Path):
        self.path = run / METRICS

    def start(self) -> None:
        self.path.unlink(missing_ok=True)

    def resume(self, step: int) -> None:
        """Keep the lines up to the resumed ``step``. A last line that does not parse is an
        append a kill interrupted and is dropped; a damaged line before it is an error, not
        silently lost."""
        if not self.path.exists():
            return
        lines = self.path.read_text().splitlines()
        last = max((i for i, line in enumerate(lines) if line.strip()), default=-1)
        kept = []
        for i, line in enumerate(lines):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as err:
                if i == last:  # the append a kill interrupted
                    break
                raise S2FTError(
                    f"{self.path}: line {i + 1} is not valid JSON ({err.msg}); the metrics log "
                    "is damaged (the checkpoints are not). Delete that line, or move the file "
                    "away, and resume again."
                ) from err
            if record["step"] <= step:
                kept.append(line)
        atomic_write_text(self.path, "".join(line + "\n" for line in kept))

    def write(self, record: dict, loss: float | None) -> None:
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")

    def close(self) -> None:
        pass


class ConsoleBackend:
    """A ``step N/T  loss … `` line per training record when the console is not a
    terminal (a terminal shows the progress bar instead)."""

    def __init__(self, console: Console, total_steps: int):
        self.console, self.total_steps = console, total_steps

    def start(self) -> None:
        pass

    def resume(self, step: int) -> None:
        pass

    def write(self, record: dict, loss: float | None) -> None:
        if loss is not None and not self.console.is_terminal:
            self.console.print(
                f"step {record['step']}/{self.total_steps}  " + status_line(record, loss),
                highlight=False,
            )

    def close(self) -> None:
        pass


def summary_writer_class():
    """torch's TensorBoard ``SummaryWriter``, imported only when asked for; a missing
    ``tensorboard`` package is a user error saying how to install it."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError as err:
        raise S2FTError(
            "train.report_to lists tensorboard, but the tensorboard package is not installed "
            f"({err}). Install it with: pip install tensorboard (or remove tensorboard from "
            "train.report_to)."
        ) from err
    return SummaryWriter


def check_report_to(report_to: list[str]) -> None:
    """Refuse a backend whose package is missing before any work is done."""
    if "tensorboard" in report_to:
        summary_writer_class()


class TensorBoardBackend:
    """Event files under ``<run>/tensorboard/``: every number of a record is a scalar
    named like its metrics.jsonl key, at the record's step."""

    def __init__(self, run: Path):
        self.folder = run / TENSORBOARD
        self.writer_class = summary_writer_class()
        self.writer = None

    def start(self) -> None:
        """A new run: earlier event files in the folder belong to no checkpoint; removed."""
        for old in self.folder.glob("events.out.tfevents.*"):
            old.unlink()
        self.writer = self.writer_class(log_dir=str(self.folder))

    def resume(self, step: int) -> None:
        """Continue the run's files; TensorBoard drops what was logged after ``step``."""
        self.writer = self.writer_class(log_dir=str(self.folder), purge_step=step + 1)

    def write(self, record: dict, loss: float | None) -> None:
        for key, value in record.items():
            if key != "step" and isinstance(value, (int, float)):
                self.writer.add_scalar(key, value, global_step=record["step"])
        self.writer.flush()

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            self.writer = None


class MetricLogger:
    """The metric records of a run, written by rank 0 to each backend: metrics.jsonl, the
    console (when not a terminal) and those of ``report_to``."""

    def __init__(
        self,
        procs: Processes,
        run: Path,
        console: Console,
        total_steps: int,
        report_to: list[str] = (),
    ):
        self.procs = procs
        self.backends: list = []

        def open_backends() -> None:
            self.backends = [JsonlBackend(run), ConsoleBackend(console, total_steps)]
            if "tensorboard" in report_to:
                self.backends.append(TensorBoardBackend(run))

        procs.on_main(open_backends)

    def start(self) -> None:
        """(Rank 0.) A new run: the backends' files start empty."""
        for backend in self.backends:
            backend.start()

    def resume(self, step: int) -> None:
        """(Rank 0.) A resumed run: what was logged after ``step`` is dropped."""
        for backend in self.backends:
            backend.resume(step)

    def log(self, record: dict, loss: float | None = None) -> None:
        """Write ``record`` (its ``step`` and numbers) everywhere; ``loss`` is the last
        step's loss for the console line of a training record. Every process calls this."""

        def write() -> None:
            for backend in self.backends:
                backend.write(record, loss)

        self.procs.on_main(write)

    def close(self) -> None:
        for backend in self.backends:
            backend.close()


def peak_memory_gb(device: torch.device) -> float:
    """Peak allocated CUDA memory, or the process's peak resident memory on a CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux


def setup_summary(trainer) -> list[str]:
    """The lines (rich markup) a run prints when set up: model, device and processes, the
    trainable parameters, what the method trains, the data and the steps, the output."""
    r = trainer.recipe
    total = weight_total(trainer.model)
    trainable = sum(p.numel() for p in trainer.params)
    processes = f"{trainer.world} process{'es' if trainer.world > 1 else ''}"
    if trainer.sharded:
        processes += ", FSDP"
    lines = [
        f"[bold]s2ft train[/] {r.model.name_or_path} on {trainer.device} ({processes})",
        f"trainable {trainable:,} of {total:,} parameters ({100 * trainable / total:.3f}%)",
        *trainer.method.describe(trainer.model),
    ]
    if r.model.quantization != "none":
        lines.append(f"frozen linear weights in {r.model.quantization} (bitsandbytes)")
    lines += [
        f"{len(trainer.train_examples)} training / {len(trainer.val_set)} validation examples"
        + (
            f", packed into {len(trainer.train_set)} rows"
            if trainer.train_set is not trainer.train_examples
            else ""
        )
        + (", grouped by length" if r.train.group_by_length else "")
        + f", global batch {trainer.global_batch}, {trainer.total_steps} steps"
        + (f", resuming at step {trainer.step}" if trainer.step else ""),
        f"output: {trainer.out}",
        *(f"[yellow]data:[/] {note}" for note in trainer.data_notes),
    ]
    return lines
