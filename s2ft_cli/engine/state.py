"""The S²FT state of one model: what s2ft has done to it, and what it may do next.

Like PEFT's ``PeftModel``, every operation asks one object whether it is allowed:

==========  ==============================================  ================================
state       what the model holds                            left by
==========  ==============================================  ================================
plain       its own layers (fused adapters may sit in the   —
            weights: ``fused``, oldest first)
converted   co-permuted structures and S² layers with       ``merge_adapter`` (→ plain,
            trainable deltas (paper §3): config, selection, with the update fused)
            layout
loaded      one adapter on S² layers, unfused (its config)  ``merge_adapter``,
                                                            ``unload_adapter`` (→ plain)
serving     several adapters, one per sequence (names)     ``stop_serving`` (→ plain)
==========  ==============================================  ================================

Fusing (``fuse``/``unfuse``/``unmerge_adapter``) writes rows and columns of the original
layout into the weights, so it is refused while the weights are co-permuted; a model
with fused adapters may be converted (training continues from the fused weights), but
they come out again only after the training is merged.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from torch import nn

from ..errors import S2FTError

STATE_ATTRIBUTE = "s2ft_state"

# operation -> the states it is allowed in
ALLOWED = {
    "convert": {"plain"},
    "load": {"plain"},
    "serve": {"plain", "serving"},
    "stop_serving": {"serving"},
    "merge": {"converted", "loaded"},
    "unload": {"loaded"},
    "save": {"converted", "loaded"},
    "fuse": {"plain", "loaded", "serving"},
    "unfuse": {"plain", "loaded", "serving"},
}
CONVERTED = (
    "This model is converted for training (co-permuted), so its rows and columns are not in "
    "the original layout; merge_adapter() the training first (or reload the base)"
)
# (operation, state) -> why it is refused and what to do instead
REFUSALS = {
    ("convert", "converted"): "This model is already converted to S²FT; convert a fresh base "
    "model.",
    ("convert", "loaded"): "This model carries a loaded adapter; merge_adapter() or reload the "
    "base first.",
    ("convert", "serving"): "This model serves adapters per sequence; stop_serving() first.",
    ("load", "converted"): "This model already carries an S²FT adapter or conversion; load "
    "adapters onto a plain base model (merge_adapter() fuses the current one first).",
    ("serve", "converted"): "This model carries an S²FT adapter or conversion; serve adapters "
    "from a plain base model (unload_adapter() or merge_adapter() the current one first).",
    ("save", "plain"): "This model has no S²FT adapter to save: convert it with "
    "get_s2ft_model() (and train it) or load an adapter first.",
    ("merge", "plain"): "This model has no S²FT adapter to merge.",
    ("unload", "plain"): "This model has no S²FT adapter to unload.",
    ("unload", "converted"): "This model was converted for training (co-permuted); "
    "merge_adapter() it, or reload the base model, instead of unloading.",
    ("stop_serving", "plain"): "This model serves no S²FT adapters.",
    ("fuse", "converted"): f"{CONVERTED}; then fuse adapters into it.",
    ("unfuse", "converted"): f"{CONVERTED}; then take fused adapters out.",
}
SAME_AS = {  # refusals worded like another state's
    ("load", "loaded"): ("load", "converted"),
    ("load", "serving"): ("load", "converted"),
    ("serve", "loaded"): ("serve", "converted"),
    ("save", "serving"): ("save", "plain"),
    ("merge", "serving"): ("merge", "plain"),
    ("unload", "serving"): ("unload", "plain"),
    ("stop_serving", "converted"): ("stop_serving", "plain"),
    ("stop_serving", "loaded"): ("stop_serving", "plain"),
}


@dataclass
class Conversion:
    """How a model was converted for training: the config, the selection (original unit
    ids) and the co-permutation layout."""

    config: object
    selection: object
    layout: dict
    # the base's fingerprint (adapter/fingerprint.py) taken from the weights as loaded,
    # before they were sharded or quantized; None: taken when the adapter is written
    base_fingerprint: object | None = None


@dataclass
class Patch:
    """An attribute s2ft set on a module's instance (a method or a value), and what the
    instance held under that name before."""

    module: object
    name: str
    before: object = None
    had: bool = False


@dataclass
class S2FTState:
    """What s2ft has done to one model (see the module's docstring)."""

    conversion: Conversion | None = None
    loaded: dict | None = None  # the config of an adapter loaded unfused
    served: list[str] = field(default_factory=list)
    fused: list = field(default_factory=list)  # (Adapter, rows/columns before), oldest first
    patches: list[Patch] = field(default_factory=list)  # installed, oldest first

    def install(self, module: nn.Module, name: str, value) -> None:
        """Set ``module.name`` to ``value`` on the instance (a forward, save_pretrained,
        s2ft_selection), to be taken off by :meth:`uninstall`."""
        held = module.__dict__
        self.patches.append(Patch(module, name, held.get(name), name in held))
        held[name] = value

    def uninstall(self) -> None:
        """Take off everything :meth:`install` set, newest first: each instance holds what
        it held before (usually nothing: its class's methods again)."""
        while self.patches:
            patch = self.patches.pop()
            if patch.had:
                patch.module.__dict__[patch.name] = patch.before
            else:
                patch.module.__dict__.pop(patch.name, None)

    @property
    def name(self) -> str:
        if self.conversion is not None:
            return "converted"
        if self.loaded is not None:
            return "loaded"
        return "serving" if self.served else "plain"

    def check(self, operation: str) -> None:
        """Refuse ``operation`` where this state does not allow it, saying what to do."""
        state = self.name
        if state not in ALLOWED[operation]:
            key = (operation, state)
            raise S2FTError(REFUSALS[SAME_AS.get(key, key)])
        if operation == "convert" and self.fused:
            raise S2FTError(
                "This model has adapters fused into its weights, which conversion would "
                "co-permute; unmerge_adapter() them first, or save the merged model "
                "(save_pretrained) and load it as a new base."
            )


def state_of(model: nn.Module) -> S2FTState:
    """The model's S²FT state (a plain model gets an empty one)."""
    state = model.__dict__.get(STATE_ATTRIBUTE)
    if state is None:
        state = S2FTState()
        model.__dict__[STATE_ATTRIBUTE] = state
    return state
