"""Learning-rate schedules (``train.scheduler``): transformers' own, step for step.

Each is the ``LambdaLR`` that ``transformers.get_scheduler`` builds, with the same
multiplier functions (linear, cosine, cosine with hard restarts, polynomial decay, constant,
constant with warm-up, inverse square root), written here because importing
``transformers.optimization`` imports transformers' Trainer utilities, and through them
PEFT and bitsandbytes: 4 s more at every ``s2ft train``'s start (2 cores), for a few
formulas. ``tests/test_train.py`` checks every schedule against transformers' step by
step.
"""

from __future__ import annotations

import math
from functools import partial

from torch.optim import Optimizer
from torch.optim.lr_scheduler import LambdaLR


def _warmup(step: int, warmup: int) -> float:
    return float(step) / float(max(1, warmup))


def _linear(step: int, *, warmup: int, total: int) -> float:
    if step < warmup:
        return _warmup(step, warmup)
    return max(0.0, float(total - step) / float(max(1, total - warmup)))


def _cosine(step: int, *, warmup: int, total: int, cycles: float = 0.5) -> float:
    if step < warmup:
        return _warmup(step, warmup)
    progress = float(step - warmup) / float(max(1, total - warmup))
    return max(0.0, 0.5 * (1.0 + math.cos(math.pi * float(cycles) * 2.0 * progress)))


def _cosine_with_restarts(step: int, *, warmup: int, total: int, cycles: int = 1) -> float:
    if step < warmup:
        return _warmup(step, warmup)
    progress = float(step - warmup) / float(max(1, total - warmup))
    if progress >= 1.0:
        return 0.0
    return max(0.0, 0.5 * (1.0 + math.cos(math.pi * ((float(cycles) * progress) % 1.0))))


def _polynomial(
    step: int, *, warmup: int, total: int, lr_init: float, lr_end: float = 1e-7, power: float = 1.0
) -> float:
    if step < warmup:
        return _warmup(step, warmup)
    if step > total:
        return lr_end / lr_init
    remaining = 1 - (step - warmup) / (total - warmup)
    return ((lr_init - lr_end) * remaining**power + lr_end) / lr_init


def _constant(step: int, *, warmup: int, total: int) -> float:
    return 1


def _constant_with_warmup(step: int, *, warmup: int, total: int) -> float:
    return _warmup(step, warmup) if step < warmup else 1.0


def _inverse_sqrt(step: int, *, warmup: int, total: int) -> float:
    if step < warmup:
        return _warmup(step, warmup)
    timescale = warmup or 10_000
    return 1.0 / math.sqrt((step + timescale - warmup) / timescale)


SCHEDULES = {
    "linear": _linear,
    "cosine": _cosine,
    "cosine_with_restarts": _cosine_with_restarts,
    "polynomial": _polynomial,
    "constant": _constant,
    "constant_with_warmup": _constant_with_warmup,
    "inverse_sqrt": _inverse_sqrt,
}


def schedule(name: str, optimizer: Optimizer, warmup: int, total: int) -> LambdaLR:
    """The ``LambdaLR`` of schedule ``name`` over ``total`` steps after ``warmup``."""
    options = {"lr_init": optimizer.defaults["lr"]} if name == "polynomial" else {}
    if name == "polynomial" and not options["lr_init"] > 1e-7:
        raise ValueError(f"lr_end (1e-07) must be smaller than initial lr ({options['lr_init']})")
    return LambdaLR(optimizer, partial(SCHEDULES[name], warmup=warmup, total=total, **options))
