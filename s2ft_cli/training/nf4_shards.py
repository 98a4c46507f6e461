"""A frozen 4-bit linear that FSDP2 shards (``train.distributed: fsdp`` with
``model.quantization: nf4``).

FSDP2's ``fully_shard`` turns each parameter into a DTensor sharded along its first
dimension; bitsandbytes' ``Params4bit`` keeps its scales in a ``QuantState`` beside the
packed data, which that conversion drops. :class:`ShardableLinear4bit` holds the same
quantized weight (bitsandbytes' NF4 with double quantization, quantized by bitsandbytes)
as plain frozen tensors: the packed codes (two weights a byte) and the 8-bit block scales
are parameters, sharded like any other, gathered with the layer and freed after it; the
small tables that decode the scales (one fp32 absmax per 256 scales, the two codebooks) are
buffers every process keeps whole. FSDP2 gathers parameters of several dtypes in one
collective (as bytes), so the layer's fp32 norms and deltas travel with them. The products
are those of one process's ``BlockwiseLinear4bit`` (``nf4.py``): the same quantized values,
dequantized a block of rows at a time.
"""

from __future__ import annotations

import math

import torch
from bitsandbytes.functional import QuantState
from torch import nn

from .nf4 import blockwise_product

NF4_BLOCK = 64  # weights a scale covers (bitsandbytes' default blocksize for 4 bits)
SCALES_BLOCK = 256  # scales one fp32 absmax covers (its double quantization)


def _frozen(tensor: torch.Tensor) -> nn.Parameter:
    return nn.Parameter(tensor, requires_grad=False)


class ShardableLinear4bit(nn.Module):
    """``x Wᵀ + b`` for a frozen NF4 weight stored as tensors FSDP2 can shard; nothing in it
    requires grad."""

    def __init__(self, in_features: int, out_features: int, bias: bool, compute_dtype,
                 block_elements: int, device=None) -> None:  # fmt: skip
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.compute_dtype, self.block_elements = compute_dtype, block_elements
        n = in_features * out_features
        scales = math.ceil(n / NF4_BLOCK)
        self.codes = _frozen(torch.empty(math.ceil(n / 2), 1, dtype=torch.uint8, device=device))
        self.scales = _frozen(torch.empty(scales, dtype=torch.uint8, device=device))
        self.bias = _frozen(torch.empty(out_features, device=device)) if bias else None
        self.register_buffer("code", torch.empty(16, device=device))
        self.register_buffer("scales_absmax", torch.empty(math.ceil(scales / SCALES_BLOCK),
                                                          device=device))  # fmt: skip
        self.register_buffer("scales_code", torch.empty(256, device=device))
        self.register_buffer("scales_offset", torch.empty((), device=device))

    @classmethod
    def of(cls, linear4bit, compute_dtype, block_elements: int) -> ShardableLinear4bit:
        """The weight of bitsandbytes' ``Linear4bit`` (NF4, double quantization), its
        bias as it is."""
        state = linear4bit.weight.quant_state
        blocks = (state.blocksize, state.state2.blocksize if state.nested else None)
        if blocks != (NF4_BLOCK, SCALES_BLOCK):
            raise ValueError("expected NF4 with double quantization, blocks of 64 and 256")
        out_features, in_features = state.shape
        bias = linear4bit.bias is not None
        layer = cls(in_features, out_features, bias, compute_dtype, block_elements, "meta")
        layer.codes = _frozen(linear4bit.weight.data)
        layer.scales = _frozen(state.absmax)
        if bias:
            layer.bias = _frozen(linear4bit.bias.detach())
        layer.code, layer.scales_code = state.code, state.state2.code
        layer.scales_absmax, layer.scales_offset = state.state2.absmax, state.offset
        return layer

    @property
    def weight(self) -> nn.Parameter:
        """The packed weight, as bitsandbytes' ``Linear4bit.weight`` is."""
        return self.codes

    def quant_state(self) -> QuantState:
        """bitsandbytes' state of the weight, from the (gathered) tensors."""
        scales = QuantState(
            absmax=self.scales_absmax, code=self.scales_code, blocksize=SCALES_BLOCK,
            dtype=torch.float32,
        )  # fmt: skip
        return QuantState(
            absmax=self.scales, shape=torch.Size((self.out_features, self.in_features)),
            code=self.code, blocksize=NF4_BLOCK, quant_type="nf4", dtype=self.compute_dtype,
            offset=self.scales_offset, state2=scales,
        )  # fmt: skip

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return blockwise_product(
            x, self.codes, self.quant_state(), self.bias, self.block_elements, self.compute_dtype
        )
