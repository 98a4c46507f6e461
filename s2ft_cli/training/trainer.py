"""The training loop: AdamW over the S² deltas only (paper §3.3, §4 set-up).

One :class:`Trainer` with ``setup / train / save_checkpoint / cleanup``, readable top to
bottom; set-up has a method per concern. What trains is a :class:`TrainingMethod`
(``methods.py``): S²FT, or a benchmark's baseline through this same loop. The loop leans
on a :class:`StepPlan` (which examples each micro-batch of each process takes), a
:class:`Checkpointer` (shared with export) and a :class:`MetricLogger` (metrics.jsonl,
console, TensorBoard). It runs in one process or under ``torchrun`` (DDP, or FSDP2 with
``train.distributed: fsdp``; gloo on CPU, nccl on GPU), where every process
takes ``batch_size`` examples of each micro-batch and only rank 0 writes; what rank 0 alone
checks or writes goes through ``Processes.on_main``, so that a refusal or a failure there
stops every process instead of leaving the others waiting. A step's only host
synchronisation is its one all-reduce (loss sum and stop requests); token counts are
known on the CPU.

Exactness: the data order of every epoch is a seeded permutation and each optimizer step
takes the next ``batch_size × processes × grad_accum`` examples of it, the loss is the sum
of token losses divided by the number of target tokens of the *whole* optimizer step, so
the gradient is the same however the step is split into micro-batches and processes; and
a checkpoint holds everything needed to continue exactly (deltas, optimizer, scheduler,
every process's RNG states, step) and the batch layout it assumes.
"""

from __future__ import annotations

import gc
import math
import random
import signal
import time
from contextlib import nullcontext
from pathlib import Path

import torch
import yaml
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

from ..data import (
    Datasets,
    collate,
    load_datasets,
    target_count,
    training_plan,
)
from ..engine.losses import example_losses
from ..engine.models import (
    enable_activation_checkpointing,
    load_config,
    load_model,
    load_tokenizer,
)
from ..errors import S2FTError, TrainingInterrupted
from ..files import atomic_write_text
from ..recipe import Recipe
from .checkpoints import Checkpointer, check_resumable, random_states, whole_state
from .distributed import setup_processes
from .methods import S2FT, TrainingMethod
from .metrics import MetricLogger, check_report_to, peak_memory_gb, setup_summary, status_line
from .quantization import check_quantizable, require_bitsandbytes
from .schedules import schedule
from .sharding import shard_model
from .signals import StopRequest


def token_loss(model, batch: dict) -> tuple[torch.Tensor, int]:
    """Sum of next-token cross-entropies over the target tokens, and their count."""
    losses, counts = example_losses(model, batch)
    return losses.sum(), int(counts.sum())


@torch.no_grad()
def token_loss_sums(
    model,
    examples: list,
    pad_id: int,
    batch_size: int,
    device: torch.device | str = "cpu",
    autocast=nullcontext,
) -> tuple[float, int]:
    """Summed token loss and target-token count of ``model`` over ``examples``;
    ``autocast`` makes the context each forward runs in."""
    total, count = 0.0, 0
    for i in range(0, len(examples), batch_size):
        batch = {k: v.to(device) for k, v in collate(examples[i : i + batch_size], pad_id).items()}
        with autocast():
            loss, n = token_loss(model, batch)
        total, count = total + loss.item(), count + n
    return total, count


def adamw(params: list[torch.Tensor], lr: float, weight_decay: float) -> torch.optim.AdamW:
    """AdamW over a few tensors (the deltas), fused into one kernel where torch has one:
    an optimizer step costs launches, not arithmetic, at S²FT's sizes."""
    fused = all(p.device.type in ("cpu", "cuda") for p in params)
    return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay, fused=fused or None)


class Trainer:
    """Fine-tune a model as a recipe says: with S²FT, or with another ``method`` (the
    benchmarks' baselines); on the recipe's data, or on ready ``datasets``."""

    def __init__(
        self,
        recipe: Recipe,
        resume: bool = False,
        console: Console | None = None,
        method: TrainingMethod | None = None,
        datasets: Datasets | None = None,
    ):
        if recipe.data is None and datasets is None:
            raise S2FTError("s2ft train needs a data: section in the recipe (data.train at least).")
        self.recipe = recipe
        self.resume = resume
        self.method = method or S2FT()
        self.datasets = datasets
        self.out = Path(recipe.output_dir)
        self.console = console or Console()
        self.checkpointer = Checkpointer(self.out, keep=recipe.train.keep_checkpoints)

    # -----------------------------------------------------------------------------------
    def setup(self) -> None:
        """Processes and seeds, data and its step plan, the model with its selection,
        optimizer and schedule, metric logger; the run's files, or the checkpoint a resumed
        run continues from."""
        checkpoint = self._setup_processes()
        self._setup_data()
        self._setup_model()
        self._setup_optimizer()
        self._setup_run(checkpoint)
        if self.is_main:
            self.console.print("\n  ".join(setup_summary(self)), highlight=False)

    def _setup_processes(self) -> Path | None:
        """Join the processes, seed this one, and check the output folder (rank 0); returns
        the checkpoint a resumed run continues from."""
        t = self.recipe.train
        self.procs = setup_processes(t.device, key="train.device")
        self.world, self.rank, self.device = self.procs.world, self.procs.rank, self.procs.device
        self.is_main = self.procs.is_main
        # One random stream per process, so that dropout masks differ between processes.
        # What must be equal everywhere draws from generators of its own, seeded alike: a
        # preset's initialisation, the selection, the data order.
        torch.manual_seed(t.seed + self.rank)
        random.seed(t.seed + self.rank)
        self.procs.on_main(lambda: check_report_to(t.report_to))
        return self.procs.on_main(self._check_output_dir)

    def _setup_data(self) -> None:
        """Tokenizer, training and validation examples, and the plan of the steps."""
        r, t = self.recipe, self.recipe.train
        self.tokenizer = load_tokenizer(r.model.name_or_path, r.model.trust_remote_code)
        datasets = self.datasets or load_datasets(r.data, r.data_seed, self.tokenizer)
        self.train_examples, self.val_set, sources = datasets
        self.data_notes = [s.note for s in sources if s.note]
        # the rows trained on: the examples, or packed several to a row (data.packing)
        self.packed = r.data is not None and r.data.packing
        self.train_set, self.plan = training_plan(
            self.train_examples, r.data.max_seq_len if self.packed else None, t.batch_size,
            self.world, t.grad_accum, t.seed, t.group_by_length,
        )  # fmt: skip
        # target and token counts of each row, counted once: a step sums its rows'
        self.counts = [(target_count(e), len(e.input_ids)) for e in self.train_set]
        self.global_batch, self.steps_per_epoch = self.plan.global_batch, self.plan.steps_per_epoch
        if self.steps_per_epoch == 0:
            raise S2FTError(
                f"The training set has {len(self.train_set)} examples, fewer than one optimizer "
                f"step's {self.global_batch} (batch_size × processes × grad_accum); lower "
                "train.batch_size or train.grad_accum."
            )
        self.total_steps = t.max_steps or t.epochs * self.steps_per_epoch

    def _setup_model(self) -> None:
        """The model on this device, with the method's trainable parameters (S²FT:
        selected, co-permuted and converted, paper §3; quantized as model.quantization
        says), its loss module wrapped in DDP or sharded by FSDP (``sharding.py``) under
        several processes; autocast as train.autocast says."""
        r, t = self.recipe, self.recipe.train
        self.sharded = t.sharded(self.world)
        if r.model.quantization != "none":  # before loading weights
            require_bitsandbytes()
            check_quantizable(load_config(r.model.name_or_path, r.model.trust_remote_code))
        # Sharded, rank 0 alone reads the weights (to the CPU) and the others build the
        # model on the meta device; sharding hands them rank 0's values.
        model = load_model(
            r.model.name_or_path,
            r.model.dtype,
            r.model.trust_remote_code,
            seed=t.seed,
            weights=self.is_main or not self.sharded,
        )
        if not self.sharded:
            model = model.to(self.device)
        if r.model.gradient_checkpointing:
            enable_activation_checkpointing(model)
        self.model = self.method.prepare(model, self)  # quantizes as model.quantization says
        # DDP and FSDP wrap the loss module: its forward is the one that runs
        self.engine = self.method.losses(self.model)
        if self.sharded:
            shard_model(self.engine, self.model, self.procs, t.fsdp_offload)
        elif self.world > 1:
            self.engine = torch.nn.parallel.DistributedDataParallel(self.engine)
        self.params = self.method.parameters(self.model)
        use_bf16 = t.autocast == "bf16" or (t.autocast == "auto" and self.device.type == "cuda")
        self.autocast_dtype = torch.bfloat16 if use_bf16 else None

    def _setup_optimizer(self) -> None:
        """AdamW over the deltas and the learning-rate schedule."""
        t = self.recipe.train
        self.optimizer = adamw(self.params, t.lr, t.weight_decay)
        self.scheduler = schedule(t.scheduler, self.optimizer, t.warmup_steps, self.total_steps)

    def _setup_run(self, checkpoint: Path | None) -> None:
        """The metric logger, and a new run's files or the resumed checkpoint's state."""
        self.logger = MetricLogger(
            self.procs, self.out, self.console, self.total_steps, self.recipe.train.report_to
        )
        self.step = 0
        self._stop: StopRequest | None = None  # set while train() runs
        self._stopped_by: int | None = None  # the signal every process stops for
        if self.resume:
            meta = self.checkpointer.meta(checkpoint)
            check_resumable(checkpoint, meta, self._batch_layout(), self.out)
            self.method.check_resume(self.model, meta, checkpoint)
            self.step = self.checkpointer.restore(
                checkpoint, self.model, self.params, self.optimizer, self.scheduler, self.rank
            )
            self.procs.on_main(self._tidy_resumed_run)
        else:
            self.procs.on_main(self._start_run)

    def _check_output_dir(self) -> Path | None:
        """(Rank 0.) The checkpoint a resumed run continues from, or None for a new run;
        refuses --resume without a checkpoint, and a new run into another run's folder."""
        latest = self.checkpointer.latest()
        if self.resume and latest is None:
            raise S2FTError(
                f"--resume: no checkpoint in {self.checkpointer.folder}; start without --resume."
            )
        if not self.resume and self.checkpointer.folder.exists():
            raise S2FTError(
                f"{self.out} already holds checkpoints of a run. Continue it with --resume, or "
                "choose another output_dir (output_dir=...)."
            )
        return latest if self.resume else None

    def _start_run(self) -> None:
        """(Rank 0.) A new run's files: the resolved recipe and the selection."""
        self.out.mkdir(parents=True, exist_ok=True)
        atomic_write_text(
            self.out / "recipe.yaml", yaml.safe_dump(self.recipe.model_dump(), sort_keys=False)
        )
        self.method.start_run(self.model, self.out)
        self.logger.start()

    def _tidy_resumed_run(self) -> None:
        """(Rank 0.) Remove what a run killed while writing left behind: half-written
        checkpoints, and metrics logged after the resumed step or cut short."""
        self.checkpointer.remove_partial()
        self.logger.resume(self.step)

    def autocast(self):
        """A fresh autocast context (bf16 on CUDA by default), or a no-op."""
        if self.autocast_dtype is None:
            return nullcontext()
        return torch.autocast(self.device.type, dtype=self.autocast_dtype)

    # -----------------------------------------------------------------------------------
    def _micro_batch(self, step: int, m: int) -> dict:
        """This process's micro-batch ``m`` of optimizer step ``step``, on its device."""
        chunk = [self.train_set[i] for i in self.plan.micro_batch(step, self.rank, m)]
        batch = collate(chunk, self.tokenizer.pad_token_id)
        if self.device.type == "cuda":  # pinned, so that the copy does not wait (nanoGPT)
            return {k: v.pin_memory().to(self.device, non_blocking=True) for k, v in batch.items()}
        return batch

    def train_step(self, step: int) -> tuple[float, int]:
        """One optimizer step; returns the mean token loss and the number of tokens.

        The step's target and token counts come from its examples on the CPU (every
        process counts the whole step's), so the loss scale is known before backward
        without a device round trip; the loss sum stays on the device until the step's
        one all-reduce. That also carries the stop requests: one on any process stops all
        of them after the same step (torchrun forwards a signal to each, not at the same
        instant), SIGTERM deciding the exit status over Ctrl-C."""
        counts = [self.counts[i] for i in self.plan.step_examples(step)]
        targets, tokens = (sum(column) for column in zip(*counts, strict=True))
        scale = self.world / max(targets, 1)  # DDP averages over processes
        loss_sum = torch.zeros((), dtype=torch.float64, device=self.device)
        self.engine.train()
        for m in range(self.plan.grad_accum):
            batch = self._micro_batch(step, m)
            with self._gradient_sync(last=m == self.plan.grad_accum - 1):
                with self.autocast():
                    loss = self.engine(batch)[0].sum()
                (loss * scale).backward()
            loss_sum += loss.detach().double()
        if self.recipe.train.max_grad_norm:
            torch.nn.utils.clip_grad_norm_(self.params, self.recipe.train.max_grad_norm)
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        stop = self._stop.signal if self._stop is not None else None
        loss_sum, sigint, sigterm = self.procs.all_sum(
            loss_sum, int(stop == signal.SIGINT), int(stop == signal.SIGTERM)
        )
        self._stopped_by = signal.SIGTERM if sigterm else signal.SIGINT if sigint else None
        return loss_sum / max(targets, 1), tokens

    def _gradient_sync(self, last: bool):
        """The context of one micro-batch's forward and backward: DDP all-reduces (FSDP
        reduce-scatters) the accumulated gradients in the backward of the last micro-batch
        only (a fresh ``no_sync()`` for each earlier one: a context manager is entered
        once)."""
        if self.sharded:
            self.engine.set_requires_gradient_sync(last)
        elif self.world > 1 and not last:
            return self.engine.no_sync()
        return nullcontext()

    def evaluate(self) -> float | None:
        """Mean token loss over the validation set, shared out among processes. Each
        process runs the same number of forwards (a sharded model gathers its layers in
        every one): one short of examples repeats its first batch and counts nothing."""
        if not self.val_set:
            return None
        self.engine.eval()
        size = self.recipe.train.batch_size
        mine = self.val_set[self.rank :: self.world]
        batches = math.ceil(math.ceil(len(self.val_set) / self.world) / size)
        total, count = torch.zeros((), dtype=torch.float64, device=self.device), 0
        with torch.no_grad():
            for i in range(batches):
                chunk = mine[i * size : (i + 1) * size]
                batch = collate(chunk or self.val_set[:size], self.tokenizer.pad_token_id)
                with self.autocast():
                    losses, counts = self.engine({k: v.to(self.device) for k, v in batch.items()})
                if chunk:
                    total += losses.sum().double()
                    count += int(counts.sum())
        total, count = self.procs.all_sum(total, count)
        return total / max(count, 1)

    def train(self) -> dict:
        """Run from the current step to the end; returns the last metrics."""
        t = self.recipe.train
        progress = Progress(
            TextColumn("[bold]train"),
            BarColumn(bar_width=20),
            MofNCompleteColumn(),
            TimeRemainingColumn(),
            TextColumn("{task.fields[status]}"),
            console=self.console,
            disable=not self.is_main,
        )
        last: dict = {}
        window_loss, window_tokens, window_start = [], 0, time.perf_counter()
        if self.step == 0 and self.val_set:  # where the validation loss starts from
            record = {"step": 0, "eval_loss": self.evaluate()}
            last.update(record)
            self.logger.log(record)
        with progress, StopRequest(self.console) as self._stop:
            task = progress.add_task(
                "train", total=self.total_steps, completed=self.step, status=""
            )
            while self.step < self.total_steps:
                loss, tokens = self.train_step(self.step)
                if not math.isfinite(loss):
                    raise S2FTError(
                        f"The training loss became {loss} at step {self.step + 1}; the run "
                        f"stopped and did not save that state. {self.checkpointer.kept()} Lower "
                        "train.lr (or set train.max_grad_norm), check the data, and start again "
                        "or resume with --resume."
                    )
                self.step += 1
                window_loss.append(loss)
                window_tokens += tokens
                final = self.step == self.total_steps
                evaluate_now = bool(self.val_set) and (
                    final or (t.eval_every and self.step % t.eval_every == 0)
                )
                if self.step % t.log_every == 0 or final or evaluate_now:
                    elapsed = time.perf_counter() - window_start
                    record = {
                        "step": self.step,
                        "epoch": round(self.step / self.steps_per_epoch, 4),
                        "loss": sum(window_loss) / len(window_loss),
                        "lr": self.scheduler.get_last_lr()[0],
                        "tokens_per_s": window_tokens / max(elapsed, 1e-9),
                        "peak_mem_gb": peak_memory_gb(self.device),
                    }
                    if evaluate_now:
                        record["eval_loss"] = self.evaluate()
                    window_loss, window_tokens, window_start = [], 0, time.perf_counter()
                    last.update(record)
                    self.logger.log(record, loss)
                progress.update(task, advance=1, status=status_line(last, loss))
                saved = final or (t.save_every and self.step % t.save_every == 0)
                if saved:
                    self.save_checkpoint()
                if self._stopped_by and not final:  # agreed by every process
                    if not saved:
                        self.save_checkpoint()
                    raise TrainingInterrupted(
                        f"Interrupted at step {self.step} of {self.total_steps}; checkpoint "
                        f"saved in {self.checkpointer.latest()}.",
                        exit_code=128 + self._stopped_by,
                    )
        written = self.method.save(self.model, self.out, self)  # S²FT: the adapter
        if self.is_main:
            self.console.print(written, highlight=False)
        return last

    # -----------------------------------------------------------------------------------
    def save_checkpoint(self) -> None:
        """Write ``checkpoints/step-N/`` atomically (rank 0) and keep the newest few. It
        holds every process's RNG states (each continues its own dropout stream) and, in
        meta.json, the batch layout that maps steps to examples. Sharded tensors are
        gathered whole (by every process), so the files are those of an unsharded run."""
        rng = self.procs.gather(random_states())
        trainable = optimizer = None
        if self.is_main or self.sharded:  # gathering a sharded tensor takes every process
            trainable, optimizer = whole_state(self.model, self.optimizer)
        state = {
            "step": self.step,
            "optimizer": optimizer,
            "scheduler": self.scheduler.state_dict(),
            "rng": rng,
        }
        meta = {
            "step": self.step,
            "total_steps": self.total_steps,
            **self._batch_layout(),
            **self.method.checkpoint_meta(self.model),
        }
        self.procs.on_main(lambda: self.checkpointer.write(self.step, trainable, state, meta))

    def _batch_layout(self) -> dict:
        """What maps the steps to examples besides the seed (``check_resumable``)."""
        t = self.recipe.train
        return {
            "global_batch": self.global_batch,
            "batch_size": t.batch_size,
            "grad_accum": t.grad_accum,
            "processes": self.world,
            "packing": self.packed,
            "group_by_length": t.group_by_length,
        }

    def cleanup(self) -> None:
        # DDP's reducer holds the process group. Freed after the group is destroyed, it
        # would be the last owner and run gloo's blocking destructor with the GIL held,
        # which deadlocks with gloo's threads (pytorch/pytorch#56297): free it first.
        self.engine = None
        gc.collect()
        if hasattr(self, "logger"):
            self.logger.close()
        if hasattr(self, "procs"):
            self.procs.close()


def train(recipe: Recipe, resume: bool = False, console: Console | None = None) -> dict:
    """Set up, train and clean up; returns the last logged metrics."""
    trainer = Trainer(recipe, resume=resume, console=console)
    try:
        trainer.setup()
        return trainer.train()
    finally:
        trainer.cleanup()
