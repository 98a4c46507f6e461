"""What a training run trains. The loop in ``trainer.py`` is the same for every method; a
:class:`TrainingMethod` says which parameters of the loaded model train, what a run and
its checkpoints record about them, and what the run leaves behind. :class:`S2FT` (paper
§3) is the toolkit's; the benchmarks' baselines (PEFT LoRA, full fine-tuning, the frozen
floor) are methods of their own in ``scripts/baselines.py``, so that they are measured
through the very loop ``s2ft train`` runs."""

from __future__ import annotations

from pathlib import Path

from torch import nn

from ..adapter.fingerprint import remember_base_fingerprint
from ..adapter.runtime import get_s2ft_model
from ..engine.losses import ExampleLosses
from ..engine.selection import Selection, calibration_data, select_units
from ..errors import S2FTError
from .quantization import quantize_frozen_linears


class TrainingMethod:
    """The trainable parameters of a run; the defaults suit a method with nothing to
    record. ``trainer`` is the :class:`~s2ft_cli.training.trainer.Trainer` setting up: its recipe,
    processes, training examples and tokenizer are ready when :meth:`prepare` runs."""

    def prepare(self, model: nn.Module, trainer) -> nn.Module:
        """Make the parameters that train require grad (and only those), and quantize the
        frozen base as ``model.quantization`` says (``quantize_frozen_linears``); returns
        the model the loop trains."""
        raise NotImplementedError

    def parameters(self, model: nn.Module) -> list[nn.Parameter]:
        """The tensors the optimizer updates: the model's trainable parameters."""
        return [p for p in model.parameters() if p.requires_grad]

    def losses(self, model: nn.Module) -> nn.Module:
        """The module whose forward gives a batch's per-example loss sums and target
        counts (what DDP wraps): the memory-lean loss by default."""
        return ExampleLosses(model)

    def describe(self, model: nn.Module) -> list[str]:
        """Lines (rich markup) for the set-up summary, after the trainable-parameter count."""
        return []

    def start_run(self, model: nn.Module, out: Path) -> None:
        """(Rank 0.) Files a new run writes beside its recipe."""

    def checkpoint_meta(self, model: nn.Module) -> dict:
        """What a checkpoint's meta.json records about the trainable parameters."""
        return {}

    def check_resume(self, model: nn.Module, meta: dict, checkpoint: Path) -> None:
        """Refuse to resume from a checkpoint whose trainable parameters are others."""

    def save(self, model: nn.Module, out: Path, trainer) -> str:
        """Write the run's result into the run folder ``out`` (every process calls it: a
        sharded model is gathered by all; rank 0 writes); returns what was written, in
        words."""
        raise NotImplementedError


class S2FT(TrainingMethod):
    """The recipe's S²FT selection, co-permuted and converted (paper §3); a run writes
    selection.json and its adapter."""

    def prepare(self, model: nn.Module, trainer) -> nn.Module:
        """Select, co-permute and convert; then quantize the frozen linears (permuting
        quantized blocks would mix their scales)."""
        selection = self.measured_selection(model, trainer)
        model = get_s2ft_model(model, trainer.recipe.s2ft, selection=selection)
        if trainer.sharded:  # rank 0 holds the weights: its fingerprint, shared
            remember_base_fingerprint(model, trainer.procs.on_main)
        quantize_frozen_linears(model, trainer.recipe.model.quantization, shardable=trainer.sharded)
        return model

    @staticmethod
    def measured_selection(model: nn.Module, trainer) -> Selection | None:
        """A scoring strategy's selection, measured once (on rank 0, calibration batches
        from the training data) and shared, so that every process trains the same units;
        a resumed run reads its selection.json. None for random selection: the seed alone
        fixes it everywhere."""
        c = trainer.recipe.s2ft
        if c.strategy == "random":
            return None
        if trainer.resume:  # the run's own choice: measuring again could move a tie
            return Selection.from_json((trainer.out / "selection.json").read_text())

        def measure() -> Selection:
            pad_id = trainer.tokenizer.pad_token_id
            return select_units(model, c, calibration_data(c, trainer.train_examples, pad_id))

        return trainer.procs.on_main(measure)

    def describe(self, model: nn.Module) -> list[str]:
        return [f"targets {model.s2ft_selection.config.targets}"] + [
            f"[yellow]adjusted:[/] {note}" for note in model.s2ft_selection.adjustments
        ]

    def start_run(self, model: nn.Module, out: Path) -> None:
        model.s2ft_selection.save(out / "selection.json")

    def checkpoint_meta(self, model: nn.Module) -> dict:
        return {"selection": model.s2ft_selection.to_dict()["units"]}

    def check_resume(self, model: nn.Module, meta: dict, checkpoint: Path) -> None:
        if meta["selection"] != self.checkpoint_meta(model)["selection"]:
            raise S2FTError(
                f"Checkpoint {checkpoint} was trained with another selection than this recipe "
                "makes; resume with the recipe (and s2ft seed) of the run."
            )

    def save(self, model: nn.Module, out: Path, trainer) -> str:
        path = out / "adapter"  # model.save_pretrained writes the S²FT adapter (adapter/format.py)
        if trainer.sharded:  # every process gathers the deltas
            model.save_pretrained(path, is_main_process=trainer.is_main)
        else:
            trainer.procs.on_main(lambda: model.save_pretrained(path))
        return f"adapter written to {path}"
