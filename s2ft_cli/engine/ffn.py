"""The FFN's gated product ``silu(gate) * up``, its activation recomputed in the backward
pass (paper §3.3: partial back-propagation keeps only what the backward pass needs).

For ``silu(gate) * up`` autograd keeps three intermediate-wide tensors per FFN the
gradient flows through: the gate projection's output (the SiLU's input), its activation
and the up projection's output. The activation is a cheap function of the gate output,
so a converted model's FFNs keep two and recompute it, as fused SwiGLU kernels do: one
``tokens × intermediate`` tensor less per block above the lowest trained matrix (21.5 MiB
per block at LLaMA-2-7B's width and 512 tokens in fp32). Values and gradients are those
of the unfused operations bit for bit: the same kernels on the same tensors.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from transformers.activations import SiLUActivation

from .shapes import decoder_layers, get_family

# the activation modules this product computes (transformers' ACT2FN["silu"], "swish")
SILU = (nn.SiLU, SiLUActivation)


class _SiLUProduct(torch.autograd.Function):
    """``silu(gate) * up``, saving ``gate`` and ``up`` only."""

    @staticmethod
    def forward(ctx, gate, up):
        ctx.save_for_backward(gate, up)
        return F.silu(gate) * up

    @staticmethod
    def backward(ctx, grad):
        # Each gradient is one new buffer, its last factor applied in place: one
        # intermediate-wide temporary less at the backward pass's peak.
        gate, up = ctx.saved_tensors
        grad_gate = grad_up = None
        if ctx.needs_input_grad[0]:
            grad_gate = grad * up
            torch.ops.aten.silu_backward.grad_input(grad_gate, gate, grad_input=grad_gate)
        if ctx.needs_input_grad[1]:
            grad_up = F.silu(gate).mul_(grad)
        return grad_gate, grad_up


def _ffn_forward(self, x: torch.Tensor) -> torch.Tensor:
    return self.down_proj(_SiLUProduct.apply(self.gate_proj(x), self.up_proj(x)))


def gated_ffns(model: nn.Module) -> list[nn.Module]:
    """The SiLU-gated FFNs of ``model``: LLaMA's gate, up and down projections, in a
    family whose FFN computes ``down(act(gate(x)) * up(x))`` (``Family.recompute_ffn``),
    with a SiLU activation."""
    if not get_family(model).recompute_ffn:
        return []
    ffns = [getattr(layer, "mlp", None) for layer in decoder_layers(model)]
    names = ("gate_proj", "up_proj", "down_proj")
    return [
        f
        for f in ffns
        if f is not None
        and all(hasattr(f, n) for n in names)
        and isinstance(getattr(f, "act_fn", None), SILU)
    ]


def recomputing_forwards(model: nn.Module) -> list[tuple[nn.Module, object]]:
    """For every SiLU-gated FFN of ``model``, a ``forward`` to install on it that recomputes
    its activation in the backward pass."""
    return [(ffn, _ffn_forward.__get__(ffn)) for ffn in gated_ffns(model)]
