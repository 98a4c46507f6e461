"""The product of a frozen 4-bit linear, one block of rows at a time.

bitsandbytes' ``Linear4bit`` dequantizes its whole weight for every product it computes
in training, in the forward pass and again for the input's gradient: at LLaMA-2-7B's FFN
width a 172 MiB fp32 transient per product, more than everything S²FT saves for the
backward pass of a 512-token sequence. :class:`BlockwiseLinear4bit` computes the same
products from blocks of rows dequantized one after another (about 16 MiB each): output
columns block by block in the forward pass, the input's gradient summed over the blocks.
Its weight is the same ``Params4bit`` (the state dict, the memory plan and PEFT see a
bitsandbytes ``Linear4bit``), and it never computes a weight gradient: it holds S²FT's
frozen base (paper §3.3), the deltas train beside it.
"""

from __future__ import annotations

from collections.abc import Iterator

import bitsandbytes as bnb
import torch
from bitsandbytes.functional import QuantState, dequantize_4bit, dequantize_blockwise


def rows_per_block(quant_state: QuantState, block_elements: int) -> int:
    """Rows dequantized at once: about ``block_elements`` weights. Only where a row
    holds whole quantization blocks (their scales are per ``blocksize`` weights; every
    LLaMA width is a multiple of 64): bitsandbytes' CPU kernel reads a block of rows
    starting inside a quantization block with other scales than the whole weight's, so
    such a weight is dequantized whole, as bitsandbytes does."""
    rows, cols = quant_state.shape
    if cols % quant_state.blocksize:
        return rows
    return max(1, block_elements // cols)


def dequantized_blocks(
    packed: torch.Tensor, state: QuantState, block_elements: int
) -> Iterator[tuple[slice, torch.Tensor]]:
    """(rows, their dequantized weights) of a 4-bit weight (``packed``: two weights a byte,
    row-major; ``state``: its scales and shape), blocks of about ``block_elements`` weights
    one after another."""
    rows, cols = state.shape
    step = rows_per_block(state, block_elements)
    if step >= rows:
        yield slice(0, rows), dequantize_4bit(packed, state)
        return
    size = state.blocksize
    scales = state.absmax
    if state.nested:  # double quantization: the scales are themselves 8-bit
        scales = dequantize_blockwise(state.absmax, state.state2) + state.offset
    packed = packed.view(-1)
    for start in range(0, rows, step):
        stop = min(rows, start + step)
        first, last = start * cols, stop * cols
        block = QuantState(
            absmax=scales[first // size : last // size],
            shape=torch.Size((stop - start, cols)),
            code=state.code,
            blocksize=size,
            quant_type=state.quant_type,
            dtype=state.dtype,
        )
        codes = packed[first // 2 : last // 2].unsqueeze(1)
        yield slice(start, stop), dequantize_4bit(codes, block)


class _BlockwiseProduct(torch.autograd.Function):
    """``x Wᵀ + b`` for a frozen 4-bit ``W`` (packed codes and their quantization state);
    the backward pass gives only x's gradient."""

    @staticmethod
    def forward(ctx, x, packed, state, bias, block_elements):
        ctx.packed, ctx.state = packed, state  # the frozen weight, not an activation
        ctx.block_elements = block_elements
        blocks = dequantized_blocks(packed, state, block_elements)
        out = torch.cat([x @ w.to(x.dtype).T for _, w in blocks], dim=-1)
        return out if bias is None else out.add_(bias)

    @staticmethod
    def backward(ctx, grad):
        flat = grad.reshape(-1, grad.shape[-1])
        grad_x = flat.new_zeros(flat.shape[0], ctx.state.shape[1])
        for rows, w in dequantized_blocks(ctx.packed, ctx.state, ctx.block_elements):
            grad_x.addmm_(flat[:, rows], w.to(flat.dtype))
        return grad_x.view(*grad.shape[:-1], -1), None, None, None, None


def blockwise_product(x, packed, state, bias, block_elements, compute_dtype) -> torch.Tensor:
    """``x Wᵀ + b`` in ``compute_dtype`` (None: x's), as ``Linear4bit`` computes it, a
    block of rows dequantized at a time; the result in x's dtype."""
    dtype = compute_dtype or x.dtype
    bias = None if bias is None else bias.to(dtype)
    product = _BlockwiseProduct.apply(x.to(dtype), packed, state, bias, block_elements)
    return product.to(x.dtype)


class BlockwiseLinear4bit(bnb.nn.Linear4bit):
    """A frozen bitsandbytes 4-bit linear whose products dequantize one block of rows at
    a time (computed in ``compute_dtype``, as ``Linear4bit``): ``block_elements`` weights,
    set by ``quantization.quantized_linear``."""

    block_elements: int

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight = self.weight
        return blockwise_product(
            x, weight.data, weight.quant_state, self.bias, self.block_elements, self.compute_dtype
        )
