"""Select, co-permute and convert a model in place (paper §3), the engine of the library's
``get_s2ft_model`` (``adapter/runtime.py``, which adds the adapter's ``save_pretrained``);
and the selection a recipe makes, as its run would make it (``s2ft select``)."""

from __future__ import annotations

from torch import nn

from ..errors import S2FTError
from .config import DATA_STRATEGIES, S2FTConfig
from .ffn import recomputing_forwards
from .layers import S2Linear
from .losses import lean_forward
from .models import get_linear, model_shape, module_path, replace_module, unit_index
from .permute import apply_layout, plan_layout
from .selection import Selection, calibration_data, select_units
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
    matrix, freezes every parameter and replaces each target matrix with an
    :class:`S2Linear` whose zero-initialised delta covers the selected block; the logits are
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
    for layer, per_matrix in selection.units.items():
        for matrix in per_matrix:
            plan = layout[layer][TARGETS[matrix].structure]
            start, stop = plan.blocks[matrix]
            width = shape.unit_width(matrix)
            module = S2Linear(
                get_linear(model, layer, matrix),
                axis=TARGETS[matrix].axis,
                index=unit_index(range(start, stop), width),
                original_index=unit_index(plan.original_units(matrix), width),
            )
            replace_module(model, module_path(model, layer, matrix), module)
    state.conversion = Conversion(config, selection, layout)
    # what merge_adapter takes off again (state.uninstall)
    state.install(model, "s2ft_selection", selection)  # the library API's name for it
    if (forward := lean_forward(model)) is not None:
        state.install(model, "forward", forward)
    for ffn, ffn_forward in recomputing_forwards(model):
        state.install(ffn, "forward", ffn_forward)
    return model


def recipe_selection(recipe) -> tuple[Selection, int]:
    """The units a recipe's run trains (original layout, after GQA regrouping) and the
    model's parameter count, without training: random selection reads only the config
    (a meta-device model); the scoring strategies load the weights, and the data-driven
    ones measure calibration batches of the training data (on a GPU when there is one)."""
    import torch

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
