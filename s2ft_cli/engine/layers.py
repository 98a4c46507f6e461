"""S² linear layers: any frozen linear module plus a delta on some of its rows or columns.

Training (paper §3.3, partial back-propagation): after co-permutation the trainable units
of a matrix are one contiguous block, so the forward pass is the frozen product plus a
small dense product with the delta, and the backward pass computes the weight gradient
of the block alone. The frozen product is the wrapped module's own forward (a dense
``nn.Linear``, GPT-2's ``Conv1D``, or a quantized or sharded linear layer): its parameters
never require grad,
so autograd through it forms the input's gradient of the frozen part and no weight
gradient. The delta path is a small autograd function that adds to that product in place:

* column block of a consumer (o_proj, down_proj): ``y += x[..., s:e] Δᵀ``,
  ``dΔ = gᵀ x[..., s:e]`` and ``dx[..., s:e] += g Δ``; only that slice of the input is
  saved, as its own tensor, so the full input is not kept alive by a view;
* row block of a producer (q/k/v, gate/up): ``y[..., s:e] += x Δᵀ``,
  ``dΔ = g[..., s:e]ᵀ x`` and ``dx += g[..., s:e] Δ``; the input is saved.

A block may be several runs ``s:e`` (the q and v heads of a fused qkv_proj, GPT-NeoX's
heads interleaved with their keys and values); the experts of a mixture-of-experts layer
use the same functions per expert (``experts.py``).

The delta is an ordinary ``nn.Parameter``: any optimizer, gradient clipping, gradient
accumulation or DDP works unchanged, and no full weight gradient is ever formed.

Serving an adapter unfused uses the same layer with arbitrary (original-layout) rows or
columns, gathered and scattered by index.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.distributed.tensor import DTensor
from transformers.pytorch_utils import Conv1D

from ..errors import S2FTError
from .shapes import flip

# A run of a delta: rows or columns ``start .. stop`` of the frozen product, the delta's
# rows (row blocks) or columns (column blocks) from ``offset`` on.
Span = tuple[int, int, int]


class _ColumnBlockDelta(torch.autograd.Function):
    """``y += x[..., spans] Δᵀ`` in place on the frozen product ``y``; saves the spans'
    columns of ``x`` (their own tensor) and gives gradients for x (those columns) and Δ
    only."""

    @staticmethod
    def forward(ctx, y, x, delta, spans):
        dtype = y.dtype
        with torch.autocast(x.device.type, enabled=False):
            pieces = [x[..., start:stop] for start, stop, _ in spans]
            x_block = (pieces[0] if len(pieces) == 1 else torch.cat(pieces, -1)).to(dtype)
            x_block = x_block.contiguous()
            width = x_block.shape[-1]
            y.view(-1, y.shape[-1]).addmm_(x_block.view(-1, width), delta.to(dtype).t())
        ctx.mark_dirty(y)
        ctx.save_for_backward(x_block if delta.requires_grad else None, delta)
        ctx.spans, ctx.x_shape, ctx.x_dtype = spans, x.shape, x.dtype
        return y

    @staticmethod
    def backward(ctx, grad_out):
        x_block, delta = ctx.saved_tensors
        g = grad_out.reshape(-1, grad_out.shape[-1])
        grad_x = grad_delta = None
        if ctx.needs_input_grad[1]:
            grad_x = grad_out.new_zeros(ctx.x_shape, dtype=ctx.x_dtype)
            block = (g @ delta.to(g.dtype)).view(*grad_out.shape[:-1], delta.shape[1])
            for start, stop, offset in ctx.spans:
                grad_x[..., start:stop] = block[..., offset : offset + stop - start]
        if ctx.needs_input_grad[2]:
            x2d = x_block.reshape(-1, x_block.shape[-1]).to(g.dtype)
            grad_delta = (g.t() @ x2d).to(delta.dtype)
        return grad_out, grad_x, grad_delta, None


class _RowBlockDelta(torch.autograd.Function):
    """``y[..., spans] += x Δᵀ`` in place on the frozen product ``y``; saves ``x`` (in the
    compute dtype) and gives gradients for x and Δ only."""

    @staticmethod
    def forward(ctx, y, x, delta, spans):
        dtype = y.dtype
        with torch.autocast(x.device.type, enabled=False):
            xc = x.to(dtype)
            x2d, y2d, d = xc.reshape(-1, xc.shape[-1]), y.view(-1, y.shape[-1]), delta.to(dtype)
            for start, stop, offset in spans:
                y2d[:, start:stop].addmm_(x2d, d[offset : offset + stop - start].t())
        ctx.mark_dirty(y)
        ctx.save_for_backward(xc if delta.requires_grad else None, delta)
        ctx.spans, ctx.x_dtype = spans, x.dtype
        return y

    @staticmethod
    def backward(ctx, grad_out):
        x, delta = ctx.saved_tensors
        g = grad_out.reshape(-1, grad_out.shape[-1])
        pieces = [g[:, start:stop] for start, stop, _ in ctx.spans]
        g_block = pieces[0] if len(pieces) == 1 else torch.cat(pieces, 1)
        grad_x = grad_delta = None
        if ctx.needs_input_grad[1]:
            grad_x = (g_block @ delta.to(g_block.dtype)).view(*grad_out.shape[:-1], -1)
            grad_x = grad_x.to(ctx.x_dtype)
        if ctx.needs_input_grad[2]:
            x2d = x.reshape(-1, x.shape[-1]).to(g_block.dtype)
            grad_delta = (g_block.t() @ x2d).to(delta.dtype)
        return grad_out, grad_x, grad_delta, None


# Above this many runs an index is applied by gathering and scattering (an adapter loaded
# in the original layout, channels scattered over the matrix) rather than run by run.
MAX_SPANS = 64


def spans_of(index: torch.Tensor) -> tuple[Span, ...] | None:
    """The runs of consecutive ids in ``index`` (in its order), or None if there are more
    than ``MAX_SPANS``."""
    ids = index.tolist()
    spans, offset = [], 0
    for k in range(1, len(ids) + 1):
        if k == len(ids) or ids[k] != ids[k - 1] + 1:
            length = k - offset
            spans.append((ids[offset], ids[offset] + length, offset))
            offset = k
            if len(spans) > MAX_SPANS:
                return None
    return tuple(spans) if spans else None


def add_delta(
    y: torch.Tensor,
    x: torch.Tensor,
    delta: torch.Tensor,
    axis: str,
    index: torch.Tensor,
    spans: tuple[Span, ...] | None,
) -> torch.Tensor:
    """The frozen product ``y`` of ``x`` plus the delta path: ``y[..., index] += x Δᵀ``
    (``axis`` rows) or ``y += x[..., index] Δᵀ`` (cols). By spans in place on ``y`` (a
    fresh product nothing saved), else by gathering and scattering; either way the
    backward pass forms Δ's gradient alone (paper §3.3)."""
    if spans is not None:
        fn = _RowBlockDelta if axis == "rows" else _ColumnBlockDelta
        return fn.apply(y, x, delta, spans)
    delta = delta.to(y.dtype)
    if axis == "cols":
        return y + F.linear(x.index_select(-1, index), delta)
    return y.index_add(-1, index, F.linear(x, delta))


@dataclass
class Update:
    """The rows (``axis="rows"``) or columns (``"cols"``) of one stored weight an adapter
    changes, in the original layout: ``W[index] += delta`` or ``W[:, index] += delta``
    (``W``: the weight as a :class:`~.shapes.Matrix`)."""

    axis: str
    index: torch.Tensor
    delta: torch.Tensor

    @property
    def dim(self) -> int:
        return 0 if self.axis == "rows" else 1

    def oriented(self, transposed: bool) -> Update:
        """This update of a stored weight in the ``(out, in)`` orientation: a weight stored
        ``(in, out)`` (``transposed``) has its axis and delta turned."""
        return Update(flip(self.axis), self.index, self.delta.t()) if transposed else self

    def per_expert(self, length: int, experts: int | None = None) -> dict[int, Update]:
        """An update of a 3-D experts tensor (experts stacked along the axis, ``length``
        rows or columns each) split per expert, ids within the expert: the experts it
        touches, or every one of ``experts`` (empty updates where it touches none)."""
        owner = self.index // length
        ids = range(experts) if experts is not None else owner.unique().tolist()
        out = {}
        for expert in ids:
            mine = owner == expert
            delta = self.delta[mine] if self.axis == "rows" else self.delta[:, mine]
            out[expert] = Update(self.axis, self.index[mine] % length, delta)
        return out


def original_update(
    axis: str, index: torch.Tensor, delta: torch.Tensor, transposed: bool
) -> Update:
    """An :class:`Update` of a stored weight from a delta in the ``(out, in)`` orientation
    at original-layout ``index``: ids in ascending order, and the delta transposed with
    its axis for a weight stored ``(in, out)``."""
    order = torch.argsort(index)
    delta = full_tensor(delta.detach())  # every process gathers a sharded one
    delta = delta[order.to(delta.device)] if axis == "rows" else delta[:, order.to(delta.device)]
    update = Update(axis, index[order].contiguous(), delta).oriented(transposed)
    return Update(update.axis, update.index, update.delta.contiguous())


class S2Layer(nn.Module):
    """What every S² layer offers the adapter stage: its updates in the original layout,
    merging them into its dense weights, and giving back the wrapped module."""

    def updates(self, path: str) -> dict[str, Update]:
        """This layer's deltas as updates of the stored weights, by adapter name (the
        layer sits at ``path``): every process must call it for a sharded delta."""
        raise NotImplementedError

    def weight_names(self, path: str) -> list[str]:
        """The adapter names of the stored weights it changes (no delta is read)."""
        raise NotImplementedError

    def merge(self) -> nn.Module:
        raise NotImplementedError

    def deltas(self) -> list[nn.Parameter]:
        raise NotImplementedError

    def _wrap(self, base: nn.Module) -> None:
        """Hold ``base`` frozen while the deltas are attached (:meth:`unload` gives its
        flags back); the state dict keeps ``base``'s own names."""
        self.base = base
        self._base_requires_grad = [p.requires_grad for p in base.parameters()]
        base.requires_grad_(False)
        self.register_state_dict_post_hook(state_dict_names_of_base)
        self.register_load_state_dict_pre_hook(load_names_of_base)

    def unload(self) -> nn.Module:
        """Drop the deltas: the wrapped module, its parameters untouched and their
        ``requires_grad`` flags as they were before wrapping."""
        for p, flag in zip(self.base.parameters(), self._base_requires_grad, strict=False):
            p.requires_grad_(flag)
        return self.base


# Modules whose product s2ft knows: a fresh tensor (a Conv1D's is a plain view of one).
OWN_VIEWS = (nn.Linear, Conv1D)


class _Recast:
    """A saved cast of a frozen weight, cast again when the backward pass needs it."""

    __slots__ = ("weight", "dtype", "transposed")

    def __init__(self, weight: torch.Tensor, dtype: torch.dtype, transposed: bool):
        self.weight, self.dtype, self.transposed = weight, dtype, transposed


def _unpack(saved):
    if isinstance(saved, _Recast):
        w = saved.weight.detach().to(saved.dtype)
        return w.t() if saved.transposed else w
    return saved


def _is_delta(name: str) -> bool:
    """Whether a state-dict entry (relative to an S² layer) is one of its deltas:
    ``delta``, or an experts layer's ``<weight>_deltas.<expert>.delta``."""
    first = name.split(".", 1)[0]
    return first == "delta" or first.endswith("_deltas")


def state_dict_names_of_base(module, state_dict, prefix, local_metadata) -> None:
    """State-dict post-hook: the wrapped module's entries under the layer's own name
    (``o_proj.weight``, not ``o_proj.base.weight``), then the deltas."""
    inner = prefix + "base."
    for key in [k for k in state_dict if k.startswith(inner)]:
        state_dict[prefix + key[len(inner) :]] = state_dict.pop(key)
    for key in [k for k in state_dict if k.startswith(prefix) and _is_delta(k[len(prefix) :])]:
        state_dict[key] = state_dict.pop(key)


def load_names_of_base(module, state_dict, prefix, *args) -> None:
    """Load-state-dict pre-hook, the inverse of :func:`state_dict_names_of_base`."""
    for key in [k for k in state_dict if k.startswith(prefix)]:
        name = key[len(prefix) :]
        if not _is_delta(name) and name.split(".", 1)[0] != "base":
            state_dict[prefix + "base." + name] = state_dict.pop(key)


class S2Linear(S2Layer):
    """A frozen linear module ``base`` whose rows (``axis="rows"``) or columns
    (``axis="cols"``) at ``index`` carry a delta: the effective weight is ``W`` with
    ``W[index] += Δ`` (rows) or ``W[:, index] += Δ`` (columns), ``W`` in the ``(out, in)``
    orientation (``transposed``: the module stores it ``(in, out)``, as GPT-2's Conv1D).

    The frozen product is ``base``'s own forward, so ``base`` may be any module computing
    ``x Wᵀ + b`` (a dense ``nn.Linear``, a Conv1D, a quantized or sharded one): autograd
    through it gives the input's gradient of the frozen part, and its parameters never
    require grad. The delta path (:func:`add_delta`) saves only what ``dΔ`` needs; the
    index may cover several runs (q and v heads of a fused qkv_proj).
    ``weight`` and ``bias`` are ``base``'s, and the state dict keeps ``base``'s names
    (``…o_proj.weight``) with the added ``delta``. ``original_index`` names the same
    rows/columns in the model's original layout when the model is co-permuted.
    """

    def __init__(
        self,
        base: nn.Module,
        axis: str,
        index: torch.Tensor,
        delta: torch.Tensor | None = None,
        trainable: bool = True,
        delta_dtype: torch.dtype = torch.float32,
        original_index: torch.Tensor | None = None,
        transposed: bool = False,
    ):
        super().__init__()
        if axis not in ("rows", "cols"):
            raise ValueError(f"axis must be 'rows' or 'cols', not {axis!r}")
        weight = base.weight
        self.transposed = transposed
        stored = tuple(weight.shape)
        out_features, in_features = stored[::-1] if transposed else stored
        self.in_features = getattr(base, "in_features", None) or in_features
        self.out_features = getattr(base, "out_features", None) or out_features
        self._wrap(base)
        self.axis = axis
        device = weight.device
        index = index.to(device="cpu", dtype=torch.long)  # read here: not on the meta device
        # The same rows/columns in the model's original (un-permuted) layout, for export.
        self.original_index = index if original_index is None else original_index.cpu()
        shape = (
            (len(index), self.in_features) if axis == "rows" else (self.out_features, len(index))
        )
        if delta is None:
            delta = torch.zeros(shape, dtype=delta_dtype, device=device)
        elif tuple(delta.shape) != shape:
            raise ValueError(f"delta of shape {tuple(delta.shape)} does not fit {shape}")
        self.delta = nn.Parameter(delta.to(device), requires_grad=trainable)
        self.spans = spans_of(index)
        self.register_buffer("index", index.to(device), persistent=False)

    @property
    def weight(self) -> torch.Tensor:
        """The wrapped module's (frozen) weight, as stored."""
        return self.base.weight

    @property
    def bias(self) -> torch.Tensor | None:
        """The wrapped module's (frozen) bias, if any."""
        return getattr(self.base, "bias", None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.weight.requires_grad or (self.bias is not None and self.bias.requires_grad):
            raise S2FTError(
                "The frozen weight or bias of an S² layer was set to require grad; S²FT trains "
                "only the deltas (partial back-propagation computes no gradient for the base). "
                "Unfreeze nothing but the parameters named *.delta."
            )
        y = self._frozen_product(x)
        if self.spans is not None:
            # The block is added in place, which autograd forbids on a view made inside a
            # custom autograd function or under no_grad, as bitsandbytes' products with a
            # bias return: such a module's view is copied (a dense nn.Linear's or a
            # Conv1D's, a plain reshape of its product, never).
            foreign_view = y._is_view() and type(self.base) not in OWN_VIEWS
            y = y.clone() if foreign_view else y.contiguous()
        return add_delta(y, x, self.delta, self.axis, self.index, self.spans)

    def _frozen_product(self, x: torch.Tensor) -> torch.Tensor:
        """``base(x)``, by the wrapped module itself. Under autocast a dense ``nn.Linear``
        whose weight is in another dtype saves, for the input's gradient, the weight cast
        to the compute dtype (autocast caches no cast of a frozen weight): a weight-sized
        copy kept until backward. That copy is not saved but cast again in backward, as the
        weight itself is saved by a plain ``nn.Linear``."""
        device = x.device.type
        weight = getattr(self.base, "weight", None)
        if not (
            type(self.base) is nn.Linear
            and torch.is_autocast_enabled(device)
            and torch.is_grad_enabled()
            and weight.dtype != torch.get_autocast_dtype(device)
        ):
            return self.base(x)
        dtype = torch.get_autocast_dtype(device)

        def pack(t: torch.Tensor):
            # the only weight-shaped, graph-less tensor of the compute dtype that
            # F.linear saves here is the cast weight (or its transpose)
            if t.dtype == dtype and t.grad_fn is None and not t.requires_grad:
                if t.shape == weight.shape and t.is_contiguous():
                    return _Recast(weight, dtype, False)
                if t.shape == weight.t().shape and t.t().is_contiguous():
                    return _Recast(weight, dtype, True)
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, _unpack):
            return self.base(x)

    def _dense_weight(self) -> torch.Tensor:
        """The wrapped weight, if it is a plain dense float tensor."""
        w = self.weight
        expected = (
            (self.in_features, self.out_features)
            if self.transposed
            else (self.out_features, self.in_features)
        )
        dense = (
            isinstance(self.base, OWN_VIEWS)
            and type(w.data) is torch.Tensor
            and w.dtype.is_floating_point
            and tuple(w.shape) == expected
        )
        if not dense:
            raise S2FTError(
                f"Cannot merge an S²FT delta into a {type(self.base).__name__} whose weight is "
                f"not a dense {self.out_features} x {self.in_features} float matrix (a quantized "
                "or sharded layer); save the adapter (save_adapter) and merge it into the "
                "unquantized, unsharded base model instead."
            )
        return w

    def updates(self, path: str) -> dict[str, Update]:
        return {path: original_update(self.axis, self.original_index, self.delta, self.transposed)}

    def weight_names(self, path: str) -> list[str]:
        return [path]

    def deltas(self) -> list[nn.Parameter]:
        return [self.delta]

    @torch.no_grad()
    def merge(self) -> nn.Module:
        """Fuse the delta into the (dense) weight; return the wrapped module, whose
        weight now holds the update (no copy of the weight)."""
        weight = self._dense_weight()
        update = original_update(self.axis, self.index, self.delta, self.transposed)
        weight.index_add_(update.dim, update.index.to(weight.device), update.delta.to(weight))
        return self.unload()

    def extra_repr(self) -> str:
        runs = self.spans and ", ".join(f"{a}:{b}" for a, b, _ in self.spans)
        where = runs or f"{len(self.index)} indices"
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, "
            f"delta on {self.axis} {where}"
        )


def s2_layers(model: nn.Module) -> dict[str, S2Layer]:
    """A model's S² layers (linear and experts) by module path."""
    return {name: m for name, m in model.named_modules() if isinstance(m, S2Layer)}


def full_tensor(tensor: torch.Tensor) -> torch.Tensor:
    """The whole of a tensor FSDP2 sharded (a delta, an optimizer moment: every process
    must call it, in the same order), or the tensor itself."""
    return tensor.full_tensor() if isinstance(tensor, DTensor) else tensor
