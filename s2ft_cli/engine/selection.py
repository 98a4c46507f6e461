"""Selection: which heads and channels of which layers are trained (paper §3.2, §4).

A strategy (``scores``) scores every (layer, unit) of a target matrix; the allocation then
takes the highest (``order: large``) or lowest (``small``) scores, either over all layers
at once (``global``, as the paper's code does) or the same number in every layer
(``per_layer``). Unit ids are always in the model's original layout.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from ..data import calibration_batches
from ..errors import S2FTError
from .config import DATA_STRATEGIES, S2FTConfig
from .scores import SCORERS
from .shapes import ModelShape, check_roles, model_shape

SELECTION_FORMAT = "s2ft-selection"


@dataclass
class Selection:
    """Selected unit ids per layer and target matrix, in the original layout."""

    shape: ModelShape
    config: S2FTConfig
    units: dict[int, dict[str, list[int]]]
    adjustments: list[str] = field(default_factory=list)
    # the strategy's scores per matrix, (scored layers, units); not saved
    scores: dict[str, torch.Tensor] | None = field(default=None, repr=False, compare=False)
    scored: list[int] | None = field(default=None, repr=False, compare=False)

    def trainable_params(self, layer: int | None = None, matrix: str | None = None) -> int:
        """Weights in the selected rows/columns, optionally of one layer and/or matrix."""
        total = 0
        for i, per_matrix in self.units.items():
            for m, ids in per_matrix.items():
                if (layer is None or i == layer) and (matrix is None or m == matrix):
                    total += len(ids) * self.shape.params_per_unit(m)
        return total

    def validate(self) -> Selection:
        """Refuse unit ids out of range, repeated or unsorted, and matrices that are not
        targets of the config (a hand-edited or foreign selection file) or roles the model's
        family lacks."""
        check_roles(self.shape.family, self.config.targets)
        for layer, per_matrix in self.units.items():
            if not 0 <= layer < self.shape.num_layers:
                raise S2FTError(
                    f"The selection names layer {layer}; the model has "
                    f"{self.shape.num_layers} layers."
                )
            for m, ids in per_matrix.items():
                if m not in self.config.targets:
                    raise S2FTError(
                        f"The selection trains {m} in layer {layer}, which is not among its "
                        f"targets {list(self.config.targets)}."
                    )
                limit = self.shape.num_units(m)
                if ids != sorted(set(ids)) or (ids and not 0 <= ids[0] <= ids[-1] < limit):
                    raise S2FTError(
                        f"The selection's layer {layer} {m} units must be distinct sorted ids "
                        f"in [0, {limit}); got {ids}."
                    )
        return self

    def summary(self, model_params: int) -> dict:
        """Per layer and matrix: selected units of how many, trainable parameters; and the
        total with its fraction of the model's ``model_params`` parameters."""
        rows = [
            {
                "layer": layer,
                "matrix": m,
                "units": ids,
                "of": self.shape.num_units(m),
                "params": len(ids) * self.shape.params_per_unit(m),
            }
            for layer, per_matrix in sorted(self.units.items())
            for m, ids in per_matrix.items()
        ]
        total = self.trainable_params()
        return {
            "rows": rows,
            "trainable_params": total,
            "model_params": model_params,
            "fraction": total / model_params,
        }

    def score_quartiles(self) -> list[tuple[str, list[float], tuple[float, float] | None]]:
        """Per scored matrix: the quartiles (min, 25%, median, 75%, max) of the strategy's
        unit scores over the scored layers, and the range the selected units' scores span."""
        rows = {layer: k for k, layer in enumerate(self.scored or [])}
        levels = torch.tensor([0.0, 0.25, 0.5, 0.75, 1.0], dtype=torch.float64)
        out = []
        for matrix, scores in (self.scores or {}).items():
            picked = [
                float(scores[rows[layer], unit])
                for layer, per_matrix in self.units.items()
                for unit in per_matrix.get(matrix, [])
                if layer in rows
            ]
            quartiles = scores.flatten().double().quantile(levels).tolist()
            out.append((matrix, quartiles, (min(picked), max(picked)) if picked else None))
        return out

    def to_dict(self) -> dict:
        return {
            "format": SELECTION_FORMAT,
            "version": 1,
            "shape": self.shape.__dict__,
            "config": self.config.model_dump(),
            "units": {str(i): per_matrix for i, per_matrix in sorted(self.units.items())},
            "trainable_params": self.trainable_params(),
            "adjustments": self.adjustments,
        }

    @classmethod
    def from_dict(cls, data: dict) -> Selection:
        if data.get("format") != SELECTION_FORMAT:
            raise S2FTError(
                f"This is not an s2ft selection (format {data.get('format')!r}); write one with "
                "`s2ft select RECIPE --json PATH`."
            )
        try:
            selection = cls(
                shape=ModelShape(**data["shape"]),
                config=S2FTConfig(**data["config"]),
                units={
                    int(i): {m: list(ids) for m, ids in pm.items()}
                    for i, pm in data["units"].items()
                },
                adjustments=list(data.get("adjustments", [])),
            )
        except (KeyError, TypeError, ValueError, AttributeError) as err:
            raise S2FTError(
                f"The selection file is damaged ({err}); write it again with "
                "`s2ft select RECIPE --json PATH`."
            ) from None
        return selection.validate()

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=1)

    @classmethod
    def from_json(cls, text: str) -> Selection:
        return cls.from_dict(json.loads(text))

    def save(self, path: str | Path) -> None:
        from ..files import atomic_write_text

        atomic_write_text(Path(path), self.to_json())


def _unit_count(config: S2FTConfig, matrix: str, units: int, layers: int) -> int:
    ratio = config.targets[matrix]
    pool = units * (layers if config.allocation == "global" else 1)
    count = int(ratio * pool)
    if count == 0:
        where = "over all trained layers" if config.allocation == "global" else "per layer"
        raise S2FTError(
            f"s2ft.targets.{matrix}: ratio {ratio} selects no unit ({ratio} × {pool} units "
            f"{where} < 1). Use at least {1 / pool:.4g}, or allocation: global to pool the "
            "units of all layers."
        )
    return count


def _capped(scores: torch.Tensor, count: int, small: bool, cap: int) -> list[int]:
    """The ``count`` best of a ``layers × units`` score table, at most ``cap`` per layer:
    down the order of :func:`_extreme`, a unit whose layer is full gives way to the next."""
    order = torch.argsort(scores.flatten(), descending=True, stable=True)
    per_layer, taken = [0] * scores.shape[0], []
    for flat in (order.flip(0) if small else order).tolist():
        row = flat // scores.shape[1]
        if per_layer[row] < cap:
            per_layer[row] += 1
            taken.append(flat)
            if len(taken) == count:
                break
    return taken


def _extreme(scores: torch.Tensor, count: int, small: bool) -> torch.Tensor:
    """Indices of the ``count`` largest scores, or of the ``count`` smallest: the head and
    the tail of one stable descending order, so that ties never put a unit in both."""
    order = torch.argsort(scores, descending=True, stable=True)
    return order[-count:] if small else order[:count]


def select_units(
    model: nn.Module, config: S2FTConfig, calibration: list[dict] | None = None
) -> Selection:
    """Choose the units to train, before any layout adjustment (see ``permute``).
    ``calibration``: batches (``input_ids``, ``attention_mask``, ``labels``) that the
    activation and gradient strategies measure on."""
    shape = model_shape(model)
    check_roles(shape.family, config.targets)
    layers = config.layers or list(range(shape.num_layers))
    if layers[-1] >= shape.num_layers:
        raise S2FTError(
            f"s2ft.layers names layer {layers[-1]}, but the model has {shape.num_layers} layers "
            f"(0..{shape.num_layers - 1}); list layers in that range, or leave s2ft.layers out "
            "to train all."
        )
    if config.strategy in DATA_STRATEGIES and not calibration:
        raise S2FTError(
            f"s2ft.strategy {config.strategy} measures the model on calibration data: give a "
            "recipe with data.train (s2ft.calibration sets how much), or pass calibration "
            "batches to get_s2ft_model()."
        )
    scores = SCORERS[config.strategy](model, shape, config, layers, calibration)
    units: dict[int, dict[str, list[int]]] = {i: {} for i in layers}
    small = config.order == "small" and config.strategy != "random"
    for matrix, score in scores.items():
        n_units = shape.num_units(matrix)
        count = _unit_count(config, matrix, n_units, len(layers))
        cap = config.max_units_per_layer
        if cap is not None and cap * len(layers) < count:
            raise S2FTError(
                f"s2ft.targets.{matrix} asks for {count} units, more than max_units_per_layer "
                f"{cap} × {len(layers)} layers hold; raise the cap to at least "
                f"{-(-count // len(layers))} or lower the ratio."
            )
        if config.allocation == "global":
            flat = (
                _extreme(score.flatten(), count, small).tolist()
                if cap is None
                else _capped(score, count, small, cap)
            )
            chosen = [(int(f) // n_units, int(f) % n_units) for f in flat]
        else:
            chosen = [
                (row, int(u))
                for row in range(len(layers))
                for u in _extreme(score[row], count, small)
            ]
        for row, unit in chosen:
            units[layers[row]].setdefault(matrix, []).append(unit)
    units = {i: {m: sorted(ids) for m, ids in pm.items()} for i, pm in units.items() if pm}
    return Selection(shape=shape, config=config, units=units, scores=scores, scored=layers)


def calibration_data(config: S2FTConfig, train_set: list, pad_id: int) -> list[dict] | None:
    """The batches a data-driven strategy measures on (a seeded draw of
    ``s2ft.calibration.samples`` training examples); None for the other strategies."""
    if config.strategy not in DATA_STRATEGIES:
        return None
    c = config.calibration
    return calibration_batches(train_set, c.samples, c.batch_size, config.seed, pad_id)
