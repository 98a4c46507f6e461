"""Many adapters on one base model in one batch: each sequence with its own (paper §5).

An S²FT update is a few rows or columns of a matrix, so serving several fine-tuned
variants needs one copy of the base weights: every adapted matrix computes the frozen
product once for the whole batch and adds, for the sequences routed to an adapter, that
adapter's small product on its rows/columns.

    model = serve_adapters(base, {"math": "runs/math/adapter", "qa": "runs/qa/adapter"})
    with adapters_per_sequence(model, ["math", None, "qa", "math"]):
        out = model.generate(input_ids, attention_mask=mask, max_new_tokens=64)

Beam search and ``num_return_sequences`` repeat each sequence k times in a row
(``repeat_interleave``); the routes follow.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from .adapter import Adapter, Update
from .errors import S2FTError
from .models import replace_module


@dataclass(frozen=True)
class Routing:
    """Which sequences of a batch of ``size`` use which adapter (batch positions)."""

    size: int
    rows: dict[str, torch.Tensor]

    def for_batch(self, batch: int) -> dict[str, torch.Tensor]:
        """The positions in a batch that holds each sequence ``batch // size`` times in a
        row (beam search, ``num_return_sequences``)."""
        if batch == self.size:
            return self.rows
        if batch % self.size:
            raise S2FTError(
                f"A batch of {batch} rows does not fit the {self.size} sequences given to "
                "adapters_per_sequence(); name one adapter (or None) per sequence."
            )
        k = batch // self.size
        return {
            name: (rows[:, None] * k + torch.arange(k, device=rows.device)).flatten()
            for name, rows in self.rows.items()
        }


class MultiAdapterLinear(nn.Module):
    """A frozen linear layer plus, per adapter name, an :class:`Update` of its rows or
    columns, applied to the sequences routed to that adapter. The wrapped layer's
    ``weight`` and ``bias`` stay its own parameters (state-dict names unchanged)."""

    def __init__(self, base: nn.Linear):
        super().__init__()
        self.in_features, self.out_features = base.in_features, base.out_features
        self.weight, self.bias = base.weight, base.bias
        self.updates: dict[str, Update] = {}
        self.routing: Routing | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.linear(x, self.weight, self.bias)
        if self.routing is None:
            return y
        for name, rows in self.routing.for_batch(x.shape[0]).items():
            u = self.updates.get(name)
            if u is None:  # this adapter leaves this matrix alone
                continue
            xs = x.index_select(0, rows)
            delta = u.delta.to(y.dtype)
            if u.axis == "cols":
                y.index_add_(0, rows, F.linear(xs.index_select(-1, u.index), delta))
            else:
                ys = y.index_select(0, rows).index_add_(-1, u.index, F.linear(xs, delta))
                y.index_copy_(0, rows, ys)
        return y

    def plain(self) -> nn.Linear:
        """The wrapped linear layer again, on the same parameters."""
        linear = nn.Linear(
            self.in_features, self.out_features, bias=self.bias is not None, device="meta"
        )
        linear.weight, linear.bias = self.weight, self.bias
        return linear

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, "
            f"adapters={sorted(self.updates)}"
        )


def _serving_layers(model: nn.Module) -> dict[str, MultiAdapterLinear]:
    return {n: m for n, m in model.named_modules() if isinstance(m, MultiAdapterLinear)}


def serve_adapters(
    model: nn.Module, adapters: dict[str, Adapter | str | Path], force: bool = False
) -> nn.Module:
    """Make ``model`` serve the named adapters, each checked against it first; the base
    weights are shared and untouched. Returns the model (changed in place)."""
    loaded = {}
    for name, adapter in adapters.items():
        if not isinstance(adapter, Adapter):
            adapter = Adapter.load(adapter)
        adapter.check_base(model, force)
        loaded[name] = adapter
    device = next(model.parameters()).device
    layers = _serving_layers(model)
    for name, adapter in loaded.items():
        for module_name, u in adapter.updates.items():
            layer = layers.get(module_name)
            if layer is None:
                layer = MultiAdapterLinear(model.get_submodule(module_name))
                replace_module(model, module_name, layer)
                layers[module_name] = layer
            layer.updates[name] = Update(u.axis, u.index.to(device), u.delta.to(layer.weight))
    model.s2ft_served = sorted({*getattr(model, "s2ft_served", []), *loaded})
    return model


def stop_serving(model: nn.Module) -> nn.Module:
    """Drop every served adapter: plain linear layers on the untouched base weights."""
    layers = _serving_layers(model)
    if not layers:
        raise S2FTError("This model serves no S²FT adapters.")
    for name, layer in layers.items():
        replace_module(model, name, layer.plain())
    del model.s2ft_served
    return model


@contextmanager
def adapters_per_sequence(model: nn.Module, names: list[str | None]) -> Iterator[nn.Module]:
    """Within the block, sequence ``i`` of every batch given to ``model`` (``forward`` or
    ``generate``) uses adapter ``names[i]`` (None: the base model)."""
    served = set(getattr(model, "s2ft_served", []))
    unknown = sorted({n for n in names if n is not None} - served)
    if unknown:
        raise S2FTError(
            f"Adapter {unknown[0]!r} is not served by this model; serve_adapters() it first "
            f"(served: {', '.join(sorted(served)) or 'none'})."
        )
    layers = _serving_layers(model)
    device = next(model.parameters()).device
    rows = {
        name: torch.tensor([i for i, n in enumerate(names) if n == name], device=device)
        for name in served
        if name in names
    }
    routing = Routing(len(names), rows)
    for layer in layers.values():
        layer.routing = routing
    try:
        yield model
    finally:
        for layer in layers.values():
            layer.routing = None
