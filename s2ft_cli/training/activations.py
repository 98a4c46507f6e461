"""The activations one training step saves for the backward pass, traced without weights
or memory (``s2ft plan``).

A converted meta-device model gets fake tensors (``torch._subclasses.FakeTensorMode``: shapes
and dtypes, no storage) for its parameters and buffers, and its decoder reads one batch of
fake token ids while ``saved_tensors_hooks`` record every tensor autograd keeps (the
weights a product saves aside): the same
operations, in the same order, as a real step, so every family's blocks (sandwich norms,
q/k norms, fused weights, S² layers, an FFN's recomputed activation) are counted as they
are. Each distinct storage counts once, attributed to the decoder layer that saved it
first. Data-dependent routing cannot be traced without values: a mixture-of-experts layer
sends every expert as many tokens, top-k × tokens / experts (``experts._routes``). The
loss's own saved set, the gradient of the target positions' hidden states, is added by
``memory.py``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ..engine.experts import experts_modules, route_through
from ..engine.shapes import decoder_layers, model_shape


@dataclass
class SavedActivations:
    """Bytes saved for backward per decoder layer, and outside the layers (embeddings,
    final norm)."""

    per_layer: list[int]
    outside: int

    @property
    def total(self) -> int:
        return sum(self.per_layer) + self.outside


def _fake_tensors(model: nn.Module, mode) -> None:
    """Every parameter and buffer of a meta-device model replaced by a fake CPU tensor of
    its shape and dtype (a tied weight stays one tensor)."""
    made: dict[int, torch.Tensor] = {}  # by the id of the (live) tensor replaced

    def fake(t: torch.Tensor) -> torch.Tensor:
        if id(t) not in made:
            with mode:
                new = torch.empty(t.shape, dtype=t.dtype, device="cpu")
            made[id(t)] = nn.Parameter(new, t.requires_grad) if isinstance(t, nn.Parameter) else new
        return made[id(t)]

    for module in model.modules():
        for kind in (module._parameters, module._buffers):
            for name, t in list(kind.items()):
                if t is not None:
                    kind[name] = fake(t)


def _even_experts(model: nn.Module) -> None:
    """Every experts module routes evenly (see the module docstring)."""
    shape = model_shape(model)
    for _, _, module in experts_modules(model, shape, range(shape.num_layers)):
        route_through(module, even=True)


def trace_saved(model: nn.Module, batch_size: int, seq_len: int) -> SavedActivations:
    """What one step of ``model`` (converted on the meta device; its tensors are replaced)
    saves for backward on a batch of ``batch_size`` × ``seq_len`` tokens."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    mode = FakeTensorMode(allow_non_fake_inputs=True)
    _fake_tensors(model, mode)
    _even_experts(model)
    layers = list(decoder_layers(model))
    current: list[int | None] = [None]
    # the weights a product saves for the input's gradient are no activations
    seen = {p.untyped_storage()._cdata for p in model.parameters()}
    per_layer = [0] * len(layers)
    outside = [0]

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        if storage._cdata not in seen:
            seen.add(storage._cdata)
            if current[0] is None:
                outside[0] += storage.nbytes()
            else:
                per_layer[current[0]] += storage.nbytes()
        return t

    def enter(index):
        return lambda module, args, kwargs: current.__setitem__(0, index)

    handles = [
        layer.register_forward_pre_hook(enter(i), with_kwargs=True)
        for i, layer in enumerate(layers)
    ]
    handles += [
        layer.register_forward_hook(lambda *args: current.__setitem__(0, None)) for layer in layers
    ]
    model.train()
    try:
        # Real token ids: what transformers computes from the inputs alone (positions, the
        # choice of attention path) is real too, as in training; a padded batch's mask is
        # fake, so that it is built, as for padding, without its B × S² bytes.
        inputs = {"input_ids": torch.zeros(batch_size, seq_len, dtype=torch.long)}
        if batch_size > 1:
            with mode:
                inputs["attention_mask"] = torch.ones(batch_size, seq_len, dtype=torch.long)
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            model.get_decoder()(**inputs, use_cache=False)
    finally:
        for h in handles:
            h.remove()
    return SavedActivations(per_layer, outside[0])
