"""Many adapters on one base model in one batch: each sequence with its own (paper §5).

An S²FT update is a few rows or columns of a matrix, so serving several fine-tuned
variants needs one copy of the base weights: every adapted matrix computes the frozen
product once for the whole batch and adds, for the sequences routed to an adapter, that
adapter's small product on its rows/columns.

    model = serve_adapters(base, {"math": "runs/math/adapter", "qa": "runs/qa/adapter"})
    with adapters_per_sequence(model, ["math", None, "qa", "math"]):
        out = model.generate(input_ids, attention_mask=mask, max_new_tokens=64)

Beam search and ``num_return_sequences`` repeat each sequence k times in a row
(``repeat_interleave``); the routes follow. Every family's weights serve so (fused ones,
GPT-2's Conv1D); in a mixture-of-experts layer each routed token adds its sequence's
adapter's delta of the experts it reaches.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from ..engine.experts import frozen_product, routed_forward
from ..engine.layers import Update, load_names_of_base, state_dict_names_of_base
from ..engine.shapes import get_family, place_of, replace_module
from ..engine.state import state_of
from ..errors import S2FTError
from .format import Adapter


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


def _add_to_rows(y: torch.Tensor, x: torch.Tensor, rows: torch.Tensor, u: Update) -> None:
    """``y[rows] += x[rows]``'s product with the update (``(out, in)`` orientation), in
    place: the rows of a batch routed to one adapter."""
    xs, delta = x.index_select(0, rows), u.delta.to(y.dtype)
    if u.axis == "cols":
        y.index_add_(0, rows, F.linear(xs.index_select(-1, u.index), delta))
    else:
        ys = y.index_select(0, rows).index_add_(-1, u.index, F.linear(xs, delta))
        y.index_copy_(0, rows, ys)


class MultiAdapterLinear(nn.Module):
    """A frozen linear module plus, per adapter name, an :class:`Update` of its rows or
    columns (``(out, in)`` orientation), applied to the sequences routed to that adapter.
    The frozen product is the module's own forward (a Conv1D's too); the state dict keeps
    the wrapped module's names."""

    def __init__(self, base: nn.Module, transposed: bool = False):
        super().__init__()
        self.base, self.transposed = base, transposed
        self.updates: dict[str, Update] = {}
        self.routing: Routing | None = None
        self.register_state_dict_post_hook(state_dict_names_of_base)
        self.register_load_state_dict_pre_hook(load_names_of_base)

    @property
    def weight(self) -> torch.Tensor:
        return self.base.weight

    def add(self, name: str, u: Update) -> None:
        """Serve an adapter's update of this weight (stored orientation)."""
        u = u.oriented(self.transposed)
        self.updates[name] = Update(u.axis, u.index.to(self.weight.device), u.delta.to(self.weight))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base(x)
        if self.routing is None:
            return y
        for name, rows in self.routing.for_batch(x.shape[0], x.device).items():
            u = self.updates.get(name)
            if u is not None:  # else this adapter leaves this matrix alone
                _add_to_rows(y, x, rows, u)
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
        return f"adapters={sorted(self.updates)}"


class MultiAdapterExperts(nn.Module):
    """A frozen experts module plus, per adapter name, per weight and expert, an update of
    the expert's channels, applied to the tokens of the sequences routed to that adapter.
    The batch's shape comes from the MoE block around it (a pre-hook on ``block`` sets
    ``batch_shape``), so that each token of the experts' flattened input has its
    sequence."""

    def __init__(self, base: nn.Module, block: nn.Module):
        super().__init__()
        self.base = base
        self.transposed = bool(getattr(base, "is_transposed", False))
        self.updates: dict[str, dict[tuple[str, int], Update]] = {}
        self.routing: Routing | None = None
        self.batch_shape = (1, 1)
        self.hook = block.register_forward_pre_hook(self._read_batch_shape)
        self.register_state_dict_post_hook(state_dict_names_of_base)
        self.register_load_state_dict_pre_hook(load_names_of_base)

    def _read_batch_shape(self, block, args) -> None:
        self.batch_shape = tuple(args[0].shape[:2])

    def add(self, name: str, param: str, u: Update) -> None:
        """Serve an adapter's update of the experts tensor ``param`` (its experts stacked)."""
        weight = getattr(self.base, param)
        length = weight.shape[1 + u.dim]
        per_expert = self.updates.setdefault(name, {})
        for expert, local in u.per_expert(length).items():
            local = local.oriented(self.transposed)
            index = local.index.to(weight.device)
            per_expert[(param, expert)] = Update(local.axis, index, local.delta.to(weight))

    def forward(self, hidden_states, top_k_index, top_k_weights):
        return routed_forward(self.base, hidden_states, top_k_index, top_k_weights, self.project)

    def _apply(self, fn, recurse=True):
        """``.to()``, ``.cuda()``, ``.half()``: the served updates follow the weights, as
        :meth:`MultiAdapterLinear._apply`'s."""
        super()._apply(fn, recurse)
        self.updates = {
            name: {key: Update(u.axis, fn(u.index), fn(u.delta)) for key, u in per.items()}
            for name, per in self.updates.items()
        }
        return self

    def project(self, param: str, expert: int, x: torch.Tensor, tokens) -> torch.Tensor:
        y = frozen_product(self.base, param, expert, x)
        if self.routing is None:
            return y
        batch, length = self.batch_shape
        sequence = tokens // length
        for name, seqs in self.routing.for_batch(batch, x.device).items():
            u = self.updates.get(name, {}).get((param, expert))
            if u is None:  # this adapter leaves this expert's weight alone
                continue
            mine = torch.isin(sequence, seqs).nonzero()[:, 0]
            if len(mine):
                _add_to_rows(y, x, mine, u)
        return y

    def extra_repr(self) -> str:
        return f"adapters={sorted(self.updates)}"


def _serving_layers(model: nn.Module) -> dict[str, nn.Module]:
    return {
        n: m
        for n, m in model.named_modules()
        if isinstance(m, MultiAdapterLinear | MultiAdapterExperts)
    }


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
    family = get_family(model)
    for name, adapter in loaded.items():
        for weight, u in adapter.updates.items():
            place = place_of(family, weight)
            experts = place is not None and place.experts
            path, _, param = weight.rpartition(".") if experts else (weight, "", "")
            layer = layers.get(path)
            if layer is None:
                module = model.get_submodule(path)
                if experts:
                    layer = MultiAdapterExperts(
                        module, model.get_submodule(path.rpartition(".")[0])
                    )
                else:
                    layer = MultiAdapterLinear(module, place is not None and place.transposed)
                replace_module(model, path, layer)
                layers[path] = layer
            if experts:
                layer.add(name, param, u)
            else:
                layer.add(name, u)
    state.served = sorted({*state.served, *loaded})
    return model


def stop_serving(model: nn.Module) -> nn.Module:
    """Drop every served adapter: the model's own layers, on the untouched base weights."""
    state = state_of(model)
    state.check("stop_serving")
    for name, layer in _serving_layers(model).items():
        if isinstance(layer, MultiAdapterExperts):
            layer.hook.remove()
        replace_module(model, name, layer.base)
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
