"""S² linear layers: a frozen linear map plus a delta on some of its rows or columns.

Training (paper §3.3, partial back-propagation): after co-permutation the trainable units
of a matrix are one contiguous block, so the forward pass is the frozen dense product plus
a small dense product with the delta, and the backward pass computes the weight gradient
of the block alone:

* column block of a consumer (o_proj, down_proj): ``y = x Wᵀ + x[..., s:e] Δᵀ`` and
  ``dΔ = gᵀ x[..., s:e]``; only that slice of the input is saved, as its own tensor, so the
  full input is not kept alive by a view;
* row block of a producer (q/k/v, gate/up): ``y = x Wᵀ``, ``y[..., s:e] += x Δᵀ`` and
  ``dΔ = g[..., s:e]ᵀ x``.

The delta is an ordinary ``nn.Parameter``: any optimizer, gradient clipping, gradient
accumulation or DDP works unchanged, and no full weight gradient is ever formed.

Serving an adapter unfused uses the same layer with arbitrary (original-layout) rows or
columns, gathered and scattered by index.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .errors import S2FTError
from .models import compute_dtype


class _ColumnBlockLinear(torch.autograd.Function):
    """``y = x Wᵀ + b + x[..., s:e] Δᵀ`` with gradients for x and Δ only."""

    @staticmethod
    def forward(ctx, x, weight, bias, delta, start, stop):
        dtype = compute_dtype(x)
        with torch.autocast(x.device.type, enabled=False):
            xc = x.to(dtype)
            x_block = xc[..., start:stop].contiguous()
            y = F.linear(xc, weight.to(dtype), None if bias is None else bias.to(dtype))
            y.view(-1, y.shape[-1]).addmm_(x_block.view(-1, stop - start), delta.to(dtype).t())
        ctx.save_for_backward(x_block if delta.requires_grad else None, weight, delta)
        ctx.span, ctx.x_dtype = (start, stop), x.dtype
        return y

    @staticmethod
    def backward(ctx, grad_out):
        x_block, weight, delta = ctx.saved_tensors
        start, stop = ctx.span
        g = grad_out.reshape(-1, grad_out.shape[-1])
        grad_x = grad_delta = None
        if ctx.needs_input_grad[0]:
            grad_x = g @ weight.to(g.dtype)
            grad_x[:, start:stop].addmm_(g, delta.to(g.dtype))
            grad_x = grad_x.view(*grad_out.shape[:-1], -1).to(ctx.x_dtype)
        if ctx.needs_input_grad[3]:
            grad_delta = (g.t() @ x_block.reshape(-1, stop - start).to(g.dtype)).to(delta.dtype)
        return grad_x, None, None, grad_delta, None, None


class _RowBlockLinear(torch.autograd.Function):
    """``y = x Wᵀ + b`` with ``Δ`` added to output rows ``s:e``; gradients for x and Δ."""

    @staticmethod
    def forward(ctx, x, weight, bias, delta, start, stop):
        dtype = compute_dtype(x)
        with torch.autocast(x.device.type, enabled=False):
            xc = x.to(dtype)
            y = F.linear(xc, weight.to(dtype), None if bias is None else bias.to(dtype))
            y.view(-1, y.shape[-1])[:, start:stop].addmm_(
                xc.reshape(-1, xc.shape[-1]), delta.to(dtype).t()
            )
        ctx.save_for_backward(xc if delta.requires_grad else None, weight, delta)
        ctx.span, ctx.x_dtype = (start, stop), x.dtype
        return y

    @staticmethod
    def backward(ctx, grad_out):
        x, weight, delta = ctx.saved_tensors
        start, stop = ctx.span
        g = grad_out.reshape(-1, grad_out.shape[-1])
        g_block = g[:, start:stop]
        grad_x = grad_delta = None
        if ctx.needs_input_grad[0]:
            grad_x = g @ weight.to(g.dtype)
            grad_x.addmm_(g_block, delta.to(g.dtype))
            grad_x = grad_x.view(*grad_out.shape[:-1], -1).to(ctx.x_dtype)
        if ctx.needs_input_grad[3]:
            x2d = x.reshape(-1, x.shape[-1]).to(g.dtype)
            grad_delta = (g_block.t() @ x2d).to(delta.dtype)
        return grad_x, None, None, grad_delta, None, None


def linear_on(weight: nn.Parameter, bias: nn.Parameter | None) -> nn.Linear:
    """A plain ``nn.Linear`` whose parameters are these (no copy)."""
    out_features, in_features = weight.shape
    linear = nn.Linear(in_features, out_features, bias=bias is not None, device="meta")
    linear.weight, linear.bias = weight, bias
    return linear


class S2Linear(nn.Module):
    """A linear layer whose rows (``axis="rows"``) or columns (``axis="cols"``) at ``index``
    carry a delta: the effective weight is ``W`` with ``W[index] += Δ`` (rows) or
    ``W[:, index] += Δ`` (columns). ``W`` and the bias stay frozen and are the very
    parameters of the wrapped ``nn.Linear``, so state-dict names do not change apart from
    the added ``delta``. ``original_index`` names the same rows/columns in the model's
    original layout when the model is co-permuted.
    """

    def __init__(
        self,
        base: nn.Linear,
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
        self.in_features, self.out_features = base.in_features, base.out_features
        self.weight, self.bias = base.weight, base.bias
        # frozen while the delta is attached; merge() gives the flags back
        self._base_requires_grad = [
            p.requires_grad for p in (self.weight, self.bias) if p is not None
        ]
        for p in (self.weight, self.bias):
            if p is not None:
                p.requires_grad_(False)
        self.axis = axis
        index = index.to(device=base.weight.device, dtype=torch.long)
        self.register_buffer("index", index, persistent=False)
        # The same rows/columns in the model's original (un-permuted) layout, for export.
        self.original_index = (index if original_index is None else original_index).cpu()
        shape = (
            (len(index), self.in_features) if axis == "rows" else (self.out_features, len(index))
        )
        if delta is None:
            delta = torch.zeros(shape, dtype=delta_dtype, device=base.weight.device)
        elif tuple(delta.shape) != shape:
            raise ValueError(f"delta of shape {tuple(delta.shape)} does not fit {shape}")
        self.delta = nn.Parameter(delta.to(base.weight.device), requires_grad=trainable)
        n = len(index)
        contiguous = n > 0 and torch.equal(
            index, torch.arange(int(index[0]), int(index[0]) + n, device=index.device)
        )
        self.span = (int(index[0]), int(index[0]) + n) if contiguous else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.weight.requires_grad or (self.bias is not None and self.bias.requires_grad):
            raise S2FTError(
                "The frozen weight or bias of an S² layer was set to require grad; S²FT trains "
                "only the deltas (partial back-propagation computes no gradient for the base). "
                "Unfreeze nothing but the parameters named *.delta."
            )
        if self.span is not None:
            fn = _RowBlockLinear if self.axis == "rows" else _ColumnBlockLinear
            return fn.apply(x, self.weight, self.bias, self.delta, *self.span)
        y = F.linear(x, self.weight, self.bias)
        delta = self.delta.to(y.dtype)
        if self.axis == "cols":
            return y + F.linear(x.index_select(-1, self.index), delta)
        return y.index_add(-1, self.index, F.linear(x, delta))

    @torch.no_grad()
    def merge(self) -> nn.Linear:
        """Fuse the delta into the weight; return a plain ``nn.Linear`` on the same
        parameters (no copy of the weight)."""
        if self.axis == "rows":
            self.weight.index_add_(0, self.index, self.delta.to(self.weight.dtype))
        else:
            self.weight.index_add_(1, self.index, self.delta.to(self.weight.dtype))
        return self.unload()

    def unload(self) -> nn.Linear:
        """Drop the delta: a plain ``nn.Linear`` on the same, untouched parameters."""
        for p, flag in zip((self.weight, self.bias), self._base_requires_grad, strict=False):
            p.requires_grad_(flag)
        return linear_on(self.weight, self.bias)

    def extra_repr(self) -> str:
        where = f"{self.span[0]}:{self.span[1]}" if self.span else f"{len(self.index)} indices"
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, "
            f"delta on {self.axis} {where}"
        )
