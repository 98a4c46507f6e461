"""Unit scores of the selection strategies (paper §4: S²FT-R, -W, -A, -S, -G).

Each scorer gives, per target matrix, a ``(layers, units)`` float64 tensor; the allocation
in ``selection`` then takes the largest (or smallest) scores. Units are query heads for
q_proj/o_proj, key/value heads for k_proj/v_proj, intermediate channels for the FFN.

* ``random``: i.i.d. uniform noise (a uniform random subset).
* ``weight``: the Frobenius norm of the unit's rows (producers) or columns (consumers).
* ``activation``: the mean |value| of the unit's activation over the calibration tokens
  (padding excluded): a query head's attention output (the input of o_proj on its
  columns), a key/value head's the mean over its query heads, a channel's FFN
  intermediate value (the input of down_proj).
* ``weight_activation``: weight × activation.
* ``gradient``: the Frobenius norm of the unit's slice of ∂L/∂W, L the mean token loss over
  all calibration examples. Only activations carry gradients (every weight stays frozen);
  each target matrix's gradient is accumulated (fp32) from its input and output gradient,
  so the only weight gradients that exist are those of the target matrices — no
  optimizer state, no gradient of any other weight.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from ..data import IGNORE_INDEX
from .config import S2FTConfig
from .losses import example_losses
from .models import ModelShape, get_linear
from .targets import STRUCTURES, TARGETS, Unit, structure_consumer

Batches = list[dict[str, torch.Tensor]]
Scores = dict[str, torch.Tensor]


def random_scores(model, shape: ModelShape, config: S2FTConfig, layers, batches) -> Scores:
    """S²FT-R: i.i.d. uniform scores, so the top-k is a uniform random subset."""
    generator = torch.Generator().manual_seed(config.seed)
    return {
        m: torch.rand(len(layers), shape.num_units(m), generator=generator, dtype=torch.float64)
        for m in config.targets
    }


def unit_norms(matrix: str, tensor: torch.Tensor, shape: ModelShape) -> torch.Tensor:
    """Frobenius norm of each unit's rows (producers) or columns (consumers) of a
    ``(out, in)`` tensor shaped like the matrix."""
    n, width = shape.num_units(matrix), shape.unit_width(matrix)
    t = tensor.detach().double()
    if TARGETS[matrix].consumer:
        return t.reshape(t.shape[0], n, width).square().sum((0, 2)).sqrt()
    return t.reshape(n, width, t.shape[1]).square().sum((1, 2)).sqrt()


def weight_scores(model, shape: ModelShape, config: S2FTConfig, layers, batches) -> Scores:
    """S²FT-W: the norm of each unit's slice of the target matrix."""
    return {
        m: torch.stack([unit_norms(m, get_linear(model, i, m).weight, shape) for i in layers]).cpu()
        for m in config.targets
    }


def _device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


@torch.no_grad()
def activation_scores(model, shape: ModelShape, config: S2FTConfig, layers, batches) -> Scores:
    """S²FT-A: mean |activation| of each unit over the calibration tokens."""
    sums: dict[tuple[int, str], torch.Tensor] = {}
    tokens = 0
    mask: list[torch.Tensor] = []

    def recorder(key):
        def hook(module, args):
            column_sums = torch.einsum("bt,bti->i", mask[0], args[0].abs().float())
            sums[key] = sums.get(key, 0) + column_sums.double()

        return hook

    handles = [
        get_linear(model, i, consumer).register_forward_pre_hook(recorder((i, consumer)))
        for i in layers
        for consumer in map(structure_consumer, STRUCTURES)
    ]
    was_training = model.training
    model.eval()
    try:
        for batch in batches:
            batch = {k: v.to(_device(model)) for k, v in batch.items()}
            mask[:] = [batch["attention_mask"].float()]
            tokens += int(batch["attention_mask"].sum())
            model(
                input_ids=batch["input_ids"],
                attention_mask=batch["attention_mask"],
                use_cache=False,
            )
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    scores = {}
    for m in config.targets:
        target = TARGETS[m]
        consumer = structure_consumer(target.structure)
        rows = []
        for i in layers:
            if target.unit is Unit.CHANNEL:  # the FFN intermediate value: down_proj's input
                rows.append(sums[(i, consumer)] / tokens)
            else:  # per query head: mean over its head_dim columns of o_proj's input
                heads = (sums[(i, consumer)] / tokens).view(shape.num_heads, shape.head_dim)
                per_head = heads.mean(1)
                if target.unit is Unit.KV_HEAD:  # a key/value head: the mean of its group
                    per_head = per_head.view(shape.num_kv_heads, shape.group_size).mean(1)
                rows.append(per_head)
        scores[m] = torch.stack(rows).cpu()
    return scores


def weight_activation_scores(model, shape, config, layers, batches) -> Scores:
    """S²FT-S: weight norm × mean |activation|."""
    weight = weight_scores(model, shape, config, layers, batches)
    activation = activation_scores(model, shape, config, layers, batches)
    return {m: weight[m] * activation[m] for m in config.targets}


def gradient_scores(model, shape: ModelShape, config: S2FTConfig, layers, batches) -> Scores:
    """S²FT-G: the norm of each unit's slice of the loss gradient of its matrix."""
    device = _device(model)
    targets = sum(int((b["labels"][:, 1:] != IGNORE_INDEX).sum()) for b in batches)
    grads: dict[tuple[int, str], torch.Tensor] = {}

    def recorder(key):
        def hook(module, args, output):
            x = args[0].detach()

            def accumulate(g):
                g2, x2 = g.reshape(-1, g.shape[-1]).float(), x.reshape(-1, x.shape[-1]).float()
                grads[key] = grads.get(key, 0) + g2.t() @ x2

            output.register_hook(accumulate)

        return hook

    flags = [(p, p.requires_grad) for p in model.parameters()]
    for p, _ in flags:
        p.requires_grad_(False)
    handles = [
        get_linear(model, i, m).register_forward_hook(recorder((i, m)))
        for i in layers
        for m in config.targets
    ]
    was_training = model.training
    model.eval()
    embed = model.get_input_embeddings()
    try:
        with torch.enable_grad():  # even when called under no_grad
            for batch in batches:
                batch = {k: v.to(device) for k, v in batch.items()}
                # gradients flow from the input embeddings: every activation, no weight
                embeds = embed(batch["input_ids"]).detach().requires_grad_(True)
                losses, _ = example_losses(model, {**batch, "inputs_embeds": embeds})
                (losses.sum() / max(targets, 1)).backward()
    finally:
        for h in handles:
            h.remove()
        for p, flag in flags:
            p.requires_grad_(flag)
        model.train(was_training)
    return {
        m: torch.stack([unit_norms(m, grads[(i, m)], shape) for i in layers]).cpu()
        for m in config.targets
    }


Scorer = Callable[[nn.Module, ModelShape, S2FTConfig, list[int], Batches | None], Scores]
SCORERS: dict[str, Scorer] = {
    "random": random_scores,
    "weight": weight_scores,
    "activation": activation_scores,
    "weight_activation": weight_activation_scores,
    "gradient": gradient_scores,
}
