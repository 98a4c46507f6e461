"""S²FT models at run time (paper §5): converted for training (``get_s2ft_model``), an
adapter loaded unfused, fused into the weights and taken out again (exactly), switched,
merged and unloaded. Every operation asks the model's state (``engine/state.py``) first.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from ..engine.config import S2FTConfig
from ..engine.convert import convert_model, unfused_layers
from ..engine.layers import s2_layers
from ..engine.permute import apply_layout
from ..engine.selection import Selection
from ..engine.shapes import matrix_of, model_shape, replace_module
from ..engine.state import state_of
from ..errors import S2FTError
from .format import Adapter, adapter_save_pretrained, updates_of


def get_s2ft_model(
    model: nn.Module,
    config: S2FTConfig | dict,
    selection: Selection | None = None,
    calibration: list[dict] | None = None,
) -> nn.Module:
    """Convert ``model`` to S²FT in place and return it.

    Selects units (or takes ``selection``), co-permutes every structure that has a
    trainable matrix, freezes every parameter and replaces each target matrix with an
    :class:`S2Linear` whose zero-initialised delta covers the selected block. The logits
    are unchanged until training updates a delta. ``model.s2ft_selection`` holds the
    selection used, in the original layout; the model's S²FT state records the conversion,
    ``model.save_pretrained(dir)`` writes the trained update as an S²FT adapter, and
    ``model(..., labels=...)`` computes ``s2ft train``'s memory-lean loss while training
    (:func:`~s2ft_cli.engine.losses.lean_forward`); its FFNs recompute their activation in
    the backward pass (:mod:`~s2ft_cli.engine.ffn`).
    ``calibration`` (batches of ``input_ids``, ``attention_mask``, ``labels``) is what the
    activation and gradient strategies measure.
    """
    convert_model(model, config, selection, calibration)
    # what merge_adapter takes off again (state.uninstall), with the conversion's patches
    state_of(model).install(model, "save_pretrained", adapter_save_pretrained(model))
    return model


def load_adapter(model: nn.Module, path: str | Path | Adapter, force: bool = False) -> nn.Module:
    """Attach an adapter (a directory, or one already read) to a plain base model, unfused:
    the base weights stay untouched and the update is applied on the fly by S² layers
    (``engine.convert.unfused_layers``); ``model.save_pretrained(dir)`` writes it again."""
    state = state_of(model)
    state.check("load")
    adapter = path if isinstance(path, Adapter) else Adapter.load(path)
    adapter.check_base(model, force)
    for module_path, layer in unfused_layers(model, adapter.updates).items():
        replace_module(model, module_path, layer)
    state.loaded = adapter.config
    state.install(model, "save_pretrained", adapter_save_pretrained(model))
    return model


@torch.no_grad()
def fuse(model: nn.Module, adapter: Adapter) -> None:
    """Add the adapter's update into the weights, touching only its rows/columns; the
    values they had are kept so that :func:`unfuse` restores them exactly (paper §5).
    Check the adapter against the base once (``adapter.check_base``) and move it to the
    weights' device and dtype (``adapter.to``) before fusing and switching often."""
    state_of(model).check("fuse")
    fused = state_of(model).fused
    if any(a is adapter for a, _ in fused):
        raise S2FTError(f"{adapter.source} is already fused into this model.")
    weights = {}
    for name, u in adapter.updates.items():  # check all before changing any
        try:
            weight = matrix_of(model, name)
        except AttributeError:
            raise S2FTError(f"{adapter.source} adapts {name}, which this model lacks.") from None
        size = list(weight.shape)
        size[u.dim] = len(u.index)
        if list(u.delta.shape) != size:
            raise S2FTError(
                f"{adapter.source}: {name} needs a delta of shape {size}, it has "
                f"{list(u.delta.shape)}; check it against this base (check_base)."
            )
        weights[name] = weight
    before = {}
    for name, u in adapter.updates.items():
        weight = weights[name]
        before[name] = weight.select(u.dim, u.index)
        weight.add_(u.dim, u.index, u.delta)
    fused.append((adapter, before))


@torch.no_grad()
def unfuse(model: nn.Module, adapter: Adapter) -> None:
    """Take a fused adapter out: its rows/columns get back exactly the values they had
    before :func:`fuse` (in any dtype). Adapters fused later onto the same matrices must
    be unfused first."""
    state_of(model).check("unfuse")
    fused = state_of(model).fused
    at = next((k for k, (a, _) in enumerate(fused) if a is adapter), None)
    if at is None:
        raise S2FTError(f"{adapter.source} is not fused into this model.")
    later = {n for a, _ in fused[at + 1 :] for n in a.updates} & set(adapter.updates)
    if later:
        raise S2FTError(
            f"{sorted(later)[0]} holds an adapter fused after {adapter.source}; unfuse that "
            "one first."
        )
    for name, values in fused.pop(at)[1].items():
        u = adapter.updates[name]
        matrix_of(model, name).copy_(u.dim, u.index, values)


def switch(model: nn.Module, current: Adapter | None, new: Adapter | None) -> None:
    """Serve ``new`` instead of ``current`` (either may be None: the base model)."""
    if current is not None:
        unfuse(model, current)
    if new is not None:
        fuse(model, new)


@torch.no_grad()
def merge_adapter(model: nn.Module) -> nn.Module:
    """Fuse the adapter into the weights and drop the S² layers (like PEFT's
    ``merge_and_unload``). A co-permuted model is returned to the original layout, so the
    result is a plain model of the base's architecture; ``unmerge_adapter`` can take the
    update out again."""
    state = state_of(model)
    state.check("merge")
    modules = s2_layers(model)
    names = {n for path, m in modules.items() for n in m.weight_names(path)}
    twice = sorted({n for a, _ in state_of(model).fused for n in a.updates} & names)
    if twice:
        raise S2FTError(
            f"{twice[0]} already has a fused adapter; unmerge_adapter() it before merging "
            "another one onto the same matrices."
        )
    adapter = Adapter({}, updates_of(modules), "The merged adapter")
    for name, m in modules.items():
        replace_module(model, name, m.unload())
    if state.conversion is not None:
        apply_layout(model, state.conversion.layout, model_shape(model), inverse=True)
    state.conversion = state.loaded = None
    state.uninstall()
    fuse(model, adapter)
    return model


def unload_adapter(model: nn.Module) -> nn.Module:
    """Remove an unfused adapter (from :func:`load_adapter`): the S² layers give way to
    plain linear layers on the untouched base weights."""
    state = state_of(model)
    state.check("unload")
    for name, m in s2_layers(model).items():
        replace_module(model, name, m.unload())
    state.loaded = None
    state.uninstall()
    return model


def unmerge_adapter(model: nn.Module) -> nn.Module:
    """Take every fused adapter out again, newest first: the rows/columns they changed get
    back the values they had (exactly, in any dtype). The plain base model."""
    state_of(model).check("unfuse")
    fused = state_of(model).fused
    if not fused:
        raise S2FTError("This model has no fused S²FT adapter to unmerge.")
    while fused:
        unfuse(model, fused[-1][0])
    return model
