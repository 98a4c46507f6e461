"""Examples in batches: the data order of an epoch, right-padded batches, and the
calibration draw of the data-driven selection strategies."""

from __future__ import annotations

import torch

from .tokenization import IGNORE_INDEX, Example


def epoch_order(count: int, seed: int, epoch: int) -> list[int]:
    """The seeded order in which an epoch takes the training examples."""
    g = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    return torch.randperm(count, generator=g).tolist()


def collate(examples: list[Example], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-pad to the longest example of the batch (dynamic padding)."""
    width = max(len(e.input_ids) for e in examples)
    ids = torch.full((len(examples), width), pad_id, dtype=torch.long)
    labels = torch.full((len(examples), width), IGNORE_INDEX, dtype=torch.long)
    mask = torch.zeros((len(examples), width), dtype=torch.long)
    for i, e in enumerate(examples):
        n = len(e.input_ids)
        ids[i, :n] = torch.tensor(e.input_ids)
        labels[i, :n] = torch.tensor(e.labels)
        mask[i, :n] = 1
    return {"input_ids": ids, "labels": labels, "attention_mask": mask}


def calibration_batches(
    examples: list[Example], samples: int, batch_size: int, seed: int, pad_id: int
) -> list[dict[str, torch.Tensor]]:
    """A seeded draw of ``samples`` examples (in their order in the set), in padded batches:
    what the data-driven selection strategies measure on (``s2ft.calibration``)."""
    order = torch.randperm(len(examples), generator=torch.Generator().manual_seed(seed))
    chosen = [examples[i] for i in sorted(order[:samples].tolist())]
    return [collate(chosen[i : i + batch_size], pad_id) for i in range(0, len(chosen), batch_size)]
