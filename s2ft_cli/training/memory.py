"""The memory a training run will need on each GPU, before it starts (``s2ft plan``).

Everything is read from the model built on the meta device (no weights): the frozen
weights at their precision (``model.dtype``; 4 or 8 bits for the decoder linears under
``model.quantization``), the fp32 deltas with their gradients and AdamW's two moments, and
the activations a step saves for the backward pass at ``train.batch_size`` ×
``data.max_seq_len``, with and without activation checkpointing. Under FSDP every
parameter tensor is divided over the processes, and one decoder layer is gathered whole
while it runs (two with prefetching, and once more in the buffer FSDP gathers into before
copying it out), the root's own tensors (embeddings, final norm, head: FSDP's root unit)
through the whole step; gathering those at the start of the step, before anything is
saved, takes twice their size for a moment.

Saved activations are traced, not modelled: the converted model reads a batch of fake
tensors (shapes without storage, ``activations.py``) and autograd's own saved tensors are
counted, per decoder layer, for every family as its blocks compute (``tests/test_memory.py``
checks the count against a real step's). An operation saves its inputs only when something
trainable lies below it, an S² consumer its input's selected columns, a producer its whole
input (paper §3.3). With activation checkpointing a block above the lowest trained one
keeps its input (H per token) and the largest block is recomputed at a time. The loss
keeps d(loss)/d(hidden) of the target positions (N·H). Mixture-of-experts layers are
traced with every expert receiving top-k × tokens / experts tokens. A step's working
memory on top of the saved set is the larger of
the loss's chunk of float32 logits (one buffer, and its half-precision product or
cast under bf16) and one block's gradients in flight, plus, on a
quantized base, the dequantized weight of the product running: one block of rows under
nf4 (``nf4.py``), the largest linear under int8.

The same run can be planned as LoRA or full fine-tuning (``method``), to compare before
training: what the method trains replaces S²FT's deltas and is traced the same way. LoRA
(PEFT's, adapters in fp32 as PEFT keeps them) sits on the modules holding the recipe's
target roles, in its layers, at the rank that matches S²FT's trainable count (the paper's
comparison, §5); full fine-tuning trains every weight with its gradient and AdamW's moments
in the model's dtype (bf16 throughout, as torchtune trains), and has no quantized base. A
trained output head takes plain autograd through the loss: it keeps its input and the
float32 log-probabilities of every target position, and forms all their logits at once.
Under DDP the gradients are held twice (DDP's buckets, into which they are all-reduced).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field

from torch import nn

from ..engine.config import S2FTConfig
from ..engine.convert import convert_model
from ..engine.losses import chunk_rows
from ..engine.models import DTYPES, load_model
from ..engine.permute import plan_layout
from ..engine.selection import select_units
from ..engine.shapes import decoder_layers, get_family, model_shape
from ..errors import S2FTError
from .activations import trace_saved
from .quantization import NF4_BLOCK_ELEMENTS, check_quantizable, frozen_linears

# Bits per weight of a quantized decoder linear, scales included: nf4 packs two weights in
# a byte and keeps one 8-bit absmax per block of 64 (double quantization: plus one fp32
# per 256 blocks); int8 keeps one fp32 scale per row (counted separately).
NF4_BITS = 4 + 8 / 64 + 32 / (64 * 256)
ADAMW_BYTES = 4 + 4 + 4 + 4  # fp32 delta, its gradient, AdamW's two moments
GIB = 2**30


@dataclass
class MemoryPlan:
    """Bytes per GPU of each part of a training step."""

    weights: int  # frozen weights at rest, this GPU's share
    # what the method trains (S²FT's deltas), its gradients (and DDP's gradient buckets) and
    # AdamW state, this GPU's share
    trainable: int
    gathered: int  # FSDP: the root's tensors and the layers gathered while they run
    activations: int  # saved for the backward pass, without activation checkpointing
    activations_checkpointed: int  # the same with it
    working: int  # the largest transient on top of the saved activations
    # FSDP: the root's tensors gathered at the start of the step, nothing saved yet, and
    # their all-gather buffer (FSDP copies it out to the parameters)
    gathering: int = 0
    notes: list[str] = field(default_factory=list)

    def total(self, checkpointing: bool) -> int:
        saved = self.activations_checkpointed if checkpointing else self.activations
        step = max(self.gathered + saved + self.working, self.gathering)
        return self.weights + self.trainable + step


def _dequantized_bytes(weights: list[nn.Parameter], quantization: str) -> int:
    """The largest of the quantized ``weights`` a base dequantizes at once for a product."""
    if quantization == "none":
        return 0
    if quantization == "nf4":  # a block of whole rows (nf4.py)
        return max(min(w.numel(), NF4_BLOCK_ELEMENTS) * w.element_size() for w in weights)
    return max(w.numel() * w.element_size() for w in weights)


def _weight_bytes(
    model: nn.Module, quantization: str, stored: list[nn.Parameter]
) -> tuple[int, int, int]:
    """(all parameters' bytes at rest, the largest decoder layer's bytes, the bytes outside
    the decoder layers: embeddings, final norm, head) of a meta model, the ``stored``
    linears' weights at ``quantization``."""
    linear_weights = {id(w) for w in stored}

    def size(p: nn.Parameter) -> float:
        if id(p) in linear_weights and quantization == "nf4":
            return p.numel() * NF4_BITS / 8
        if id(p) in linear_weights and quantization == "int8":
            return p.numel() + p.shape[0] * 4
        return p.numel() * p.element_size()

    total = sum(size(p) for p in model.parameters())
    layers = [sum(size(p) for p in layer.parameters()) for layer in decoder_layers(model)]
    return int(total), int(max(layers)), int(total - sum(layers))


@dataclass
class Trained:
    """What a method's trainable parameters cost beside themselves, and how it trains."""

    state_bytes: int  # per trainable parameter: itself, its gradient, AdamW's two moments
    grad_bytes: int  # per trainable parameter: its gradient
    description: str


def _trained_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def _counting(recipe) -> S2FTConfig:
    """The recipe's S²FT configuration with a selection that reads no weights: the same
    unit counts."""
    return recipe.s2ft.model_copy(update={"strategy": "random"})


def _s2ft(model: nn.Module, recipe) -> tuple[nn.Module, Trained]:
    model = convert_model(model, _counting(recipe))
    selection = model.s2ft_selection
    layers = sum(1 for per_matrix in selection.units.values() if per_matrix)
    where = f"{selection.trainable_params():,} trainable parameters in {layers} layers"
    return model, Trained(ADAMW_BYTES, 4, where)


def _lora(model: nn.Module, recipe) -> tuple[nn.Module, Trained]:
    """PEFT LoRA on the modules that hold the recipe's target roles (the whole module where
    roles are fused), at the rank matching S²FT's trainable count; dense families only."""
    try:
        from peft import LoraConfig, get_peft_model
    except ImportError:
        raise S2FTError("Planning LoRA builds PEFT's model: pip install peft.") from None
    family = get_family(model)
    if family.moe:
        raise S2FTError(
            f"s2ft plan --method lora does not plan a mixture-of-experts model "
            f"({family.model_type}): the trace routes tokens through the experts' weights "
            "itself, past PEFT's LoRA of them. S²FT and full fine-tuning are planned."
        )
    matched = plan_layout(select_units(model, _counting(recipe)))[1].trainable_params()
    # block-relative paths (GPT-2's o_proj and down_proj are attn.c_proj and mlp.c_proj):
    # PEFT matches a target against the end of a module's name
    modules = sorted({family.places[role].module for role in recipe.s2ft.targets})

    def with_lora(model: nn.Module, rank: int) -> nn.Module:
        config = LoraConfig(
            r=rank, lora_alpha=2 * rank, target_modules=modules,
            layers_to_transform=recipe.s2ft.layers,
        )  # fmt: skip
        return get_peft_model(model, config).get_base_model()

    rank = max(1, round(matched / _trained_parameters(with_lora(copy.deepcopy(model), 1))))
    model = with_lora(model, rank)  # in place: the base linears stay the model's
    params = _trained_parameters(model)
    what = f"LoRA r={rank} on {', '.join(modules)} ({params:,} parameters, S²FT's count)"
    return model, Trained(ADAMW_BYTES, 4, what)


def _full(model: nn.Module, recipe) -> tuple[nn.Module, Trained]:
    if recipe.model.quantization != "none":
        raise S2FTError(
            "Full fine-tuning trains every weight: it has no quantized base "
            "(model.quantization: none)."
        )
    model.requires_grad_(True)
    itemsize = DTYPES[recipe.model.dtype].itemsize
    what = (
        f"full fine-tuning: {_trained_parameters(model):,} parameters, gradients and AdamW "
        f"in {recipe.model.dtype}"
    )
    return model, Trained(4 * itemsize, itemsize, what)


# what each planned method trains: (the meta model, the recipe) -> (the model, its costs)
METHODS = {"s2ft": _s2ft, "lora": _lora, "full": _full}


def plan_memory(
    recipe, gpus: int = 1, seq_len: int | None = None, method: str = "s2ft"
) -> MemoryPlan:
    """The memory plan of a recipe's training run on each of ``gpus`` processes (FSDP
    when ``train.distributed`` is fsdp and there are several, DDP otherwise), for
    sequences of ``seq_len`` tokens (default ``data.max_seq_len``, the longest), training
    with ``method`` (a key of ``METHODS``: S²FT, or LoRA or full fine-tuning instead)."""
    m, t = recipe.model, recipe.train
    model = load_model(m.name_or_path, m.dtype, m.trust_remote_code, weights=False)
    if m.quantization != "none":
        check_quantizable(model)
    shape = model_shape(model)
    # the weights quantization stores, found before a method wraps their linears (S²FT's
    # and PEFT's LoRA layers keep the same weight, which frozen_linears cannot see in PEFT's)
    stored = [linear.weight for _, _, linear in frozen_linears(model)]
    model, trained = METHODS[method](model, recipe)
    weights, largest_layer, outside_layers = _weight_bytes(model, m.quantization, stored)
    # the trained parameters' own storage is counted with their state below
    weights -= sum(p.numel() * p.element_size() for p in model.parameters() if p.requires_grad)
    trainable = _trained_parameters(model)
    trained_layers = [
        i
        for i, layer in enumerate(decoder_layers(model))
        if any(p.requires_grad for p in layer.parameters())
    ]
    sharded = t.sharded(gpus)
    share = gpus if sharded else 1
    vocab = model.config.vocab_size
    dequantized = _dequantized_bytes(stored, m.quantization)

    seq = seq_len or recipe.data.max_seq_len
    tokens = t.batch_size * seq
    act = DTYPES[m.dtype].itemsize
    head_trains = any(p.requires_grad for p in model.get_output_embeddings().parameters())
    saved = trace_saved(model, t.batch_size, seq)  # replaces the meta model's tensors
    lowest = trained_layers[0] if trained_layers else shape.num_layers
    # The loss keeps d(loss)/d(hidden) of the target positions and forms a chunk of logits
    # at a time; through a trained head, plain autograd (losses.token_losses) keeps the
    # head's input and the float32 log-probabilities, and forms all the logits at once.
    loss = (shape.hidden_size * act + (vocab * 4 if head_trains else 0)) * tokens
    rows = tokens if head_trains else min(chunk_rows(vocab), tokens)
    logits = rows * vocab * (4 + (act if act < 4 else 0))
    activations = saved.total + loss
    kept_inputs = (shape.num_layers - lowest) * shape.hidden_size * tokens * act
    checkpointed = kept_inputs + max(saved.per_layer, default=0) + saved.outside + loss
    gradients = (2 * shape.intermediate_size + 2 * shape.hidden_size) * tokens * act
    notes = [trained.description]
    weights, state = weights // share, trainable * trained.state_bytes // share
    if gpus > 1 and not sharded:
        state += trainable * trained.grad_bytes
        notes.append("DDP: the gradients once more in its buckets, where they are all-reduced")
    if sharded:
        notes.append(
            f"FSDP over {gpus} processes: every tensor divided; embeddings, final norm and "
            "head gathered through the step, one layer (two with prefetching) at a time; "
            f"gathering the former takes {2 * outside_layers / GIB:.2f} GiB for a moment at "
            "the step's start"
        )
    if sharded and t.fsdp_offload:  # the shards and the optimizer live in CPU memory
        notes.append(
            f"fsdp_offload: {(weights + state) / GIB:.2f} GiB of shards, gradients and AdamW "
            "state per process in CPU memory, not on the GPU"
        )
        weights = state = 0
    return MemoryPlan(
        weights=weights,
        trainable=state,
        # the root's tensors and two layers unsharded, and the flat buffer a layer gathers
        # into before FSDP copies it out to the parameters
        gathered=outside_layers + 3 * largest_layer if sharded else 0,
        gathering=2 * outside_layers if sharded else 0,
        activations=activations,
        activations_checkpointed=checkpointed,
        working=max(logits, gradients) + dequantized,
        notes=notes,
    )
