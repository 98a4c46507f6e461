"""S² linear layers: any frozen linear module plus a delta on some of its rows or columns.

Training (paper §3.3, partial back-propagation): after co-permutation the trainable units
of a matrix are one contiguous block, so the forward pass is the frozen product plus a
small dense product with the delta, and the backward pass computes the weight gradient
of the block alone. The frozen product is the wrapped module's own forward (a dense
``nn.Linear``, or a quantized or sharded linear layer): its parameters never require grad,
so autograd through it forms the input's gradient of the frozen part and no weight
gradient. The delta path is a small autograd function that adds to that product in place:

* column block of a consumer (o_proj, down_proj): ``y += x[..., s:e] Δᵀ``,
  ``dΔ = gᵀ x[..., s:e]`` and ``dx[..., s:e] += g Δ``; only that slice of the input is
  saved, as its own tensor, so the full input is not kept alive by a view;
* row block of a producer (q/k/v, gate/up): ``y[..., s:e] += x Δᵀ``,
  ``dΔ = g[..., s:e]ᵀ x`` and ``dx += g[..., s:e] Δ``; the input is saved.

The delta is an ordinary ``nn.Parameter``: any optimizer, gradient clipping, gradient
accumulation or DDP works unchanged, and no full weight gradient is ever formed.

Serving an adapter unfused uses the same layer with arbitrary (original-layout) rows or
columns, gathered and scattered by index.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.distributed.tensor import DTensor

from ..errors import S2FTError


class _ColumnBlockDelta(torch.autograd.Function):
    """``y += x[..., s:e] Δᵀ`` in place on the frozen product ``y``; saves ``x[..., s:e]``
    (its own tensor) and gives gradients for x (its block) and Δ only."""

    @staticmethod
    def forward(ctx, y, x, delta, start, stop):
        dtype = y.dtype
        with torch.autocast(x.device.type, enabled=False):
            x_block = x[..., start:stop].to(dtype).contiguous()
            y.view(-1, y.shape[-1]).addmm_(x_block.view(-1, stop - start), delta.to(dtype).t())
        ctx.mark_dirty(y)
        ctx.save_for_backward(x_block if delta.requires_grad else None, delta)
        ctx.span, ctx.x_shape, ctx.x_dtype = (start, stop), x.shape, x.dtype
        return y

    @staticmethod
    def backward(ctx, grad_out):
        x_block, delta = ctx.saved_tensors
        start, stop = ctx.span
        g = grad_out.reshape(-1, grad_out.shape[-1])
        grad_x = grad_delta = None
        if ctx.needs_input_grad[1]:
            grad_x = grad_out.new_zeros(ctx.x_shape, dtype=ctx.x_dtype)
            block = (g @ delta.to(g.dtype)).view(*grad_out.shape[:-1], stop - start)
            grad_x[..., start:stop] = block
        if ctx.needs_input_grad[2]:
            grad_delta = (g.t() @ x_block.reshape(-1, stop - start).to(g.dtype)).to(delta.dtype)
        return grad_out, grad_x, grad_delta, None, None


class _RowBlockDelta(torch.autograd.Function):
    """``y[..., s:e] += x Δᵀ`` in place on the frozen product ``y``; saves ``x`` (in the
    compute dtype) and gives gradients for x and Δ only."""

    @staticmethod
    def forward(ctx, y, x, delta, start, stop):
        dtype = y.dtype
        with torch.autocast(x.device.type, enabled=False):
            xc = x.to(dtype)
            y.view(-1, y.shape[-1])[:, start:stop].addmm_(
                xc.reshape(-1, xc.shape[-1]), delta.to(dtype).t()
            )
        ctx.mark_dirty(y)
        ctx.save_for_backward(xc if delta.requires_grad else None, delta)
        ctx.span, ctx.x_dtype = (start, stop), x.dtype
        return y

    @staticmethod
    def backward(ctx, grad_out):
        x, delta = ctx.saved_tensors
        start, stop = ctx.span
        g_block = grad_out.reshape(-1, grad_out.shape[-1])[:, start:stop]
        grad_x = grad_delta = None
        if ctx.needs_input_grad[1]:
            grad_x = (g_block @ delta.to(g_block.dtype)).view(*grad_out.shape[:-1], -1)
            grad_x = grad_x.to(ctx.x_dtype)
        if ctx.needs_input_grad[2]:
            x2d = x.reshape(-1, x.shape[-1]).to(g_block.dtype)
            grad_delta = (g_block.t() @ x2d).to(delta.dtype)
        return grad_out, grad_x, grad_delta, None, None


def linear_on(weight: nn.Parameter, bias: nn.Parameter | None) -> nn.Linear:
    """A plain ``nn.Linear`` whose parameters are these (no copy)."""
    out_features, in_features = weight.shape
    linear = nn.Linear(in_features, out_features, bias=bias is not None, device="meta")
    linear.weight, linear.bias = weight, bias
    return linear


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


def _state_dict_names_of_base(module, state_dict, prefix, local_metadata) -> None:
    """State-dict post-hook: the wrapped module's entries under the layer's own name
    (``o_proj.weight``, not ``o_proj.base.weight``), then ``delta``."""
    inner = prefix + "base."
    for key in [k for k in state_dict if k.startswith(inner)]:
        state_dict[prefix + key[len(inner) :]] = state_dict.pop(key)
    if prefix + "delta" in state_dict:
        state_dict[prefix + "delta"] = state_dict.pop(prefix + "delta")


def _load_names_of_base(module, state_dict, prefix, *args) -> None:
    """Load-state-dict pre-hook, the inverse of :func:`_state_dict_names_of_base`."""
    for key in [k for k in state_dict if k.startswith(prefix)]:
        name = key[len(prefix) :]
        if name.split(".", 1)[0] not in ("delta", "base"):
            state_dict[prefix + "base." + name] = state_dict.pop(key)


class S2Linear(nn.Module):
    """A frozen linear module ``base`` whose rows (``axis="rows"``) or columns
    (``axis="cols"``) at ``index`` carry a delta: the effective weight is ``W`` with
    ``W[index] += Δ`` (rows) or ``W[:, index] += Δ`` (columns).

    The frozen product is ``base``'s own forward, so ``base`` may be any module computing
    ``x Wᵀ + b`` (a dense ``nn.Linear``, a quantized or sharded one): autograd through it
    gives the input's gradient of the frozen part, and its parameters never require grad.
    The delta path is a small autograd function that saves only what ``dΔ`` needs.
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
    ):
        super().__init__()
        if axis not in ("rows", "cols"):
            raise ValueError(f"axis must be 'rows' or 'cols', not {axis!r}")
        weight = base.weight
        self.in_features = getattr(base, "in_features", None) or weight.shape[1]
        self.out_features = getattr(base, "out_features", None) or weight.shape[0]
        self.base = base
        # frozen while the delta is attached; unload() gives the flags back
        self._base_requires_grad = [p.requires_grad for p in base.parameters()]
        base.requires_grad_(False)
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
        n = len(index)
        contiguous = n > 0 and torch.equal(
            index, torch.arange(int(index[0]), int(index[0]) + n, device=index.device)
        )
        self.span = (int(index[0]), int(index[0]) + n) if contiguous else None
        self.register_buffer("index", index.to(device), persistent=False)
        self.register_state_dict_post_hook(_state_dict_names_of_base)
        self.register_load_state_dict_pre_hook(_load_names_of_base)

    @property
    def weight(self) -> torch.Tensor:
        """The wrapped module's (frozen) weight."""
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
        if self.span is not None:
            fn = _RowBlockDelta if self.axis == "rows" else _ColumnBlockDelta
            # The block is added in place, which autograd forbids on a view made inside a
            # custom autograd function or under no_grad, as bitsandbytes' products with a
            # bias return: such a module's view is copied (a dense nn.Linear's never).
            foreign_view = y._is_view() and type(self.base) is not nn.Linear
            y = y.clone() if foreign_view else y.contiguous()
            return fn.apply(y, x, self.delta, *self.span)
        delta = self.delta.to(y.dtype)
        if self.axis == "cols":
            return y + F.linear(x.index_select(-1, self.index), delta)
        return y.index_add(-1, self.index, F.linear(x, delta))

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
        """The wrapped weight, if it is a plain dense ``(out, in)`` float tensor."""
        w = self.weight
        dense = (
            isinstance(self.base, nn.Linear)
            and type(w.data) is torch.Tensor
            and w.dtype.is_floating_point
            and tuple(w.shape) == (self.out_features, self.in_features)
        )
        if not dense:
            raise S2FTError(
                f"Cannot merge an S²FT delta into a {type(self.base).__name__} whose weight is "
                f"not a dense {self.out_features} x {self.in_features} float matrix (a quantized "
                "or sharded layer); save the adapter (save_adapter) and merge it into the "
                "unquantized, unsharded base model instead."
            )
        return w

    @torch.no_grad()
    def merge(self) -> nn.Module:
        """Fuse the delta into the (dense) weight; return the wrapped module, whose
        weight now holds the update (no copy of the weight)."""
        weight = self._dense_weight()
        dim = 0 if self.axis == "rows" else 1
        weight.index_add_(dim, self.index, self.delta.to(weight.dtype))
        return self.unload()

    def unload(self) -> nn.Module:
        """Drop the delta: the wrapped module, its parameters untouched and their
        ``requires_grad`` flags as they were before wrapping."""
        for p, flag in zip(self.base.parameters(), self._base_requires_grad, strict=False):
            p.requires_grad_(flag)
        return self.base

    def extra_repr(self) -> str:
        where = f"{self.span[0]}:{self.span[1]}" if self.span else f"{len(self.index)} indices"
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, "
            f"delta on {self.axis} {where}"
        )


def s2_layers(model: nn.Module) -> dict[str, S2Linear]:
    """A model's S² layers by module path."""
    return {name: m for name, m in model.named_modules() if isinstance(m, S2Linear)}


def full_tensor(tensor: torch.Tensor) -> torch.Tensor:
    """The whole of a tensor FSDP2 sharded (a delta, an optimizer moment: every process
    must call it, in the same order), or the tensor itself."""
    return tensor.full_tensor() if isinstance(tensor, DTensor) else tensor
