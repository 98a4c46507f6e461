"""The baselines of the benchmarks and experiments as training methods of s2ft's own loop
(``s2ft_cli.training.methods``): PEFT LoRA, full fine-tuning and the frozen floor train through
the very ``Trainer`` that ``s2ft train`` runs, with another set of trainable parameters.
Each can use s2ft's memory-lean loss (the loop's default) or transformers' own loss, the
one a user of those libraries computes with ``model(**batch, labels=...)``."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from s2ft_cli.data import IGNORE_INDEX
from s2ft_cli.engine.targets import TARGET_MATRICES
from s2ft_cli.training.methods import TrainingMethod
from s2ft_cli.training.quantization import quantize_frozen_linears


class TransformersLoss(nn.Module):
    """transformers' loss of a batch (full-vocabulary logits, mean over target tokens) in
    the loop's terms: the batch's token-loss sum as one element, and per-example target
    counts."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
        counts = (batch["labels"][:, 1:] != IGNORE_INDEX).sum(1)
        loss = self.model(**batch, use_cache=False).loss
        return (loss * counts.sum()).reshape(1), counts


class Baseline(TrainingMethod):
    """A method whose result is the trained model's own ``save_pretrained`` folder."""

    def __init__(self, transformers_loss: bool = False):
        self.transformers_loss = transformers_loss

    def losses(self, model: nn.Module) -> nn.Module:
        return TransformersLoss(model) if self.transformers_loss else super().losses(model)

    def save(self, model: nn.Module, out: Path, trainer) -> str:
        trainer.procs.on_main(lambda: model.save_pretrained(out / "model"))
        return f"model written to {out / 'model'}"


class LoRA(Baseline):
    """PEFT LoRA of rank ``r`` on the seven linear projections (or ``targets``); on a quantized base
    (``model.quantization``), QLoRA as PEFT users run it: the base is quantized first into
    bitsandbytes' own layers (no blockwise products), LoRA wraps them. In a mixture-of-experts
    model the FFN roles are the experts' 3-D tensors, which PEFT adapts through
    ``target_parameters`` (a LoRA per expert)."""

    def __init__(
        self,
        r: int = 16,
        alpha: int = 32,
        transformers_loss: bool = False,
        targets: list[str] | None = None,
    ):
        super().__init__(transformers_loss)
        self.r, self.alpha = r, alpha
        self.targets = list(targets or TARGET_MATRICES)

    def prepare(self, model: nn.Module, trainer) -> nn.Module:
        from peft import LoraConfig, get_peft_model

        quantize_frozen_linears(model, trainer.recipe.model.quantization, blockwise=False)
        names = {n.rsplit(".", 1)[-1] for n, _ in model.named_modules()}
        parameters = sorted(
            {n.rsplit(".", 1)[-1] for n, p in model.named_parameters() if p.ndim == 3}
        )  # an experts module's gate_up_proj, down_proj
        config = LoraConfig(
            r=self.r,
            lora_alpha=self.alpha,
            target_modules=[t for t in self.targets if t in names],
            target_parameters=parameters or None,
        )
        return get_peft_model(model, config)

    def describe(self, model: nn.Module) -> list[str]:
        return [f"LoRA r={self.r}, alpha={self.alpha} on {', '.join(self.targets)}"]


class FullFineTuning(Baseline):
    """Every weight (``scope="all"``) or the seven projections' (``"blocks"``)."""

    def __init__(self, scope: str = "all", transformers_loss: bool = False):
        super().__init__(transformers_loss)
        self.scope = scope

    def prepare(self, model: nn.Module, trainer) -> nn.Module:
        if trainer.recipe.model.quantization != "none":
            raise ValueError("full fine-tuning trains the weights: it has no quantized base")
        for name, p in model.named_parameters():
            p.requires_grad_(self.scope == "all" or name.split(".")[-2] in TARGET_MATRICES)
        return model


class Floor(Baseline):
    """Every weight frozen, yet the backward pass runs through every layer (the input
    embeddings' output requires grad) and forms no weight gradient: the least any partial
    method costs. The optimizer needs a tensor: it holds one scalar, outside the model,
    that never gets a gradient."""

    def prepare(self, model: nn.Module, trainer) -> nn.Module:
        quantize_frozen_linears(model, trainer.recipe.model.quantization)
        model.requires_grad_(False)
        model.enable_input_require_grads()
        self.anchor = nn.Parameter(torch.zeros(1, device=model.device))
        return model

    def parameters(self, model: nn.Module) -> list[nn.Parameter]:
        return [self.anchor]
