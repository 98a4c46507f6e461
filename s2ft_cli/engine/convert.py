"""Select, co-permute and convert a model in place (paper §3), the engine of the library's
``get_s2ft_model`` (``adapter/runtime.py``, which adds the adapter's ``save_pretrained``);
and the selection a recipe makes, as its run would make it (``s2ft select``)."""

from __future__ import annotations

import torch
from torch import nn

from ..errors import S2FTError
from .config import DATA_STRATEGIES, S2FTConfig
from .experts import S2Experts
from .ffn import recomputing_forwards
from .layers import S2Layer, S2Linear, Update
from .losses import lean_forward
from .permute import Layout, apply_layout, plan_layout
from .selection import Selection, calibration_data, select_units
from .shapes import (
    ModelShape,
    get_family,
    model_shape,
    place_of,
    replace_module,
    role_slots,
)
from .state import Conversion, state_of
from .targets import TARGETS


def convert_model(
    model: nn.Module,
    config: S2FTConfig | dict,
    selection: Selection | None = None,
    calibration: list[dict] | None = None,
) -> nn.Module:
    """The engine of ``get_s2ft_model`` (which adds the adapter's ``save_pretrained``):
    selects units (or takes ``selection``), co-permutes every structure that has a trainable
    matrix, freezes every parameter and replaces each weight holding selected units with an
    S² layer (:class:`S2Linear`, :class:`S2Experts`) whose zero-initialised deltas cover the
    selected blocks; the logits are
    unchanged until training updates a delta. The model's S²FT state records the conversion
    and installs ``model.s2ft_selection`` (the selection, original layout), the memory-lean
    loss of ``model(..., labels=...)`` (:func:`~.losses.lean_forward`) and FFNs that
    recompute their activation in the backward pass (:mod:`~.ffn`)."""
    if not isinstance(config, S2FTConfig):
        config = S2FTConfig(**config)
    state = state_of(model)
    state.check("convert")
    shape = model_shape(model)
    if selection is None:
        selection = select_units(model, config, calibration)
    elif selection.shape != shape:
        raise S2FTError(
            f"The selection was made for a model of shape {selection.shape}, not this one "
            f"({shape}); select again for this model."
        )
    else:
        selection.validate()
    layout, selection = plan_layout(selection)
    apply_layout(model, layout, shape)
    for p in model.parameters():
        p.requires_grad_(False)
    _install_s2_layers(model, shape, selection, layout)
    state.conversion = Conversion(config, selection, layout)
    # what merge_adapter takes off again (state.uninstall)
    state.install(model, "s2ft_selection", selection)  # the library API's name for it
    if (forward := lean_forward(model)) is not None:
        state.install(model, "forward", forward)
    for ffn, ffn_forward in recomputing_forwards(model):
        state.install(ffn, "forward", ffn_forward)
    return model


def _install_s2_layers(
    model: nn.Module, shape: ModelShape, selection: Selection, layout: Layout
) -> None:
    """Replace every stored weight holding selected units by an S² layer whose deltas
    cover their (co-permuted, contiguous) rows or columns: an :class:`S2Linear` per 2-D
    weight (a fused one collects the blocks of all its roles), an :class:`S2Experts` per
    experts module (per expert and weight)."""
    linear: dict[str, list] = {}
    experts: dict[str, dict[str, dict[int, list]]] = {}
    for layer, per_matrix in selection.units.items():
        for matrix in per_matrix:
            plan = layout[layer][TARGETS[matrix].structure]
            perm = plan.unit_perm(matrix)
            slots = role_slots(shape, layer, matrix)
            for slot, (start, stop) in zip(slots, plan.blocks[matrix], strict=True):
                if start == stop:
                    continue
                index = slot.ids(range(start - slot.first, stop - slot.first))
                original = slot.ids([perm[i] - slot.first for i in range(start, stop)])
                if slot.place.experts:
                    per_expert = experts.setdefault(slot.path, {}).setdefault(slot.place.param, {})
                    per_expert.setdefault(slot.expert, []).append((index, original))
                else:
                    linear.setdefault(slot.path, []).append((slot, index, original))
    for path, blocks in linear.items():
        slot = blocks[0][0]
        module = S2Linear(
            model.get_submodule(path),
            axis=slot.axis,
            index=torch.cat([index for _, index, _ in blocks]),
            original_index=torch.cat([original for _, _, original in blocks]),
            transposed=slot.place.transposed,
        )
        replace_module(model, path, module)
    for path, weights in experts.items():
        blocks = {
            name: {
                expert: (torch.cat([i for i, _ in pairs]), torch.cat([o for _, o in pairs]), None)
                for expert, pairs in per_expert.items()
            }
            for name, per_expert in weights.items()
        }
        replace_module(model, path, S2Experts(model.get_submodule(path), blocks))


def unfused_layers(
    model: nn.Module, updates: dict[str, Update], trainable: bool = False
) -> dict[str, S2Layer]:
    """S² layers applying ``updates`` (adapter names → updates of the stored weights, in
    the model's layout) on the fly, by module path: an :class:`S2Linear` per 2-D weight,
    an :class:`S2Experts` per experts module."""
    layers: dict[str, S2Layer] = {}
    experts: dict[str, dict[str, dict[int, tuple]]] = {}
    family = get_family(model)
    for name, u in updates.items():
        place = place_of(family, name)
        transposed = place is not None and place.transposed
        if place is None or not place.experts:
            o = u.oriented(transposed)
            base = model.get_submodule(name)
            layers[name] = S2Linear(
                base, o.axis, o.index, o.delta, trainable, u.delta.dtype, transposed=transposed
            )
            continue
        path, _, param = name.rpartition(".")
        stored = getattr(model.get_submodule(path), param).shape[1:]
        per_expert = experts.setdefault(path, {}).setdefault(param, {})
        for expert, local in u.per_expert(stored[u.dim]).items():
            o = local.oriented(transposed)
            per_expert[expert] = (o.index, o.index, o.delta)
    for path, blocks in experts.items():
        dtype = next(d for per in blocks.values() for *_, d in per.values()).dtype
        layers[path] = S2Experts(model.get_submodule(path), blocks, trainable, dtype)
    return layers


def recipe_selection(recipe) -> tuple[Selection, int]:
    """The units a recipe's run trains (original layout, after GQA regrouping) and the
    model's parameter count, without training: random selection reads only the config
    (a meta-device model); the scoring strategies load the weights, and the data-driven
    ones measure calibration batches of the training data (on a GPU when there is one)."""
    from ..data import load_datasets
    from .models import load_model, load_tokenizer

    r, cfg = recipe, recipe.s2ft
    model = load_model(
        r.model.name_or_path,
        r.model.dtype,
        r.model.trust_remote_code,
        seed=r.train.seed,
        weights=cfg.strategy != "random",
    )
    calibration = None
    if cfg.strategy in DATA_STRATEGIES:
        if r.data is None:
            raise S2FTError(
                f"s2ft.strategy {cfg.strategy} measures the model on calibration data; the "
                "recipe needs a data: section (data.train)."
            )
        tokenizer = load_tokenizer(r.model.name_or_path, r.model.trust_remote_code)
        train_set = load_datasets(r.data, r.data_seed, tokenizer).train
        calibration = calibration_data(cfg, train_set, tokenizer.pad_token_id)
        if torch.cuda.is_available():
            model.to("cuda")
    _, selection = plan_layout(select_units(model, cfg, calibration))
    return selection, sum(p.numel() for p in model.parameters())
