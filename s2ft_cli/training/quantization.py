"""Quantized frozen bases (``model.quantization: nf4 | int8``) through bitsandbytes.

S²FT trains only the deltas, so the frozen weights can be stored in 4 or 8 bits as QLoRA
stores LoRA's base. The model is selected and co-permuted in its loaded precision first
(permuting quantized blocks would mix their scales), then every frozen linear of the
decoder layers (the seven projections; under an S² layer, the module it wraps) becomes a
bitsandbytes layer holding the same weight quantized: 4-bit NormalFloat with double
quantization (``Linear4bit``, whose products s2ft computes a block of rows at a time:
``nf4.py``) or LLM.int8 (``Linear8bitLt``). The S² layer calls that
module's own forward for the frozen product and adds its fp32 delta; the embeddings and
the head stay as loaded. Under FSDP2 (``train.distributed: fsdp``) the NF4 weights are held
as tensors FSDP2 shards (``nf4_shards.py``), quantized on rank 0. The adapter is written in
the original layout with the fingerprint of the unquantized weights, so it loads onto the
unquantized base.
"""

from __future__ import annotations

import sys
from collections.abc import Iterator

from torch import nn

from ..adapter.fingerprint import remember_base_fingerprint
from ..engine.layers import S2Linear
from ..engine.shapes import get_family, model_shape, replace_module, role_slots
from ..errors import S2FTError

QUANTIZATIONS = ("none", "nf4", "int8")
NF4_BLOCK_ELEMENTS = 2**22  # weights an nf4 product dequantizes at once: 16 MiB in fp32


def require_bitsandbytes():
    """The bitsandbytes module, or a user error saying how to install it."""
    try:
        import bitsandbytes
    except ImportError as err:
        raise S2FTError(
            f"model.quantization needs the bitsandbytes package ({err}). Install it with: "
            "pip install 's2ft[quant]' (or pip install bitsandbytes), or set "
            "model.quantization: none."
        ) from None
    return bitsandbytes


def quantized_linear(linear: nn.Linear, kind: str, blockwise: bool = True) -> nn.Module:
    """A bitsandbytes layer holding ``linear``'s weight quantized (``nf4`` or ``int8``) on
    the weight's device, its bias as it is; nothing in it requires grad. ``blockwise``
    (nf4): its products dequantize a block of rows at a time (``nf4.py``), not the whole
    weight as bitsandbytes' own ``Linear4bit``."""
    bnb = require_bitsandbytes()
    weight, bias = linear.weight.detach(), linear.bias
    out_features, in_features = weight.shape
    if kind == "nf4":
        from .nf4 import BlockwiseLinear4bit

        layer = (BlockwiseLinear4bit if blockwise else bnb.nn.Linear4bit)(
            in_features, out_features, bias=bias is not None, compute_dtype=weight.dtype,
            quant_type="nf4", compress_statistics=True, device="meta",
        )  # fmt: skip
        layer.weight = bnb.nn.Params4bit(
            weight, requires_grad=False, quant_type="nf4", compress_statistics=True
        )
        if blockwise:
            layer.block_elements = NF4_BLOCK_ELEMENTS
        # Its CPU inference shortcut repacks the weight in place the first time it runs
        # without grad (validation), for the training steps after it too, and needs
        # out_features % 32 == 0: off, one format throughout.
        layer.support_avx512bf16_for_cpu = False
    elif kind == "int8":
        layer = bnb.nn.Linear8bitLt(
            in_features, out_features, bias=bias is not None, has_fp16_weights=False,
            device="meta",
        )  # fmt: skip
        layer.weight = bnb.nn.Int8Params(weight, requires_grad=False, has_fp16_weights=False)
    else:
        raise ValueError(f"unknown quantization {kind!r}; one of {', '.join(QUANTIZATIONS)}")
    if bias is not None:
        layer.bias = nn.Parameter(bias.detach().clone(), requires_grad=False)
    return layer.to(weight.device)  # bitsandbytes quantizes as the weight moves


def frozen_linears(model: nn.Module) -> Iterator[tuple[str, nn.Module, nn.Linear]]:
    """The dense linears quantization stores: every 2-D weight of a decoder layer that a
    role lives in (``families.FAMILIES``; a fused one once), by module path, the module
    there (an S² layer or the linear) and the linear."""
    shape = model_shape(model)
    seen = set()
    for layer in range(shape.num_layers):
        for role in shape.family.roles:
            for slot in role_slots(shape, layer, role):
                if slot.place.experts or slot.path in seen:
                    continue
                seen.add(slot.path)
                module = model.get_submodule(slot.path)
                linear = module.base if isinstance(module, S2Linear) else module
                if type(linear) is nn.Linear:
                    yield slot.path, module, linear


def check_quantizable(model_or_config) -> None:
    """Refuse ``model.quantization`` for a family whose frozen weights bitsandbytes cannot
    store: experts in 3-D tensors, GPT-2's transposed Conv1D weights."""
    family = get_family(model_or_config)
    if family.moe or any(p.transposed for p in family.places.values()):
        what = "its experts are 3-D tensors" if family.moe else "its weights are Conv1D"
        raise S2FTError(
            f"model.quantization stores a model's nn.Linear weights in 4 or 8 bits with "
            f"bitsandbytes; a {family.model_type} model cannot be ({what}, which bitsandbytes "
            "does not quantize). Train it with model.quantization: none (bfloat16 halves "
            "its memory)."
        )


def shardable_linear(linear: nn.Linear) -> nn.Module:
    """``linear``'s weight in NF4 as FSDP2 can shard it (``nf4_shards.py``): quantized by
    bitsandbytes as :func:`quantized_linear` quantizes it, or, for a weight on the meta
    device (a process that receives rank 0's values), an empty one of its shapes."""
    from .nf4_shards import ShardableLinear4bit

    dtype = linear.weight.dtype
    if linear.weight.is_meta:
        out_features, in_features = linear.weight.shape
        bias = linear.bias is not None
        args = (in_features, out_features, bias, dtype, NF4_BLOCK_ELEMENTS)
        return ShardableLinear4bit(*args, device="meta")
    return ShardableLinear4bit.of(quantized_linear(linear, "nf4"), dtype, NF4_BLOCK_ELEMENTS)


def quantize_frozen_linears(
    model: nn.Module, kind: str, blockwise: bool = True, shardable: bool = False
) -> int:
    """Replace the frozen linears of every decoder layer by quantized ones (``kind`` nf4 or
    int8), inside S² layers too; returns how many. Run it after conversion: a converted
    model's adapter keeps the fingerprint of the weights as they were. ``blockwise``: see
    :func:`quantized_linear`; ``shardable`` (nf4): layers FSDP2 shards
    (:func:`shardable_linear`)."""
    if kind == "none":
        return 0
    if shardable and kind != "nf4":
        raise ValueError(f"only nf4 weights are stored shardable, not {kind}")
    check_quantizable(model)
    remember_base_fingerprint(model)
    found = list(frozen_linears(model))
    for path, module, linear in found:
        if shardable:
            quantized = shardable_linear(linear)
        else:
            quantized = quantized_linear(linear, kind, blockwise)
        if isinstance(module, S2Linear):
            module.base = quantized
        else:
            replace_module(model, path, quantized)
    return len(found)


def weight_total(model: nn.Module) -> int:
    """How many weights a model holds, a quantized weight counted unpacked (sharded ones
    too: a DTensor counts its whole tensor)."""
    shards = sys.modules.get(f"{__package__}.nf4_shards")  # none exist unless imported
    shardable = shards.ShardableLinear4bit if shards else ()
    total, counted = 0, set()
    for module in model.modules():
        if isinstance(module, shardable):
            total += module.in_features * module.out_features
            total += module.bias.numel() if module.bias is not None else 0
            counted.update(id(p) for p in module.parameters())
    return total + sum(weight_count(p) for p in model.parameters() if id(p) not in counted)


def weight_count(parameter: nn.Parameter) -> int:
    """How many weights a parameter holds: a 4-bit one packs two in a byte."""
    state = getattr(parameter, "quant_state", None)
    return state.shape.numel() if state is not None else parameter.numel()
