"""S²FT inside mixture-of-experts FFNs (paper §3, applied to every expert).

In transformers 5 the experts of a layer are one module holding two 3-D parameters,
``gate_up_proj`` (gate and up fused; ``up_proj`` where there is no gate) and
``down_proj``, one slice per expert, behind a router that sends each token to a few
experts. Each expert is an FFN of its own: its channels are coupled through its
gate/up rows and down columns exactly as a dense FFN's, so a unit of the FFN is one
channel of one expert, co-permuted within its expert (``permute.py``). The router stays
frozen.

:class:`S2Experts` wraps a frozen experts module: every expert's frozen products are the
module's own weights, and each expert with selected channels adds its own small delta by
the same partial back-propagation as a dense S² layer (``layers.add_delta``): the only
weight gradients that exist are those of the selected slices. The routed loop is
transformers' eager one (:func:`routed_forward`), reading the layout flags transformers
sets on every experts module (transposed, biased, gated).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import torch
import torch.nn.functional as F
from torch import nn

from .layers import (
    S2Layer,
    Update,
    add_delta,
    original_update,
    spans_of,
)
from .shapes import Matrix, ModelShape, expert_weight_axis, role_slots

# a product of one expert: (weight name, expert, its tokens' inputs, their token ids) -> out
Project = Callable[[str, int, torch.Tensor, torch.Tensor], torch.Tensor]


def up_name(experts: nn.Module) -> str:
    """The experts' producer weight: ``gate_up_proj``, or ``up_proj`` without a gate."""
    return "gate_up_proj" if getattr(experts, "has_gate", True) else "up_proj"


def frozen_product(experts: nn.Module, name: str, expert: int, x: torch.Tensor) -> torch.Tensor:
    """``x`` through expert ``expert``'s weight ``name`` (and its bias), as transformers'
    eager loop computes it."""
    weight = getattr(experts, name)[expert]
    y = x @ weight if getattr(experts, "is_transposed", False) else F.linear(x, weight)
    if getattr(experts, "has_bias", False):
        y = y + getattr(experts, f"{name}_bias")[expert]
    return y


def _routes(top_k_index: torch.Tensor, count: int, even: bool):
    """``(expert, positions in top-k, tokens)`` of every expert the router sends tokens
    to; ``even``: as many tokens to every expert, top-k × tokens / experts (a static
    routing, for tracing shapes without values: ``s2ft plan``)."""
    if even:
        tokens, k = top_k_index.shape
        share = -(-tokens * k // count)
        for expert in range(count):
            routed = (torch.arange(share, device=top_k_index.device) + expert * share) % tokens
            yield expert, torch.zeros_like(routed), routed
        return
    with torch.no_grad():
        mask = F.one_hot(top_k_index, num_classes=count + 1).permute(2, 1, 0)
        hit = torch.greater(mask.sum(dim=(-1, -2)), 0).nonzero()
    for expert in hit[:, 0].tolist():
        if expert != count:
            yield expert, *torch.where(mask[expert])


def routed_forward(
    experts: nn.Module,
    hidden_states: torch.Tensor,
    top_k_index: torch.Tensor,
    top_k_weights: torch.Tensor,
    project: Project,
    even: bool = False,
) -> torch.Tensor:
    """The experts' output for routed tokens: each expert hit reads its tokens, projects
    them up (``project``), gates, projects down and adds them back weighted, as
    transformers' eager experts forward does (``even``: see :func:`_routes`)."""
    final = torch.zeros_like(hidden_states)
    for expert, position, tokens in _routes(top_k_index, experts.num_experts, even):
        h = project(up_name(experts), expert, hidden_states[tokens], tokens)
        if getattr(experts, "has_gate", True):
            h = experts._apply_gate(h)
        else:
            h = experts.act_fn(h)
        y = project("down_proj", expert, h, tokens)
        if getattr(experts, "has_post_expert_norm", False):
            y = experts.post_expert_norm(y)
        y = y * top_k_weights[tokens, position, None]
        final.index_add_(0, tokens, y.to(final.dtype))
    return final


def experts_modules(
    model: nn.Module, shape: ModelShape, layers
) -> Iterator[tuple[int, str, nn.Module]]:
    """``(layer, path, module)`` of the experts module of each of ``layers`` (none in a
    dense model)."""
    if not shape.num_experts:
        return
    for layer in layers:
        path = role_slots(shape, layer, "down_proj")[0].path
        yield layer, path, model.get_submodule(path)


def route_through(module: nn.Module, project: Project | None = None, even: bool = False):
    """Make ``module`` (an experts module, or an :class:`S2Experts`) compute
    :func:`routed_forward` with ``project`` (default: its own products) until its
    instance ``forward`` is popped from ``module.__dict__``."""
    base = module.base if isinstance(module, S2Experts) else module
    if project is None and isinstance(module, S2Experts):
        project = module.project
    elif project is None:

        def project(name, expert, x, tokens):
            return frozen_product(base, name, expert, x)

    def forward(hidden_states, top_k_index, top_k_weights):
        return routed_forward(base, hidden_states, top_k_index, top_k_weights, project, even)

    module.__dict__["forward"] = forward


class ExpertDelta(nn.Module):
    """One expert's delta on one weight (a module, so that it is named ``….delta``)."""

    def __init__(self, delta: torch.Tensor, trainable: bool):
        super().__init__()
        self.delta = nn.Parameter(delta, requires_grad=trainable)


class S2Experts(S2Layer):
    """A frozen experts module whose experts carry deltas on some channels' rows (the
    gate/up weight) or columns (down): ``blocks[name][expert] = (index, original_index,
    delta)``, ids within the expert's ``(out, in)`` weight (``original_index`` in the
    model's original layout; ``delta`` None: zeros). The deltas are parameters
    ``<name>_deltas.<expert>.delta``; the state dict keeps the module's own weight
    names."""

    def __init__(
        self,
        base: nn.Module,
        blocks: dict[str, dict[int, tuple]],
        trainable: bool = True,
        delta_dtype: torch.dtype = torch.float32,
    ):
        super().__init__()
        self._wrap(base)
        self.transposed = bool(getattr(base, "is_transposed", False))
        self.slices: dict[str, dict[int, tuple]] = {}
        self._reached: set[int] = set()  # the experts the current forward reached
        for name, per_expert in blocks.items():
            weight = getattr(base, name)
            out_in = weight.shape[1:][::-1] if self.transposed else weight.shape[1:]
            axis = expert_weight_axis(name)
            deltas = nn.ModuleDict()
            self.slices[name] = {}
            for expert, (index, original, delta) in sorted(per_expert.items()):
                index = index.to(device="cpu", dtype=torch.long)
                size = (len(index), out_in[1]) if axis == "rows" else (out_in[0], len(index))
                if delta is None:
                    delta = torch.zeros(size, dtype=delta_dtype, device=weight.device)
                deltas[str(expert)] = ExpertDelta(delta.to(weight.device), trainable)
                device_index = index.to(weight.device)
                self.slices[name][expert] = (device_index, original.cpu(), spans_of(index))
            self.register_module(f"{name}_deltas", deltas)

    def __getattr__(self, name: str):
        """The wrapped module's attributes (its weights, ``num_experts``, its flags)."""
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(super().__getattr__("base"), name)

    def delta(self, name: str, expert: int) -> nn.Parameter:
        return getattr(self, f"{name}_deltas")[str(expert)].delta

    def forward(self, hidden_states, top_k_index, top_k_weights):
        self._reached = set()
        out = routed_forward(self.base, hidden_states, top_k_index, top_k_weights, self.project)
        if not torch.is_grad_enabled():
            return out
        idle = [
            d for n, per in self.slices.items() for e in per if e not in self._reached
            for d in (self.delta(n, e),) if d.requires_grad
        ]  # fmt: skip
        if idle:
            # Every delta gets a gradient every step, zero for an expert no token reached:
            # one process and many (DDP, FSDP: ranks route differently) update the same
            # parameters alike.
            out = out + sum(d.sum() for d in idle) * 0
        return out

    def project(self, name: str, expert: int, x: torch.Tensor, tokens) -> torch.Tensor:
        self._reached.add(expert)
        y = frozen_product(self.base, name, expert, x)
        entry = self.slices.get(name, {}).get(expert)
        if entry is None:
            return y
        index, _, spans = entry
        return add_delta(y, x, self.delta(name, expert), expert_weight_axis(name), index, spans)

    def deltas(self) -> list[nn.Parameter]:
        return [self.delta(n, e) for n, per in self.slices.items() for e in per]

    def _updates(self, original: bool) -> dict[str, Update]:
        """Per weight, the deltas of every expert as one update of the weight's
        :class:`~.shapes.Matrix` (experts stacked along the stored axis)."""
        out = {}
        for name, per_expert in self.slices.items():
            stored = getattr(self.base, name).shape[1:]
            pieces = []
            for expert, (index, original_index, _) in per_expert.items():
                ids = original_index if original else index.cpu()
                pieces.append(
                    (expert, original_update(
                        expert_weight_axis(name), ids, self.delta(name, expert), self.transposed
                    ))
                )  # fmt: skip
            axis = pieces[0][1].axis
            length = stored[0] if axis == "rows" else stored[1]
            index = torch.cat([u.index + e * length for e, u in pieces])
            delta = torch.cat([u.delta for _, u in pieces], 0 if axis == "rows" else 1)
            out[name] = Update(axis, index, delta)
        return out

    def updates(self, path: str) -> dict[str, Update]:
        return {f"{path}.{name}": u for name, u in self._updates(original=True).items()}

    def weight_names(self, path: str) -> list[str]:
        return [f"{path}.{name}" for name in self.slices]

    @torch.no_grad()
    def merge(self) -> nn.Module:
        for name, u in self._updates(original=False).items():
            Matrix(getattr(self.base, name), u.axis).add_(u.dim, u.index, u.delta)
        return self.unload()

    def extra_repr(self) -> str:
        return ", ".join(
            f"{name}: deltas in {len(per)} experts" for name, per in self.slices.items()
        )
