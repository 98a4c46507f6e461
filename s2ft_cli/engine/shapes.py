"""Each model's shape, and where its units are stored (paper §3.1).

:class:`ModelShape` gives, for one model, how many units of each kind a block has (query
and key/value heads, FFN channels: of every expert and of a shared expert in a
mixture-of-experts layer) and how wide they are. :func:`role_slots` turns a family's
:class:`~.families.Place` of a role into :class:`Slot`\\ s: the stored weights of one layer
that hold its units, with the rows or columns of each unit. :class:`Matrix` reads any
stored weight as the 2-D matrix adapters index: the weight itself, or a 3-D experts tensor
with its experts stacked along the axis its units lie on.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ..errors import S2FTError
from .families import FAMILIES, Family, Place, supported_types
from .targets import TARGETS, Unit, structure_matrices


@dataclass(frozen=True)
class Part:
    """A range of a structure's units that is co-permuted on its own: the heads of an
    attention block (moved by GQA groups of ``group`` query heads), the channels of a
    dense FFN, of one expert, or of a shared expert."""

    start: int
    count: int
    group: int = 1


@dataclass(frozen=True)
class ModelShape:
    """The dimensions of a supported model that S²FT's selection and layout need.

    ``intermediate_size`` is the FFN's width, or each expert's in a mixture-of-experts
    layer (``num_experts`` > 0), whose FFN units are then every expert's channels, expert
    by expert, followed by the ``shared_expert_size`` channels of a shared expert."""

    model_type: str
    num_layers: int
    hidden_size: int
    intermediate_size: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    num_experts: int = 0
    shared_expert_size: int = 0

    @property
    def family(self) -> Family:
        return FAMILIES[self.model_type]

    @property
    def group_size(self) -> int:
        """Query heads per key/value head (1 for multi-head attention)."""
        return self.num_heads // self.num_kv_heads

    def unit_count(self, unit: Unit) -> int:
        """How many units of a kind a block has."""
        channels = max(self.num_experts, 1) * self.intermediate_size + self.shared_expert_size
        return {
            Unit.QUERY_HEAD: self.num_heads,
            Unit.KV_HEAD: self.num_kv_heads,
            Unit.CHANNEL: channels,
        }[unit]

    def num_units(self, matrix: str) -> int:
        """How many selectable units a role has: query heads for q/o, key/value heads for
        k/v, FFN channels (of all experts) for gate/up/down."""
        return self.unit_count(TARGETS[matrix].unit)

    def unit_width(self, matrix: str) -> int:
        """Rows (producers) or columns (consumers) of the role's weight per unit."""
        return 1 if TARGETS[matrix].unit is Unit.CHANNEL else self.head_dim

    def parts(self, structure: str) -> list[Part]:
        """The ranges of the structure's units (its consumer's: query heads, channels)
        that are co-permuted each on its own."""
        if structure == "attention":
            return [Part(0, self.num_heads, self.group_size)]
        if not self.num_experts:
            return [Part(0, self.intermediate_size)]
        size = self.intermediate_size
        parts = [Part(e * size, size) for e in range(self.num_experts)]
        if self.shared_expert_size:
            parts.append(Part(self.num_experts * size, self.shared_expert_size))
        return parts

    def params_per_unit(self, matrix: str) -> int:
        """Weights of one unit's rows or columns (biases stay frozen)."""
        return self.unit_width(matrix) * self.hidden_size


def known_family(model_or_config) -> Family | None:
    """The family of a model or config; None for a model type s2ft does not know."""
    config = getattr(model_or_config, "config", model_or_config)
    return FAMILIES.get(getattr(config, "model_type", None))


def get_family(model_or_config) -> Family:
    """The family of a model or config; refuses a model type s2ft does not know."""
    family = known_family(model_or_config)
    if family is None:
        model_type = getattr(
            getattr(model_or_config, "config", model_or_config), "model_type", None
        )
        raise S2FTError(
            f"Model type {model_type!r} is not supported by s2ft. Supported model types: "
            f"{supported_types()} (`s2ft models` lists them with their roles). Use a "
            "checkpoint of one of these families."
        )
    return family


def _config_value(config, names: tuple[str, ...]):
    for name in names:
        if hasattr(config, name):
            return getattr(config, name)
    return None


def model_shape(model_or_config) -> ModelShape:
    """Read the dimensions from the config as the family names them; ``head_dim`` is never
    assumed to be hidden / heads when the config states it (Qwen3, Gemma)."""
    config = getattr(model_or_config, "config", model_or_config)
    family = get_family(config)
    num_heads = config.num_attention_heads
    num_kv_heads = family.kv_heads and getattr(config, family.kv_heads, None) or num_heads
    head_dim = family.head_dim and getattr(config, family.head_dim, None)
    head_dim = head_dim or config.hidden_size // num_heads
    if num_heads % num_kv_heads:
        raise S2FTError(
            f"The config has {num_heads} attention heads and {num_kv_heads} key/value heads; "
            "the number of heads must be a multiple of the number of key/value heads."
        )
    size = _config_value(config, family.ffn_size) or 4 * config.hidden_size
    experts = shared = 0
    if family.moe:
        experts = getattr(config, family.num_experts)
        shared = getattr(config, family.shared_size, 0) if family.shared_size else 0
        dense = getattr(config, "mlp_only_layers", None) or []
        if dense or getattr(config, "decoder_sparse_step", 1) != 1:
            raise S2FTError(
                f"This {config.model_type} config mixes dense and mixture-of-experts layers "
                f"(mlp_only_layers {dense}, decoder_sparse_step "
                f"{getattr(config, 'decoder_sparse_step', 1)}); s2ft supports models whose "
                "layers are all mixture-of-experts layers."
            )
    return ModelShape(
        model_type=config.model_type,
        num_layers=config.num_hidden_layers,
        hidden_size=config.hidden_size,
        intermediate_size=size,
        num_heads=num_heads,
        num_kv_heads=num_kv_heads,
        head_dim=head_dim,
        num_experts=experts,
        shared_expert_size=shared,
    )


def check_roles(family: Family, roles) -> None:
    """Refuse roles the family does not have, naming those it has."""
    missing = [r for r in roles if r not in family.places]
    if missing:
        raise S2FTError(
            f"s2ft.targets names {', '.join(missing)}, which a {family.model_type} model does "
            f"not have ({family.description}). Its roles: {', '.join(family.roles)} "
            "(`s2ft models` lists every family's)."
        )


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    """The model's list of Transformer blocks."""
    return model.get_submodule(get_family(model).layers)


# ---------------------------------------------------------------------------------------
# Where the units are stored


def unit_index(units, width: int, device=None) -> torch.Tensor:
    """Row (producer) or column (consumer) ids of ``units``, each ``width`` wide, in order."""
    ids = torch.as_tensor(list(units), dtype=torch.long, device=device)
    return (ids[:, None] * width + torch.arange(width, device=device)).flatten()


@dataclass(frozen=True)
class Slot:
    """One stored weight of a layer holding units ``first .. first + count`` of a role.

    ``path``: the module holding the weight (an experts module for a 3-D weight, whose
    expert ``expert`` is meant); the weight's rows (a producer) or columns (a consumer)
    of local unit ``u``, in its ``(out, in)`` orientation, are ``offset + u * stride +
    arange(width)``."""

    role: str
    path: str
    place: Place
    expert: int | None
    first: int
    count: int
    offset: int
    stride: int
    width: int

    @property
    def name(self) -> str:
        """The weight's name in adapters: the module path, or an experts tensor's path."""
        return self.path if self.place.param == "weight" else f"{self.path}.{self.place.param}"

    @property
    def axis(self) -> str:
        """``rows`` or ``cols`` of the ``(out, in)`` orientation the units lie along."""
        return TARGETS[self.role].axis

    def ids(self, units, device=None) -> torch.Tensor:
        """Rows or columns (``(out, in)`` orientation, within the expert) of local units."""
        base = torch.as_tensor(list(units), dtype=torch.long, device=device) * self.stride
        steps = torch.arange(self.width, device=device)
        return (base[:, None] + self.offset + steps).flatten()


def _role_lengths(shape: ModelShape, role: str, place: Place, count: int) -> list[int]:
    """Rows (or columns) of each role fused in ``place``'s weight, in storage order, with
    ``count`` units for the roles of ``role``'s unit (a per-expert width)."""
    same = TARGETS[role].unit
    return [
        (count if TARGETS[r].unit is same else shape.num_units(r)) * shape.unit_width(r)
        for r in place.fused or (role,)
    ]


def _placed(shape: ModelShape, role: str, place: Place, count: int) -> tuple[int, int, int]:
    """(offset, stride, width) of a role's units in a weight of ``count`` units per role."""
    width = shape.unit_width(role)
    fused = place.fused or (role,)
    if place.interleaved:
        return fused.index(role) * width, len(fused) * width, width
    before = _role_lengths(shape, role, place, count)[: fused.index(role)]
    return sum(before), width, width


def role_slots(shape: ModelShape, layer: int, role: str) -> list[Slot]:
    """The weights of ``layer`` holding ``role``'s units, in unit order: one for attention
    and a dense FFN; one per expert, then a shared expert's, in a mixture-of-experts FFN."""
    family = shape.family
    prefix = f"{family.layers}.{layer}"
    place = family.places[role]
    path = f"{prefix}.{place.module}"
    if not place.experts:
        count = shape.num_units(role)
        return [Slot(role, path, place, None, 0, count, *_placed(shape, role, place, count))]
    size = shape.intermediate_size
    slots = [
        Slot(role, path, place, e, e * size, size, *_placed(shape, role, place, size))
        for e in range(shape.num_experts)
    ]
    if shape.shared_expert_size:
        own = Place(f"{family.shared_expert}.{role}")
        slots.append(
            Slot(
                role, f"{prefix}.{own.module}", own, None, shape.num_experts * size,
                shape.shared_expert_size, 0, 1, 1,
            )
        )  # fmt: skip
    return slots


def structure_slots(shape: ModelShape, layer: int, structure: str) -> list[Slot]:
    """Every slot of every role of a structure the family has, trainable or not."""
    roles = [r for r in structure_matrices(structure) if r in shape.family.places]
    return [s for r in roles for s in role_slots(shape, layer, r)]


def _weight_length(shape: ModelShape, slot: Slot) -> int:
    """Rows (producers) or columns (consumers) of the slot's weight (of one expert)."""
    return sum(_role_lengths(shape, slot.role, slot.place, slot.count))


def units_of(shape: ModelShape, name: str, ids: torch.Tensor) -> list[tuple]:
    """The unit each stored id (an adapter's row or column of weight ``name``) belongs to:
    ``(role, expert, unit)``; a fused weight's ids belong to several roles."""
    slots = [
        slot
        for layer in range(shape.num_layers)
        if name.startswith(f"{shape.family.layers}.{layer}.")
        for structure in ("attention", "ffn")
        for slot in structure_slots(shape, layer, structure)
        if slot.name == name
    ]
    lengths = {slot: _weight_length(shape, slot) for slot in slots if slot.expert is not None}
    out = []
    for i in ids.tolist():
        for slot in slots:
            local = i
            if slot.expert is not None:
                expert, local = divmod(i, lengths[slot])
                if expert != slot.expert:
                    continue
            step, rest = divmod(local - slot.offset, slot.stride)
            if local >= slot.offset and rest < slot.width and step < slot.count:
                out.append((slot.role, slot.expert, step))
                break
    return out


def flip(axis: str) -> str:
    return "cols" if axis == "rows" else "rows"


def stored_axis(place: Place, axis: str) -> str:
    """The axis of the stored weight that the ``(out, in)`` orientation's ``axis`` is."""
    return flip(axis) if place.transposed else axis


# ---------------------------------------------------------------------------------------
# Stored weights as the 2-D matrices adapters index


class Matrix:
    """A stored weight as adapters index it: a 2-D weight as stored, or a 3-D experts
    tensor ``E × A × B`` with its experts stacked along the axis its units lie on: rows
    ``e·A + r`` of ``[W₀; W₁; …]`` (``E·A × B``), or columns ``e·B + c`` of
    ``[W₀ W₁ …]`` (``A × E·B``)."""

    def __init__(self, tensor: torch.Tensor, axis: str = "rows"):
        self.tensor, self.axis = tensor, axis
        if tensor.ndim == 3:
            experts, a, b = tensor.shape
            self.shape = (experts * a, b) if axis == "rows" else (a, experts * b)
        else:
            self.shape = tuple(tensor.shape)

    @property
    def side_by_side(self) -> bool:
        return self.tensor.ndim == 3 and self.axis == "cols"

    def _split(self, index: torch.Tensor):
        _, a, b = self.tensor.shape
        index = index.to(self.tensor.device)
        rows = torch.arange(a, device=index.device)[:, None]
        return index // b, rows, index % b

    def _flat(self) -> torch.Tensor:
        return self.tensor.view(-1, self.shape[1]) if self.tensor.ndim == 3 else self.tensor

    def select(self, dim: int, index: torch.Tensor) -> torch.Tensor:
        """Rows (``dim`` 0) or columns (1) at ``index``, a new tensor."""
        if self.side_by_side:
            e, r, c = self._split(index)
            return self.tensor[e[None], r, c[None]]
        return self._flat().index_select(dim, index.to(self.tensor.device))

    def add_(self, dim: int, index: torch.Tensor, values: torch.Tensor) -> None:
        """``M[index] += values`` (``dim`` 0) or ``M[:, index] += values``, in place."""
        if self.side_by_side:
            e, r, c = self._split(index)
            self.tensor.index_put_((e[None], r, c[None]), values.to(self.tensor), accumulate=True)
        else:
            self._flat().index_add_(dim, index.to(self.tensor.device), values.to(self.tensor))

    def copy_(self, dim: int, index: torch.Tensor, values: torch.Tensor) -> None:
        """``M[index] = values`` (``dim`` 0) or ``M[:, index] = values``, in place."""
        if self.side_by_side:
            e, r, c = self._split(index)
            self.tensor.index_put_((e[None], r, c[None]), values.to(self.tensor))
        else:
            self._flat().index_copy_(dim, index.to(self.tensor.device), values.to(self.tensor))

    def row_chunks(self, rows: int):
        """``(start, block)``: the matrix's rows ``start .. start + rows`` at a time (a
        block is a copy only for experts side by side)."""
        if not self.side_by_side:
            flat = self._flat()
            for start in range(0, self.shape[0], rows):
                yield start, flat[start : start + rows]
            return
        for start in range(0, self.shape[0], rows):
            block = self.tensor[:, start : start + rows]  # E × r × B
            yield start, block.transpose(0, 1).reshape(block.shape[1], -1)


def place_of(family: Family, name: str) -> Place | None:
    """The family's place of a stored weight by its adapter name (a 2-D weight's module
    path, an experts tensor's path); None for a weight no role of the family lives in."""
    places = list(family.places.values())
    if family.shared_expert:
        places += [
            Place(f"{family.shared_expert}.{r}") for r in ("gate_proj", "up_proj", "down_proj")
        ]
    for place in places:
        suffix = f".{place.module}.{place.param}" if place.experts else f".{place.module}"
        if name.endswith(suffix):
            return place
    return None


def expert_weight_axis(param: str) -> str:
    """The ``(out, in)`` axis an experts tensor's channels lie on: columns of
    ``down_proj``, rows of ``gate_up_proj`` (or ``up_proj``)."""
    return "cols" if param == "down_proj" else "rows"


def matrix_of(model: nn.Module, name: str) -> Matrix:
    """The stored weight an adapter names (a module's ``weight``, or an experts tensor) as
    a :class:`Matrix`. AttributeError if the model has no such weight."""
    place = place_of(get_family(model), name)
    if place is None or not place.experts:
        return Matrix(model.get_submodule(name).weight)
    owner, _, param = name.rpartition(".")
    tensor = getattr(model.get_submodule(owner), param)
    return Matrix(tensor, stored_axis(place, expert_weight_axis(param)))


def replace_module(model: nn.Module, name: str, module: nn.Module) -> None:
    """Put ``module`` at the dotted path ``name`` of the model."""
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, module)
