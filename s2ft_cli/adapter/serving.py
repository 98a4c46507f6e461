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
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from ..engine.layers import linear_on
from ..engine.models import replace_module
from ..engine.state import state_of
from ..errors import S2FTError
from .format import Adapter, Update


@dataclass(frozen=True)
class Routing:
    """Which sequences of a batch of ``size`` use which adapter (batch positions)."""

    size: int
    rows: dict[str, torch.Tensor]
    _expanded: dict = field(default_factory=dict, repr=False, compare=False)

    def for_batch(self, batch: int, device: torch.device) -> dict[str, torch.Tensor]:
        """The positions, on ``device``, in a batch that holds each sequence
        ``batch // size`` times in a row (beam search, ``num_return_sequences``)."""
        key = (batch, device)
        if key not in self._expanded:
            if batch % self.size:
                raise S2FTError(
                    f"A batch of {batch} rows does not fit the {self.size} sequences given to "
                    "adapters_per_sequence(); name one adapter (or None) per sequence."
                )
            k = batch // self.size
            self._expanded[key] = {
                name: (rows[:, None] * k + torch.arange(k)).flatten().to(device)
                for name, rows in self.rows.items()
            }
        return self._expanded[key]


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
        for name, rows in self.routing.for_batch(x.shape[0], x.device).items():
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

    def _apply(self, fn, recurse=True):
        """``.to()``, ``.cuda()``, ``.half()``: the served updates follow the weights (the
        ids keep their dtype, as ``fn`` converts floating-point tensors only)."""
        super()._apply(fn, recurse)
        self.updates = {
            name: Update(u.axis, fn(u.index), fn(u.delta)) for name, u in self.updates.items()
        }
        return self

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
    state = state_of(model)
    state.check("serve")
    twice = sorted(set(adapters) & set(state.served))
    if twice:
        raise S2FTError(f"An adapter named {twice[0]!r} is served already; choose another name.")
    loaded = {}
    for name, adapter in adapters.items():
        if not isinstance(adapter, Adapter):
            adapter = Adapter.load(adapter)
        adapter.check_base(model, force)
        loaded[name] = adapter
    layers = _serving_layers(model)
    for name, adapter in loaded.items():
        for module_name, u in adapter.updates.items():
            layer = layers.get(module_name)
            if layer is None:
                layer = MultiAdapterLinear(model.get_submodule(module_name))
                replace_module(model, module_name, layer)
                layers[module_name] = layer
            index = u.index.to(layer.weight.device)
            layer.updates[name] = Update(u.axis, index, u.delta.to(layer.weight))
    state.served = sorted({*state.served, *loaded})
    return model


def stop_serving(model: nn.Module) -> nn.Module:
    """Drop every served adapter: plain linear layers on the untouched base weights."""
    state = state_of(model)
    state.check("stop_serving")
    for name, layer in _serving_layers(model).items():
        replace_module(model, name, linear_on(layer.weight, layer.bias))
    state.served = []
    return model


@contextmanager
def adapters_per_sequence(model: nn.Module, names: list[str | None]) -> Iterator[nn.Module]:
    """Within the block, sequence ``i`` of every batch given to ``model`` (``forward`` or
    ``generate``) uses adapter ``names[i]`` (None: the base model). The routing is state
    of the model's layers: one block at a time per model (not thread-safe)."""
    served = set(state_of(model).served)
    unknown = sorted({n for n in names if n is not None} - served)
    if unknown:
        raise S2FTError(
            f"Adapter {unknown[0]!r} is not served by this model; serve_adapters() it first "
            f"(served: {', '.join(sorted(served)) or 'none'})."
        )
    if not names:
        raise S2FTError("adapters_per_sequence() needs one adapter name (or None) per sequence.")
    layers = _serving_layers(model)
    rows = {
        name: torch.tensor([i for i, n in enumerate(names) if n == name])
        for name in served
        if name in names
    }
    routing = Routing(len(names), rows)
    outer = {n: layer.routing for n, layer in layers.items()}
    for layer in layers.values():
        layer.routing = routing
    try:
        yield model
    finally:
        for n, layer in layers.items():
            layer.routing = outer[n]
