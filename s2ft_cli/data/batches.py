"""Examples in batches: the data order of an epoch (optionally grouped by length), the
step plan (which examples each micro-batch of each process takes), right-padded batches,
packed rows, and the calibration draw of the data-driven selection strategies."""

from __future__ import annotations

import bisect
from dataclasses import dataclass, field

import torch

from .tokenization import IGNORE_INDEX, Example


def epoch_order(count: int, seed: int, epoch: int) -> list[int]:
    """The seeded order in which an epoch takes the training examples."""
    g = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    return torch.randperm(count, generator=g).tolist()


# Global batches sorted by length together (train.group_by_length): enough that a batch
# holds examples of about one length, few enough that the data order stays random.
GROUP_STEPS = 64


def grouped_order(order: list[int], lengths: list[int], global_batch: int, seed: int) -> list[int]:
    """``order`` regrouped by length: every ``GROUP_STEPS`` global batches of it are sorted
    longest first and cut into global batches again, and the whole batches are shuffled
    (seeded); an incomplete last batch stays last, as the remainder an epoch leaves out."""
    size = global_batch * GROUP_STEPS
    batches = []
    for start in range(0, len(order), size):
        group = sorted(order[start : start + size], key=lambda i: -lengths[i])
        batches += [group[k : k + global_batch] for k in range(0, len(group), global_batch)]
    whole = [b for b in batches if len(b) == global_batch]
    rest = [i for b in batches if len(b) < global_batch for i in b]
    shuffled = torch.randperm(len(whole), generator=torch.Generator().manual_seed(seed))
    return [i for k in shuffled.tolist() for i in whole[k]] + rest


@dataclass
class StepPlan:
    """Which training examples each micro-batch of each process takes at each optimizer
    step. An epoch is a seeded order of the ``examples``; step ``s`` takes the next
    ``global_batch = batch_size × world × grad_accum`` of it (an epoch's remainder is
    left out), and micro-batch ``m`` of process ``r`` is the ``m·world + r``-th slice of
    ``batch_size`` in it. So the examples of a step do not depend on how it is split. With
    ``lengths`` (train.group_by_length) the epoch's order is :func:`grouped_order`."""

    examples: int
    batch_size: int
    world: int
    grad_accum: int
    seed: int
    lengths: list[int] | None = None
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
            order = epoch_order(self.examples, self.seed, epoch)
            if self.lengths is not None:
                seed = self.seed * 1_000_003 + epoch + 500_009  # not the order's own stream
                order = grouped_order(order, self.lengths, self.global_batch, seed)
            self._order = (epoch, order)
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
    """Right-pad to the longest example of the batch (dynamic padding). Packed rows get
    ``position_ids`` instead of an attention mask (the padding is one more sequence of
    its own): the model then attends within each packed example only."""
    width = max(len(e.input_ids) for e in examples)
    ids = torch.full((len(examples), width), pad_id, dtype=torch.long)
    labels = torch.full((len(examples), width), IGNORE_INDEX, dtype=torch.long)
    mask = torch.zeros((len(examples), width), dtype=torch.long)
    positions = torch.arange(width).repeat(len(examples), 1)
    for i, e in enumerate(examples):
        n = len(e.input_ids)
        ids[i, :n] = torch.tensor(e.input_ids)
        labels[i, :n] = torch.tensor(e.labels)
        mask[i, :n] = 1
        if e.position_ids is not None:
            positions[i, :n] = torch.tensor(e.position_ids)
            positions[i, n:] = torch.arange(width - n)
    if examples[0].position_ids is not None:
        return {"input_ids": ids, "labels": labels, "position_ids": positions}
    return {"input_ids": ids, "labels": labels, "attention_mask": mask}


def pack_examples(examples: list[Example], max_len: int) -> list[Example]:
    """The examples packed into rows of at most ``max_len`` tokens (``data.packing``):
    longest first, each into the row with the least room that holds it (best fit), in a
    fixed order. In a row the examples follow one another whole, their positions restart
    at 0 and each one's first label is ignored, so no token is predicted from another
    example's: with the mask the positions imply, each example's loss and gradient are
    those it has alone."""
    rows: list[list[int]] = []
    rooms: list[tuple[int, int]] = []  # (room left, row), ascending
    for i in sorted(range(len(examples)), key=lambda i: (-len(examples[i].input_ids), i)):
        size = len(examples[i].input_ids)
        k = bisect.bisect_left(rooms, (size, -1))
        if k == len(rooms):
            rows.append([i])
            room, row = max_len - size, len(rows) - 1
        else:
            room, row = rooms.pop(k)
            rows[row].append(i)
            room -= size
        bisect.insort(rooms, (room, row))
    packed = []
    for row in rows:
        parts = [examples[i] for i in row]
        packed.append(
            Example(
                input_ids=[t for e in parts for t in e.input_ids],
                labels=[t for e in parts for t in [IGNORE_INDEX, *e.labels[1:]]],
                truncated=any(e.truncated for e in parts),
                position_ids=[p for e in parts for p in range(len(e.input_ids))],
            )
        )
    return packed


def training_plan(
    examples: list[Example],
    pack_len: int | None,
    batch_size: int,
    world: int,
    grad_accum: int,
    seed: int,
    group_by_length: bool,
) -> tuple[list[Example], StepPlan]:
    """The rows training takes — the examples, or packed ``pack_len`` tokens to a row
    (data.packing) — and the plan of its steps, grouped by length if asked."""
    rows = pack_examples(examples, pack_len) if pack_len else examples
    lengths = [len(e.input_ids) for e in rows] if group_by_length else None
    return rows, StepPlan(len(rows), batch_size, world, grad_accum, seed, lengths)


def calibration_batches(
    examples: list[Example], samples: int, batch_size: int, seed: int, pad_id: int
) -> list[dict[str, torch.Tensor]]:
    """A seeded draw of ``samples`` examples (in their order in the set), in padded batches:
    what the data-driven selection strategies measure on (``s2ft.calibration``)."""
    chosen = [examples[i] for i in seeded_subset(len(examples), samples, seed)]
    return [collate(chosen[i : i + batch_size], pad_id) for i in range(0, len(chosen), batch_size)]
