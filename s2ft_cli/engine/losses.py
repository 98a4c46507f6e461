"""Token losses of a batch: training (§3.3), answer likelihoods and gradient calibration.

The loss never holds the full-vocabulary logits of a batch. Only the hidden states of
target positions go through the output head, a chunk of rows at a time; with the head
frozen (always so in S²FT) the gradient with respect to the hidden states,
``(softmax − onehot) · W``, is formed in the same pass, so a chunk's logits live only
while it is processed and the backward pass is a multiplication by the loss's gradient.
On the 12-layer benchmark model this removes the 4 × 256 × 32000 logits and their
softmax copies from a training step (see ``docs/BENCHMARKS.md``).
"""

from __future__ import annotations

import functools
import inspect
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from transformers.modeling_outputs import CausalLMOutputWithPast

from ..data import IGNORE_INDEX
from .models import compute_dtype
from .shapes import known_family

# Rows of logits formed at once: as many as fit in CHUNK_LOGITS values (32 MiB in fp32),
# and never fewer than CHUNK_ROWS: a product of a few rows with the head's whole weight is
# bound by reading the weight (a vocabulary of 128k at 32 rows: 1.8 × the time of 256 rows).
CHUNK_LOGITS = 1 << 23
CHUNK_ROWS = 256


def chunk_rows(vocab: int) -> int:
    """Rows of hidden states that go through the head together."""
    return max(CHUNK_ROWS, CHUNK_LOGITS // vocab)


@dataclass(frozen=True)
class LogitTransform:
    """What a family's output head does to the logits ``z`` after the product (paper §3.3:
    the loss S²FT trains on is the model's own): ``z · multiplier`` (Cohere's
    ``logit_scale``), ``z / divisor`` (Granite's ``logits_scaling``), then soft-capping
    ``cap · tanh(z / cap)`` (Gemma 2/3's ``final_logit_softcapping``)."""

    multiplier: float | None = None
    divisor: float | None = None
    softcap: float | None = None

    def apply_(self, z: torch.Tensor, slope: bool = False) -> torch.Tensor | None:
        """Transform float32 logits in place; with ``slope``, return d(logit)/dz where it
        is not a constant (soft-capping: ``1 − tanh²``), else None."""
        if self.multiplier is not None:
            z.mul_(self.multiplier)
        if self.divisor is not None:
            z.div_(self.divisor)
        if self.softcap is None:
            return None
        z.div_(self.softcap).tanh_()
        derivative = 1 - z.square() if slope else None
        z.mul_(self.softcap)
        return derivative

    def chain_(self, grad: torch.Tensor, slope: torch.Tensor | None) -> torch.Tensor:
        """d(loss)/d(logit) in place into d(loss)/dz."""
        if slope is not None:
            grad.mul_(slope)
        if self.divisor is not None:
            grad.div_(self.divisor)
        if self.multiplier is not None:
            grad.mul_(self.multiplier)
        return grad


def logit_transform(model: nn.Module) -> LogitTransform | None:
    """The output head's transform of a model of a known family (None: plain logits)."""
    config = getattr(model, "config", None)
    family = known_family(config)
    if family is None:
        return None
    values = {
        key: getattr(config, attr, None) if attr else None
        for key, attr in (
            ("multiplier", family.logit_multiplier),
            ("divisor", family.logit_divisor),
            ("softcap", family.logit_softcap),
        )
    }
    return LogitTransform(**values) if any(v is not None for v in values.values()) else None


def _head_losses(hidden, weight, bias, labels, transform=None, grad_hidden=None) -> torch.Tensor:
    """Cross-entropy of ``transform(hidden @ weightᵀ + bias)`` against ``labels``, chunk by
    chunk, in float32; when ``grad_hidden`` is given, also write d(loss_i)/d(hidden_i) into
    it. A chunk's float32 logits are its one buffer: transformed, shifted by their maximum,
    exponentiated and normalised in place, ``loss = log Σ exp(z − max) + max − z_label``.
    The products run in the compute dtype on a GPU, in float32 on a CPU: there a bfloat16
    product with the vocabulary as its inner dimension (the gradient, ``probs @ W``) took
    17.9 s where float32 takes 0.11 s (256 rows, vocabulary 49,152, 2 cores)."""
    dtype = compute_dtype(hidden) if hidden.device.type != "cpu" else torch.float32
    weight = weight.to(dtype)
    bias = None if bias is None else bias.to(dtype)
    rows = chunk_rows(weight.shape[0])
    losses = torch.empty(hidden.shape[0], dtype=torch.float32, device=hidden.device)
    with torch.autocast(hidden.device.type, enabled=False):
        for start in range(0, hidden.shape[0], rows):
            span = slice(start, start + rows)
            logits = F.linear(hidden[span].to(dtype), weight, bias).float()
            slope = None if transform is None else transform.apply_(logits, grad_hidden is not None)
            target = labels[span, None]
            picked = logits.gather(1, target).squeeze(1)
            top = logits.amax(1, keepdim=True)
            probs = logits.sub_(top).exp_()  # unnormalised, in place
            total = probs.sum(1)
            losses[span] = total.log() + top.squeeze(1) - picked
            if grad_hidden is not None:  # softmax − onehot
                probs.div_(total[:, None])
                probs.scatter_add_(1, target, torch.full_like(target, -1, dtype=probs.dtype))
                if transform is not None:
                    transform.chain_(probs, slope)
                grad_hidden[span] = probs.to(dtype) @ weight
            del logits, probs, slope  # freed before the next chunk's buffer, not after it
    return losses


class _FrozenHeadCrossEntropy(torch.autograd.Function):
    """Per-row cross-entropy through a frozen output head; saves d(loss)/d(hidden) only."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, labels, transform):
        grad_hidden = torch.empty_like(hidden)
        losses = _head_losses(hidden, weight, bias, labels, transform, grad_hidden)
        ctx.save_for_backward(grad_hidden)
        return losses

    @staticmethod
    def backward(ctx, grad_losses):
        (grad_hidden,) = ctx.saved_tensors
        return grad_hidden * grad_losses[:, None].to(grad_hidden.dtype), None, None, None, None


def token_losses(
    hidden: torch.Tensor,
    head: nn.Linear,
    labels: torch.Tensor,
    transform: LogitTransform | None = None,
) -> torch.Tensor:
    """The cross-entropy of each row of ``hidden`` (N × hidden) through ``head`` (and the
    family's ``transform`` of its logits, :func:`logit_transform`) against ``labels`` (N),
    in float32, without holding more than one chunk of logits."""
    head_trains = any(p is not None and p.requires_grad for p in (head.weight, head.bias))
    if head_trains:  # not S²FT's case: plain autograd through the head
        logits = head(hidden).float()
        if transform is not None:
            logits = logits.clone()
            transform.apply_(logits)
        return F.cross_entropy(logits, labels, reduction="none")
    if torch.is_grad_enabled() and hidden.requires_grad:
        return _FrozenHeadCrossEntropy.apply(hidden, head.weight, head.bias, labels, transform)
    with torch.no_grad():
        return _head_losses(hidden, head.weight, head.bias, labels, transform)


def example_losses(model, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """Per example, the sum of next-token cross-entropies over its target tokens, and
    their count. The batch gives ``input_ids`` or ``inputs_embeds``, ``labels``, and
    ``attention_mask`` or, for packed rows, ``position_ids`` (a row's sum then covers every
    example packed in it). Supported architectures run their decoder and take only the target
    positions through the head (:func:`token_losses`); others go through their full
    forward and logits."""
    inputs = "inputs_embeds" if "inputs_embeds" in batch else "input_ids"
    call = {inputs: batch[inputs], "use_cache": False}
    call.update({k: batch[k] for k in ("attention_mask", "position_ids") if k in batch})
    labels = batch["labels"][:, 1:]
    targets = labels != IGNORE_INDEX
    config = getattr(model, "config", None)
    if known_family(config) is not None:
        hidden = model.get_decoder()(**call).last_hidden_state
        head = model.get_output_embeddings()
        transform = logit_transform(model)
        losses = token_losses(hidden[:, :-1][targets], head, labels[targets], transform)
    else:
        logits = model(**call).logits
        losses = F.cross_entropy(logits[:, :-1][targets].float(), labels[targets], reduction="none")
    rows = targets.nonzero()[:, 0]
    per_example = torch.zeros(labels.shape[0], dtype=losses.dtype, device=losses.device)
    return per_example.index_add(0, rows, losses), targets.sum(1)


class ExampleLosses(nn.Module):
    """:func:`example_losses` as a module around ``model``, so that DistributedDataParallel
    can wrap the whole loss computation (its forward must be the one that runs)."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
        return example_losses(self.model, batch)


# Keyword arguments of a causal LM's forward that belong to its loss, not to the decoder.
LOSS_ARGUMENTS = ("num_items_in_batch", "ignore_index", "shift_labels")


@functools.cache
def _signature(forward) -> inspect.Signature:
    return inspect.signature(forward)


def _lean_forward(self, *args, **kwargs):
    """A converted model's forward (see :func:`lean_forward`)."""
    forward = type(self).forward
    call = _signature(forward).bind(self, *args, **kwargs).arguments
    extra = call.pop("kwargs", {})
    labels = call.get("labels")
    router_loss = call.get("output_router_logits")
    if router_loss is None:
        router_loss = getattr(self.config, "output_router_logits", False)
    lean = (
        labels is not None
        and torch.is_grad_enabled()
        and not call.get("logits_to_keep")
        and not router_loss  # a mixture-of-experts auxiliary loss: the model's own forward
        and not extra.get("fused_lm_head")  # TRL's fused head: already lean
        and not any(p.requires_grad for p in self.get_output_embeddings().parameters())
    )
    if not lean:
        return forward(self, *args, **kwargs)
    loss_options = {k: extra.pop(k) for k in LOSS_ARGUMENTS if k in extra}
    ignore = loss_options.get("ignore_index", IGNORE_INDEX)
    shifted = loss_options.get("shift_labels")
    if shifted is None:  # position t predicts token t + 1, as transformers' ForCausalLMLoss
        shifted = F.pad(labels, (0, 1), value=ignore)[..., 1:]
    decoder_call = {k: v for k, v in call.items() if k not in ("self", "labels", "logits_to_keep")}
    outputs = self.get_decoder()(**decoder_call, **extra)
    hidden = outputs.last_hidden_state
    shifted = shifted.to(hidden.device)
    targets = shifted != ignore
    head, transform = self.get_output_embeddings(), logit_transform(self)
    losses = token_losses(hidden[targets], head, shifted[targets], transform)
    count = loss_options.get("num_items_in_batch")
    if count is None:
        count = targets.sum()
    loss = losses.sum() / (count.to(losses.device) if torch.is_tensor(count) else count)
    return CausalLMOutputWithPast(
        loss=loss, logits=None, hidden_states=outputs.hidden_states, attentions=outputs.attentions
    )


def lean_forward(model: nn.Module):
    """A converted model's ``forward``, to install on it: ``model(..., labels=...)`` computes
    its loss as ``s2ft train`` does while gradients are recorded: the decoder's hidden
    states of target positions go through the frozen head a chunk at a time
    (:func:`token_losses`), never the batch's full-vocabulary logits, so Hugging Face's
    Trainer and every script that passes ``labels=`` train with ``s2ft train``'s memory.
    The loss equals transformers' causal-LM loss (``num_items_in_batch``, ``ignore_index``,
    ``shift_labels`` as there); the output then has no logits. Without gradients
    (evaluation), with ``logits_to_keep`` or TRL's ``fused_lm_head``, the model's own
    forward runs. None for an unsupported architecture."""
    config = getattr(model, "config", None)
    if known_family(config) is None:
        return None

    def forward(self, *args, **kwargs):
        return _lean_forward(self, *args, **kwargs)

    # the model's own signature (input_ids, labels, ...): the Trainer's
    # remove_unused_columns and every library that reads it see the real arguments
    functools.update_wrapper(forward, type(model).forward)
    return forward.__get__(model)
