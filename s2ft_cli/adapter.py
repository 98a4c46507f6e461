"""S²FT adapters on disk and in a model: save, load (unfused), merge and unmerge (paper §5).

An adapter is the trained update as rows or columns of the original (un-permuted)
matrices. Directory format, version 1:

* ``adapter_config.json``: ``format: "s2ft-adapter"``, ``version: 1``, the base model's
  name and fingerprint (architecture, shapes, a checksum of the adapted weights), the
  targets, strategy, seed, allocation, delta dtype and the tool version;
* ``adapter_model.safetensors``: for each adapted matrix ``M`` (full module path)
  ``M.cols`` (int64 column ids) and ``M.delta`` of shape ``(out, len(cols))``, or
  ``M.rows`` and ``M.delta`` of shape ``(len(rows), in)``. Applying means
  ``W[:, cols] += delta`` / ``W[rows, :] += delta``.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from . import __version__
from .errors import AdapterMismatchError, S2FTError
from .files import atomic_write_dir
from .layers import S2Linear
from .models import get_architecture, model_shape, replace_module
from .permute import apply_layout

ADAPTER_FORMAT = "s2ft-adapter"
ADAPTER_VERSION = 1
CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
# Relative tolerance of the weight checksum: a dtype cast (fp32 <-> bf16) moves the mean
# |W| of a matrix by far less; a different checkpoint moves it by more.
CHECKSUM_RTOL = 1e-4


def _adapter_modules(model: nn.Module) -> dict[str, S2Linear]:
    return {name: m for name, m in model.named_modules() if isinstance(m, S2Linear)}


@torch.no_grad()
def _checksum(weight: torch.Tensor) -> float:
    """Mean |W| in float64: robust to dtype casts and to co-permutation."""
    return weight.double().abs().mean().item()


def fingerprint(model: nn.Module, weights: dict[str, torch.Tensor]) -> dict:
    """What identifies the base an adapter belongs to."""
    shape = model_shape(model)
    return {
        "model_type": shape.model_type,
        "architectures": list(getattr(model.config, "architectures", None) or []),
        "shape": shape.__dict__,
        "matrices": {name: list(w.shape) for name, w in sorted(weights.items())},
        "checksum": {
            "method": "float64 mean |W| of each adapted matrix",
            "values": {name: _checksum(w) for name, w in sorted(weights.items())},
        },
    }


def _check_fingerprint(expected: dict, model: nn.Module, path: Path, force: bool) -> None:
    """Refuse a base that is not the adapter's, naming what differs."""
    fix = (
        "Load the adapter onto the base model it was trained on"
        f" ({expected.get('name_or_path') or 'see its adapter_config.json'})."
    )
    get_architecture(model)
    shape = model_shape(model).__dict__
    for key, want in expected["shape"].items():
        if shape.get(key) != want:
            raise AdapterMismatchError(
                f"Adapter {path} was trained on a different base model: its {key} is {want}, "
                f"this model's is {shape.get(key)}. {fix}"
            )
    for name, want in expected["matrices"].items():
        try:
            weight = model.get_submodule(name).weight
        except AttributeError:
            raise AdapterMismatchError(
                f"Adapter {path} adapts {name}, which this model does not have. {fix}"
            ) from None
        if list(weight.shape) != want:
            raise AdapterMismatchError(
                f"Adapter {path} expects {name} of shape {want}, this model's is "
                f"{list(weight.shape)}. {fix}"
            )
        want_sum = expected["checksum"]["values"][name]
        got = _checksum(weight)
        if not force and abs(got - want_sum) > CHECKSUM_RTOL * abs(want_sum):
            raise AdapterMismatchError(
                f"Adapter {path} was trained on other weights: the checksum (mean |W|) of "
                f"{name} is {want_sum:.6g} in the adapter's base and {got:.6g} here. {fix} "
                "If you are sure the weights are compatible (e.g. a re-saved copy), pass "
                "force=True (--force); shapes are still checked."
            )


def save_adapter(model: nn.Module, path: str | Path) -> Path:
    """Write the model's S²FT update as an adapter directory in the original layout.

    The directory is written under a temporary name and renamed when complete.
    """
    modules = _adapter_modules(model)
    if not modules:
        raise S2FTError(
            "This model has no S²FT adapter to save: convert it with get_s2ft_model() (and "
            "train it) or load an adapter first."
        )
    tensors: dict[str, torch.Tensor] = {}
    for name, m in modules.items():
        order = torch.argsort(m.original_index)
        key = "rows" if m.axis == "rows" else "cols"
        delta = m.delta.detach().cpu()
        delta = delta[order] if m.axis == "rows" else delta[:, order]
        tensors[f"{name}.{key}"] = m.original_index[order].contiguous()
        tensors[f"{name}.delta"] = delta.contiguous()
    if getattr(model, "s2ft_config", None) is not None:
        settings = model.s2ft_config.model_dump()
    else:  # an adapter loaded onto a base: keep what it was trained with
        settings = {
            k: v
            for k, v in getattr(model, "s2ft_adapter_config", {}).items()
            if k in ("targets", "strategy", "allocation", "layers", "seed")
        }
    config = {
        "format": ADAPTER_FORMAT,
        "version": ADAPTER_VERSION,
        "base_model": {
            "name_or_path": getattr(model.config, "_name_or_path", "") or "",
            "fingerprint": fingerprint(model, {n: m.weight for n, m in modules.items()}),
        },
        **settings,
        "dtype": str(next(iter(modules.values())).delta.dtype).removeprefix("torch."),
        "tool_version": f"s2ft {__version__}",
    }

    def write(tmp: Path) -> None:
        save_file(tensors, str(tmp / WEIGHTS_NAME), metadata={"format": "pt"})
        (tmp / CONFIG_NAME).write_text(json.dumps(config, indent=1))

    path = Path(path)
    atomic_write_dir(path, write)
    return path


def read_adapter(path: str | Path) -> tuple[dict, dict[str, torch.Tensor]]:
    """The config and tensors of an adapter directory, validated."""
    path = Path(path)
    if not (path / CONFIG_NAME).is_file() or not (path / WEIGHTS_NAME).is_file():
        raise S2FTError(
            f"{path} is not an s2ft adapter directory: it needs {CONFIG_NAME} and "
            f"{WEIGHTS_NAME} (written by save_adapter or `s2ft export`)."
        )
    try:
        config = json.loads((path / CONFIG_NAME).read_text())
    except json.JSONDecodeError as err:
        raise S2FTError(f"{path / CONFIG_NAME} is not valid JSON ({err}).") from err
    if not isinstance(config, dict):
        config = {}
    if config.get("format") != ADAPTER_FORMAT or config.get("version") != ADAPTER_VERSION:
        raise S2FTError(
            f"{path / CONFIG_NAME} is not an {ADAPTER_FORMAT} version {ADAPTER_VERSION} config "
            f"(format {config.get('format')!r}, version {config.get('version')!r}); upgrade "
            "s2ft or re-export the adapter."
        )
    try:
        tensors = load_file(str(path / WEIGHTS_NAME))
    except (SafetensorError, OSError) as err:
        raise S2FTError(
            f"{path / WEIGHTS_NAME} is not a readable safetensors file ({err})."
        ) from err
    return config, tensors


def load_adapter(model: nn.Module, path: str | Path, force: bool = False) -> nn.Module:
    """Attach an adapter to a plain base model, unfused: the base weights stay untouched
    and the update is applied on the fly by :class:`S2Linear` layers."""
    path = Path(path)
    if getattr(model, "s2ft_layout", None) is not None or _adapter_modules(model):
        raise S2FTError(
            "This model already carries an S²FT adapter or conversion; load adapters onto a "
            "plain base model (merge_adapter() fuses the current one first)."
        )
    config, tensors = read_adapter(path)
    try:
        expected = {**config["base_model"]["fingerprint"]}
        expected["name_or_path"] = config["base_model"].get("name_or_path")
        _check_fingerprint(expected, model, path, force)
    except (KeyError, TypeError) as err:
        raise S2FTError(
            f"{path / CONFIG_NAME} lacks the base model's fingerprint ({err}); the file is "
            "damaged — re-export the adapter."
        ) from None
    layers = {}  # validate everything before touching the model
    for key in sorted(k for k in tensors if k.endswith(".delta")):
        name = key.removesuffix(".delta")
        axis = "rows" if f"{name}.rows" in tensors else "cols"
        index, delta = tensors.get(f"{name}.{axis}"), tensors[key]
        base = model.get_submodule(name) if name in expected["matrices"] else None
        if base is None or index is None or index.dtype != torch.long or index.ndim != 1:
            raise S2FTError(
                f"{path / WEIGHTS_NAME}: {name}.delta has no int64 {name}.rows or {name}.cols "
                "for a matrix of the fingerprint; the file is damaged — re-export the adapter."
            )
        limit = base.out_features if axis == "rows" else base.in_features
        shape = (
            (len(index), base.in_features) if axis == "rows" else (base.out_features, len(index))
        )
        if len(index) == 0 or index.min() < 0 or index.max() >= limit or delta.shape != shape:
            raise S2FTError(
                f"{path / WEIGHTS_NAME}: {name} needs {axis} ids in [0, {limit}) and a delta of "
                f"shape {shape}, got {len(index)} ids and {tuple(delta.shape)}; the file is "
                "damaged — re-export the adapter."
            )
        layers[name] = (base, axis, index, delta)
    for name, (base, axis, index, delta) in layers.items():
        layer = S2Linear(base, axis, index, delta=delta, trainable=False, delta_dtype=delta.dtype)
        replace_module(model, name, layer)
    model.s2ft_adapter_config = config
    return model


@torch.no_grad()
def merge_adapter(model: nn.Module) -> nn.Module:
    """Fuse the adapter into the weights and drop the S² layers (like PEFT's
    ``merge_and_unload``). A co-permuted model is returned to the original layout, so the
    result is a plain model of the base's architecture; ``unmerge_adapter`` can take the
    update out again."""
    modules = _adapter_modules(model)
    if not modules:
        raise S2FTError("This model has no S²FT adapter to merge.")
    fused = dict(getattr(model, "s2ft_fused", {}))
    twice = sorted(set(fused) & set(modules))
    if twice:
        raise S2FTError(
            f"{twice[0]} already has a fused adapter; unmerge_adapter() it before merging "
            "another one onto the same matrices."
        )
    for name, m in modules.items():
        # the rows/columns as they were, for unmerge_adapter to put back exactly
        before = m.weight.index_select(0 if m.axis == "rows" else 1, m.index).clone()
        fused[name] = (m.axis, m.original_index, m.delta.detach().clone(), before)
        replace_module(model, name, m.merge())
    layout = getattr(model, "s2ft_layout", None)
    if layout is not None:
        apply_layout(model, layout, model_shape(model), inverse=True)
    for attr in ("s2ft_layout", "s2ft_config", "s2ft_selection", "s2ft_adapter_config"):
        if hasattr(model, attr):
            delattr(model, attr)
    model.s2ft_fused = fused
    return model


def unload_adapter(model: nn.Module) -> nn.Module:
    """Remove an unfused adapter (from :func:`load_adapter`): the S² layers give way to
    plain linear layers on the untouched base weights."""
    modules = _adapter_modules(model)
    if not modules:
        raise S2FTError("This model has no S²FT adapter to unload.")
    if getattr(model, "s2ft_layout", None) is not None:
        raise S2FTError(
            "This model was converted for training (co-permuted); merge_adapter() it, or "
            "reload the base model, instead of unloading."
        )
    for name, m in modules.items():
        replace_module(model, name, m.unload())
    del model.s2ft_adapter_config
    return model


@torch.no_grad()
def unmerge_adapter(model: nn.Module) -> nn.Module:
    """Take a fused adapter out again: the rows/columns it changed get back the values they
    had before :func:`merge_adapter`, exactly in any dtype (subtracting the delta would
    round in bf16). The plain base model, with its weights restored."""
    fused = getattr(model, "s2ft_fused", None)
    if not fused:
        raise S2FTError("This model has no fused S²FT adapter to unmerge.")
    for name, (axis, index, _, before) in fused.items():
        weight = model.get_submodule(name).weight
        weight.index_copy_(0 if axis == "rows" else 1, index.to(weight.device), before)
    del model.s2ft_fused
    return model
