"""The table of target matrices (paper §3).

``TARGETS`` says, for each target matrix, which coupled structure of a Transformer block
it belongs to (the attention heads shared by q/k/v/o, the FFN channels shared by
gate/up/down), along which axis its units lie and what a unit is;
``models.ModelShape`` gives their counts and widths for one model. It needs no torch, so
recipes are validated (and ``s2ft --help`` answers) without importing it.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum
from typing import Literal


class Unit(str, Enum):
    """What a target matrix selects; the value is how the unit is named to users."""

    QUERY_HEAD = "query head"
    KV_HEAD = "key/value head"  # serves a GQA group of query heads
    CHANNEL = "channel"  # an FFN intermediate channel


@dataclass(frozen=True)
class TargetMatrix:
    """One target matrix of a Transformer block (paper §3.1).

    ``structure``: the coupled structure it belongs to (``attention`` or ``ffn``);
    ``axis``: ``rows`` for a producer of the structure's units (q/k/v, gate/up), ``cols``
    for its consumer (o, down); ``unit``: what one selected unit is. How many units the
    matrix has and how many rows/columns each spans depend on the model
    (:meth:`ModelShape.num_units`, :meth:`ModelShape.unit_width`).
    """

    name: str
    structure: Literal["attention", "ffn"]
    axis: Literal["rows", "cols"]
    unit: Unit

    @property
    def consumer(self) -> bool:
        """Whether the matrix reads the structure's units through its input columns."""
        return self.axis == "cols"


# The one table of target matrices; every module reads it.
TARGETS: dict[str, TargetMatrix] = {
    t.name: t
    for t in (
        TargetMatrix("q_proj", "attention", "rows", Unit.QUERY_HEAD),
        TargetMatrix("k_proj", "attention", "rows", Unit.KV_HEAD),
        TargetMatrix("v_proj", "attention", "rows", Unit.KV_HEAD),
        TargetMatrix("o_proj", "attention", "cols", Unit.QUERY_HEAD),
        TargetMatrix("gate_proj", "ffn", "rows", Unit.CHANNEL),
        TargetMatrix("up_proj", "ffn", "rows", Unit.CHANNEL),
        TargetMatrix("down_proj", "ffn", "cols", Unit.CHANNEL),
    )
}
TARGET_MATRICES = tuple(TARGETS)
STRUCTURES = ("attention", "ffn")


def structure_matrices(structure: str) -> tuple[str, ...]:
    """The target matrices of a coupled structure, in table order."""
    return tuple(m for m, t in TARGETS.items() if t.structure == structure)


def structure_consumer(structure: str) -> str:
    """The matrix that consumes a structure's units (o_proj, down_proj)."""
    return next(m for m in structure_matrices(structure) if TARGETS[m].consumer)
