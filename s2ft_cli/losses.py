"""Token losses of a batch: training (§3.3), answer likelihoods and gradient calibration."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .data import IGNORE_INDEX


def example_losses(model, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """Per example, the sum of next-token cross-entropies over its target tokens, and
    their count. The batch gives ``input_ids`` or ``inputs_embeds``, ``attention_mask`` and
    ``labels``; only target positions' logits are taken to float32."""
    inputs = "inputs_embeds" if "inputs_embeds" in batch else "input_ids"
    logits = model(
        **{inputs: batch[inputs]}, attention_mask=batch["attention_mask"], use_cache=False
    ).logits
    labels = batch["labels"][:, 1:]
    targets = labels != IGNORE_INDEX
    losses = F.cross_entropy(logits[:, :-1][targets].float(), labels[targets], reduction="none")
    rows = targets.nonzero()[:, 0]
    per_example = torch.zeros(labels.shape[0], dtype=losses.dtype, device=losses.device)
    return per_example.index_add(0, rows, losses), targets.sum(1)
