"""S²FT adapters on disk and in a model (paper §5): save, load (unfused), merge and unmerge;
fuse, unfuse and switch at run time.

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
from dataclasses import dataclass
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


def _check_fingerprint(expected: dict, model: nn.Module, path: str, force: bool) -> None:
    """Refuse a base that is not the adapter's, naming what differs (``path`` names the
    adapter, e.g. "Adapter runs/x/adapter")."""
    fix = (
        "Load the adapter onto the base model it was trained on"
        f" ({expected.get('name_or_path') or 'see its adapter_config.json'})."
    )
    get_architecture(model)
    shape = model_shape(model).__dict__
    for key, want in expected["shape"].items():
        if shape.get(key) != want:
            raise AdapterMismatchError(
                f"{path} was trained on a different base model: its {key} is {want}, "
                f"this model's is {shape.get(key)}. {fix}"
            )
    for name, want in expected["matrices"].items():
        try:
            weight = model.get_submodule(name).weight
        except AttributeError:
            raise AdapterMismatchError(
                f"{path} adapts {name}, which this model does not have. {fix}"
            ) from None
        if list(weight.shape) != want:
            raise AdapterMismatchError(
                f"{path} expects {name} of shape {want}, this model's is "
                f"{list(weight.shape)}. {fix}"
            )
        want_sum = expected["checksum"]["values"][name]
        got = _checksum(weight)
        if not force and abs(got - want_sum) > CHECKSUM_RTOL * abs(want_sum):
            raise AdapterMismatchError(
                f"{path} was trained on other weights: the checksum (mean |W|) of "
                f"{name} is {want_sum:.6g} in the adapter's base and {got:.6g} here. {fix} "
                "If you are sure the weights are compatible (e.g. a re-saved copy), pass "
                "force=True (--force); shapes are still checked."
            )


@dataclass
class Update:
    """The rows (``axis="rows"``) or columns (``"cols"``) of one matrix an adapter changes,
    in the original layout: ``W[index] += delta`` or ``W[:, index] += delta``."""

    axis: str
    index: torch.Tensor
    delta: torch.Tensor

    @property
    def dim(self) -> int:
        return 0 if self.axis == "rows" else 1


@dataclass(eq=False)
class Adapter:
    """An adapter in memory: its config (with the base's fingerprint) and, per adapted
    matrix (full module path), its :class:`Update`. ``source`` names it in messages."""

    config: dict
    updates: dict[str, Update]
    source: str = "adapter"

    @classmethod
    def load(cls, path: str | Path) -> Adapter:
        """Read and validate an adapter directory (every tensor against the fingerprint's
        matrix shapes) without a model."""
        path = Path(path)
        config, tensors = read_adapter(path)
        try:
            fingerprint = config["base_model"]["fingerprint"]
            matrices = dict(fingerprint["matrices"])
            dict(fingerprint["shape"]), dict(fingerprint["checksum"]["values"])
        except (KeyError, TypeError, ValueError) as err:
            raise S2FTError(
                f"{path / CONFIG_NAME} lacks the base model's fingerprint ({err}); the file is "
                "damaged — re-export the adapter."
            ) from None
        adapter = cls(config, {}, f"Adapter {path}")
        for key in sorted(k for k in tensors if k.endswith(".delta")):
            name = key.removesuffix(".delta")
            axis = "rows" if f"{name}.rows" in tensors else "cols"
            index, delta = tensors.get(f"{name}.{axis}"), tensors[key]
            shape = matrices.get(name)
            if shape is None or index is None or index.dtype != torch.long or index.ndim != 1:
                raise S2FTError(
                    f"{path / WEIGHTS_NAME}: {name}.delta has no int64 {name}.rows or "
                    f"{name}.cols for a matrix of the fingerprint; the file is damaged — "
                    "re-export the adapter."
                )
            out, inp = shape
            limit = out if axis == "rows" else inp
            want = (len(index), inp) if axis == "rows" else (out, len(index))
            if len(index) == 0 or index.min() < 0 or index.max() >= limit or delta.shape != want:
                raise S2FTError(
                    f"{path / WEIGHTS_NAME}: {name} needs {axis} ids in [0, {limit}) and a delta "
                    f"of shape {want}, got {len(index)} ids and {tuple(delta.shape)}; the file "
                    "is damaged — re-export the adapter."
                )
            adapter.updates[name] = Update(axis, index, delta)
        return adapter

    def check_base(self, model: nn.Module, force: bool = False) -> None:
        """Refuse a base model this adapter was not trained on, naming what differs
        (``force`` skips the weight checksums, never the shapes)."""
        expected = {**self.config["base_model"]["fingerprint"]}
        expected["name_or_path"] = self.config["base_model"].get("name_or_path")
        try:
            _check_fingerprint(expected, model, self.source, force)
        except (KeyError, TypeError) as err:
            raise S2FTError(
                f"{self.source}: its config lacks part of the base model's fingerprint ({err}); "
                "the file is damaged — re-export the adapter."
            ) from None

    def to(self, device=None, dtype: torch.dtype | None = None) -> Adapter:
        """The same adapter with its tensors on ``device`` and deltas in ``dtype``: do it
        once, so that fusing and switching copy nothing."""
        updates = {
            name: Update(u.axis, u.index.to(device), u.delta.to(device=device, dtype=dtype))
            for name, u in self.updates.items()
        }
        return Adapter(self.config, updates, self.source)

    def save(self, path: str | Path) -> Path:
        """Write the adapter directory under a temporary name, then rename it."""
        tensors: dict[str, torch.Tensor] = {}
        for name, u in sorted(self.updates.items()):
            tensors[f"{name}.{u.axis}"] = u.index.cpu().contiguous()
            tensors[f"{name}.delta"] = u.delta.detach().cpu().contiguous()

        def write(tmp: Path) -> None:
            save_file(tensors, str(tmp / WEIGHTS_NAME), metadata={"format": "pt"})
            (tmp / CONFIG_NAME).write_text(json.dumps(self.config, indent=1))

        path = Path(path)
        atomic_write_dir(path, write)
        return path


def _updates_of(modules: dict[str, S2Linear]) -> dict[str, Update]:
    """The S² layers' deltas in the original layout, rows/columns in ascending order."""
    updates = {}
    for name, m in modules.items():
        order = torch.argsort(m.original_index)
        delta = m.delta.detach()
        delta = (
            delta[order.to(delta.device)] if m.axis == "rows" else delta[:, order.to(delta.device)]
        )
        updates[name] = Update(m.axis, m.original_index[order].contiguous(), delta)
    return updates


def save_adapter(model: nn.Module, path: str | Path) -> Path:
    """Write the model's S²FT update as an adapter directory in the original layout.

    The directory is written under a temporary name and renamed when complete.
    """
    return adapter_of(model).save(path)


def adapter_of(model: nn.Module) -> Adapter:
    """The model's S²FT update (trained or loaded) as an :class:`Adapter` in the original
    layout, with its config and the base's fingerprint."""
    modules = _adapter_modules(model)
    if not modules:
        raise S2FTError(
            "This model has no S²FT adapter to save: convert it with get_s2ft_model() (and "
            "train it) or load an adapter first."
        )
    if getattr(model, "s2ft_config", None) is not None:
        settings = model.s2ft_config.model_dump()
        settings["selection"] = model.s2ft_selection.to_dict()["units"]
    else:  # an adapter loaded onto a base: keep what it was trained with
        kept = ("targets", "strategy", "order", "allocation", "layers", "seed", "calibration")
        settings = {
            k: v
            for k, v in getattr(model, "s2ft_adapter_config", {}).items()
            if k in (*kept, "selection")
        }
    config = adapter_config(
        getattr(model.config, "_name_or_path", "") or "",
        fingerprint(model, {n: m.weight for n, m in modules.items()}),
        settings,
        next(iter(modules.values())).delta.dtype,
    )
    return Adapter(config, _updates_of(modules), "The model's adapter")


def adapter_config(base: str, base_fingerprint: dict, settings: dict, dtype) -> dict:
    """``adapter_config.json`` of the format: the base and its fingerprint, what the
    adapter was made with (``settings``), the deltas' dtype and the tool version."""
    return {
        "format": ADAPTER_FORMAT,
        "version": ADAPTER_VERSION,
        "base_model": {"name_or_path": base, "fingerprint": base_fingerprint},
        **settings,
        "dtype": str(dtype).removeprefix("torch."),
        "tool_version": f"s2ft {__version__}",
    }


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
        raise S2FTError(
            f"{path / CONFIG_NAME} is not valid JSON ({err}); the file is damaged — re-export "
            "the adapter (s2ft export RUN_DIR --out DIR)."
        ) from err
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
            f"{path / WEIGHTS_NAME} is not a readable safetensors file ({err}); it is damaged "
            "or not an s2ft adapter — re-export it (adapters are read only as safetensors, so "
            "no code in a file can run)."
        ) from err
    return config, tensors


def load_adapter(model: nn.Module, path: str | Path, force: bool = False) -> nn.Module:
    """Attach an adapter to a plain base model, unfused: the base weights stay untouched
    and the update is applied on the fly by :class:`S2Linear` layers."""
    if (
        getattr(model, "s2ft_layout", None) is not None
        or _adapter_modules(model)
        or getattr(model, "s2ft_served", None)
    ):
        raise S2FTError(
            "This model already carries an S²FT adapter or conversion; load adapters onto a "
            "plain base model (merge_adapter() fuses the current one first)."
        )
    adapter = Adapter.load(path)
    adapter.check_base(model, force)
    for name, u in adapter.updates.items():
        base = model.get_submodule(name)
        layer = S2Linear(base, u.axis, u.index, u.delta, False, delta_dtype=u.delta.dtype)
        replace_module(model, name, layer)
    model.s2ft_adapter_config = adapter.config
    return model


def _fused(model: nn.Module) -> list[tuple[Adapter, dict[str, torch.Tensor]]]:
    """The adapters fused into the model, oldest first, each with the rows/columns its
    matrices had before."""
    return model.__dict__.setdefault("s2ft_fused", [])


@torch.no_grad()
def fuse(model: nn.Module, adapter: Adapter) -> None:
    """Add the adapter's update into the weights, touching only its rows/columns; the
    values they had are kept so that :func:`unfuse` restores them exactly (paper §5).
    Check the adapter against the base once (``adapter.check_base``) and move it to the
    weights' device and dtype (``adapter.to``) before fusing and switching often."""
    fused = _fused(model)
    if any(a is adapter for a, _ in fused):
        raise S2FTError(f"{adapter.source} is already fused into this model.")
    weights = {}
    for name, u in adapter.updates.items():  # check all before changing any
        try:
            weight = model.get_submodule(name).weight
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
        index = u.index.to(weight.device)
        before[name] = weight.index_select(u.dim, index)
        weight.index_add_(u.dim, index, u.delta.to(weight))
    fused.append((adapter, before))


@torch.no_grad()
def unfuse(model: nn.Module, adapter: Adapter) -> None:
    """Take a fused adapter out: its rows/columns get back exactly the values they had
    before :func:`fuse` (in any dtype). Adapters fused later onto the same matrices must
    be unfused first."""
    fused = _fused(model)
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
        weight = model.get_submodule(name).weight
        weight.index_copy_(u.dim, u.index.to(weight.device), values.to(weight))


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
    modules = _adapter_modules(model)
    if not modules:
        raise S2FTError("This model has no S²FT adapter to merge.")
    twice = sorted({n for a, _ in _fused(model) for n in a.updates} & set(modules))
    if twice:
        raise S2FTError(
            f"{twice[0]} already has a fused adapter; unmerge_adapter() it before merging "
            "another one onto the same matrices."
        )
    adapter = Adapter({}, _updates_of(modules), "The merged adapter")
    for name, m in modules.items():
        replace_module(model, name, m.unload())
    layout = getattr(model, "s2ft_layout", None)
    if layout is not None:
        apply_layout(model, layout, model_shape(model), inverse=True)
    for attr in ("s2ft_layout", "s2ft_config", "s2ft_selection", "s2ft_adapter_config"):
        if hasattr(model, attr):
            delattr(model, attr)
    fuse(model, adapter)
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


def unmerge_adapter(model: nn.Module) -> nn.Module:
    """Take every fused adapter out again, newest first: the rows/columns they changed get
    back the values they had (exactly, in any dtype). The plain base model."""
    fused = _fused(model)
    if not fused:
        raise S2FTError("This model has no fused S²FT adapter to unmerge.")
    while fused:
        unfuse(model, fused[-1][0])
    return model
