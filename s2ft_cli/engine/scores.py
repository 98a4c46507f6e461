"""Unit scores of the selection strategies (paper §4: S²FT-R, -W, -A, -S, -G).

Each scorer gives, per target matrix, a ``(layers, units)`` float64 tensor; the allocation
in ``selection`` then takes the largest (or smallest) scores. Units are query heads for
q_proj/o_proj, key/value heads for k_proj/v_proj, intermediate channels for the FFN (every
expert's, in a mixture-of-experts layer). Each unit's weight is found through its
family's slots (``shapes.role_slots``): a fused weight's slice, an expert's.

* ``random``: i.i.d. uniform noise (a uniform random subset).
* ``weight``: the Frobenius norm of the unit's rows (producers) or columns (consumers).
* ``activation``: the mean |value| of the unit's activation over the calibration tokens
  (padding excluded): a query head's attention output (the input of o_proj on its
  columns), a key/value head's the mean over its query heads, a channel's FFN
  intermediate value (the input of down_proj; an expert's channel is 0 on the tokens the
  router does not send it).
* ``weight_activation``: weight × activation.
* ``gradient``: the Frobenius norm of the unit's slice of ∂L/∂W, L the mean token loss over
  all calibration examples. Only activations carry gradients (every weight stays frozen);
  each target matrix's gradient is accumulated (fp32) from its input and output gradient,
  so the only weight gradients that exist are those of the target matrices — no
  optimizer state, no gradient of any other weight.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager

import torch
from torch import nn

from ..data import IGNORE_INDEX
from .config import S2FTConfig
from .experts import experts_modules, frozen_product, route_through
from .losses import example_losses
from .shapes import ModelShape, Slot, role_slots
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


def slot_weight(model: nn.Module, slot: Slot) -> torch.Tensor:
    """The slot's weight in the ``(out, in)`` orientation (an expert's slice of a 3-D
    experts tensor), as stored: no copy."""
    owner = model.get_submodule(slot.path)
    weight = getattr(owner, slot.place.param)
    if slot.expert is not None:
        weight = weight[slot.expert]
    return weight.t() if slot.place.transposed else weight


def unit_norms(slot: Slot, tensor: torch.Tensor) -> torch.Tensor:
    """Frobenius norm of each of the slot's units' rows (producers) or columns
    (consumers) of an ``(out, in)`` tensor shaped like its weight."""
    t = tensor.detach().double()
    ids = slot.ids(range(slot.count), device=t.device)
    if TARGETS[slot.role].consumer:
        return t[:, ids].reshape(t.shape[0], slot.count, slot.width).square().sum((0, 2)).sqrt()
    return t[ids].reshape(slot.count, slot.width, t.shape[1]).square().sum((1, 2)).sqrt()


def _per_unit(shape: ModelShape, matrix: str, layers, value: Callable[[Slot], torch.Tensor]):
    """``(layers, units)`` scores of a matrix: each layer's slots' values, in unit order."""
    return torch.stack(
        [torch.cat([value(s).cpu() for s in role_slots(shape, i, matrix)]) for i in layers]
    )


def weight_scores(model, shape: ModelShape, config: S2FTConfig, layers, batches) -> Scores:
    """S²FT-W: the norm of each unit's slice of the target matrix."""
    return {
        m: _per_unit(shape, m, layers, lambda s: unit_norms(s, slot_weight(model, s)))
        for m in config.targets
    }


def _device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


@contextmanager
def _observed_experts(
    model: nn.Module, shape: ModelShape, layers, observe: Callable
) -> Iterator[None]:
    """Within the block, every experts module of ``layers`` computes its routed loop with
    products that ``observe(layer, slot name, expert, input, output, tokens)`` sees."""
    installed = []
    for i, path, experts in experts_modules(model, shape, layers):

        def project(name, expert, x, tokens, experts=experts, layer=i, path=path):
            y = frozen_product(experts, name, expert, x)
            observe(layer, f"{path}.{name}", expert, x, y, tokens)
            return y

        route_through(experts, project)
        installed.append(experts)
    try:
        yield
    finally:
        for experts in installed:
            experts.__dict__.pop("forward", None)


@torch.no_grad()
def activation_scores(model, shape: ModelShape, config: S2FTConfig, layers, batches) -> Scores:
    """S²FT-A: mean |activation| of each unit over the calibration tokens: the input of
    its structure's consumer (o_proj, down_proj) on its columns; a token an expert does
    not receive counts as a zero activation of that expert's channels."""
    sums: dict[tuple[int, str, int | None], torch.Tensor] = {}
    tokens = 0
    mask: list[torch.Tensor] = []

    def add(key, values):
        sums[key] = sums.get(key, 0) + values.double()

    def recorder(key):
        def hook(module, args):
            x = args[0].abs().float()  # batch × tokens × width, or tokens × width
            add(key, mask[0].reshape(x.shape[:-1]).flatten() @ x.reshape(-1, x.shape[-1]))

        return hook

    def observe(layer, name, expert, x, y, routed):
        if name.endswith(".down_proj"):
            weights = mask[0].flatten()[routed]
            add((layer, name, expert), weights @ x.abs().float())

    consumers = [
        (i, s)
        for i in layers
        for structure in STRUCTURES
        for s in role_slots(shape, i, structure_consumer(structure))
        if s.expert is None
    ]
    handles = [
        model.get_submodule(s.path).register_forward_pre_hook(recorder((i, s.name, None)))
        for i, s in consumers
    ]
    was_training = model.training
    model.eval()
    try:
        with _observed_experts(model, shape, layers, observe):
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

    def consumer_input(layer: int, structure: str) -> torch.Tensor:
        """Mean |input| of the structure's consumer per column (every expert's in turn)."""
        pieces = []
        for slot in role_slots(shape, layer, structure_consumer(structure)):
            total = sums.get((layer, slot.name, slot.expert))
            width = slot.count * slot.width  # an expert no token reached: zeros
            pieces.append(total / tokens if total is not None else torch.zeros(width))
        return torch.cat([p.double().cpu() for p in pieces])

    scores = {}
    for m in config.targets:
        unit, rows = TARGETS[m].unit, []
        for i in layers:
            columns = consumer_input(i, TARGETS[m].structure)
            if unit is Unit.CHANNEL:  # the FFN intermediate value: down_proj's input
                rows.append(columns)
                continue
            # per query head: mean over its head_dim columns of o_proj's input
            per_head = columns.view(shape.num_heads, shape.head_dim).mean(1)
            if unit is Unit.KV_HEAD:  # a key/value head: the mean of its group
                per_head = per_head.view(shape.num_kv_heads, shape.group_size).mean(1)
            rows.append(per_head)
        scores[m] = torch.stack(rows)
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
    grads: dict[tuple[str, int | None], torch.Tensor] = {}

    def accumulate_into(key, x, output):
        x = x.detach()

        def accumulate(g):
            g2, x2 = g.reshape(-1, g.shape[-1]).float(), x.reshape(-1, x.shape[-1]).float()
            grads[key] = grads.get(key, 0) + g2.t() @ x2

        output.register_hook(accumulate)

    def recorder(key):
        def hook(module, args, output):
            accumulate_into(key, args[0], output)

        return hook

    flags = [(p, p.requires_grad) for p in model.parameters()]
    for p, _ in flags:
        p.requires_grad_(False)
    slots = [s for i in layers for m in config.targets for s in role_slots(shape, i, m)]
    wanted = {s.name for s in slots if s.expert is not None}  # the targeted experts tensors

    def observe(layer, name, expert, x, y, tokens):
        if y.requires_grad and name in wanted:
            accumulate_into((name, expert), x, y)

    handles = [
        model.get_submodule(path).register_forward_hook(recorder((name, None)))
        for path, name in sorted({(s.path, s.name) for s in slots if s.expert is None})
    ]
    was_training = model.training
    model.eval()
    embed = model.get_input_embeddings()
    try:
        with torch.enable_grad(), _observed_experts(model, shape, layers, observe):
            for batch in batches:  # even when called under no_grad
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

    def value(slot: Slot) -> torch.Tensor:
        grad = grads.get((slot.name, slot.expert))
        if grad is None:  # an expert no calibration token reached
            return torch.zeros(slot.count, dtype=torch.float64)
        return unit_norms(slot, grad)

    return {m: _per_unit(shape, m, layers, value) for m in config.targets}


Scorer = Callable[[nn.Module, ModelShape, S2FTConfig, list[int], Batches | None], Scores]
SCORERS: dict[str, Scorer] = {
    "random": random_scores,
    "weight": weight_scores,
    "activation": activation_scores,
    "weight_activation": weight_activation_scores,
    "gradient": gradient_scores,
}
