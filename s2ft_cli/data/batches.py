"""Examples in batches: the data order of an epoch, the step plan (which examples each
micro-batch of each process takes), right-padded batches, and the calibration draw of the
data-driven selection strategies."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from .tokenization import IGNORE_INDEX, Example


def epoch_order(count: int, seed: int, epoch: int) -> list[int]:
    """The seeded order in which an epoch takes the training examples."""
    g = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    return torch.randperm(count, generator=g).tolist()


@dataclass
class StepPlan:
    """Which training examples each micro-batch of each process takes at each optimizer
    step. An epoch is a seeded order of the ``examples``; step ``s`` takes the next
    ``global_batch = batch_size × world × grad_accum`` of it (an epoch's remainder is
    left out), and micro-batch ``m`` of process ``r`` is the ``m·world + r``-th slice of
    ``batch_size`` in it. So the examples of a step do not depend on how it is split."""

    examples: int
    batch_size: int
    world: int
    grad_accum: int
    seed: int
    _order: tuple[int, list[int]] = field(default=(-1, []), init=False, repr=False)

    @property
    def global_batch(self) -> int:
        return self.batch_size * self.world * self.grad_accum

    @property
    def steps_per_epoch(self) -> int:
        return self.examples // self.global_batch

    def epoch_order(self, epoch: int) -> list[int]:
        """The seeded data order of an epoch (computed once per epoch)."""
        if self._order[0] != epoch:
            self._order = (epoch, epoch_order(self.examples, self.seed, epoch))
        return self._order[1]

    def step_examples(self, step: int) -> list[int]:
        """The example ids of optimizer step ``step`` (0-based), over all processes."""
        epoch, within = divmod(step, self.steps_per_epoch)
        start = within * self.global_batch
        return self.epoch_order(epoch)[start : start + self.global_batch]

    def micro_batch(self, step: int, rank: int, m: int) -> list[int]:
        """The example ids micro-batch ``m`` of process ``rank`` takes at ``step``."""
        offset = (m * self.world + rank) * self.batch_size
        return self.step_examples(step)[offset : offset + self.batch_size]


def seeded_subset(count: int, size: int, seed: int) -> list[int]:
    """``size`` of ``count`` ids drawn with ``seed``, in ascending order."""
    order = torch.randperm(count, generator=torch.Generator().manual_seed(seed))
    return sorted(order[:size].tolist())


def target_count(example: Example) -> int:
    """The tokens whose next-token loss is taken (labels shifted by one, as the loss is)."""
    return sum(label != IGNORE_INDEX for label in example.labels[1:])


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
    chosen = [examples[i] for i in seeded_subset(len(examples), samples, seed)]
    return [collate(chosen[i : i + batch_size], pad_id) for i in range(0, len(chosen), batch_size)]
