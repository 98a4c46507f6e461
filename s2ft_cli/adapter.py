"""S²FT adapters on disk and in a model (paper §5): save, load (unfused), merge and unmerge;
fuse, unfuse and switch at run time.

An adapter is the trained update as rows or columns of the original (un-permuted)
matrices. Directory format, version 2:

* ``s2ft_adapter.json``: ``format: "s2ft-adapter"``, ``version: 2``, the base model's
  name and fingerprint (architecture, shapes, statistics of the adapted weights that see
  reordered values and small changes: see ``PROBE_METHOD``), the targets, strategy,
  seed, allocation, delta dtype and the tool version;
* ``s2ft_adapter.safetensors``: for each adapted matrix ``M`` (full module path)
  ``M.cols`` (int64 column ids) and ``M.delta`` of shape ``(out, len(cols))``, or
  ``M.rows`` and ``M.delta`` of shape ``(len(rows), in)``. Applying means
  ``W[:, cols] += delta`` / ``W[rows, :] += delta``.

Version 1 had the same contents under PEFT's file names (``adapter_config.json``,
``adapter_model.safetensors``), which transformers and PEFT took for a PEFT adapter: it is
still read. A PEFT LoRA export of an adapter (``peft_format.py``) is read back as the
adapter it came from.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn
from torch.distributed.tensor import DTensor

from .errors import AdapterMismatchError, S2FTError
from .files import atomic_write_dir, read_json
from .layers import S2Linear
from .models import get_architecture, model_shape, module_path, replace_module, unit_index
from .permute import apply_layout
from .sharding import full_tensor
from .state import (
    adapter_save_pretrained,
    remember_base_fingerprint,
    state_of,
)
from .targets import TARGETS
from .version import __version__

ADAPTER_FORMAT = "s2ft-adapter"
ADAPTER_VERSION = 2
CONFIG_NAME = "s2ft_adapter.json"
WEIGHTS_NAME = "s2ft_adapter.safetensors"
# Version 1's file names (PEFT's): read, never written.
V1_FILES = {1: ("adapter_config.json", "adapter_model.safetensors")}

# The base's fingerprint (paper §5: an adapter belongs to one base). Per adapted matrix W
# (n × m), in its original layout: ‖W‖_F and K statistics z_k = a_kᵀ W b_k / ‖W‖_F with
# seeded random-sign (Rademacher) probes a_k ∈ {±1}^n, b_k ∈ {±1}^m. Over the probes each
# z_k has mean 0 and variance exactly 1 whatever W is, and a change E of W moves it by
# a_kᵀ E b_k / ‖W‖_F, of variance ‖E‖²_F / ‖W‖²_F. The RMS over k of the change in z,
# measured (min–max over the adapted matrices of stories260K and two test models):
#   cast to bfloat16 (8-bit significand):     0.0011–0.0023 (≈ the relative rounding error)
#   cast to float16:                           0.00014–0.00025
#   moved to another device:                   float64 rounding (~1e-15)
#   Gaussian noise of 1% of the weights' std:  0.0072–0.0124
#   values reordered (all, rows or columns):   1.05–1.8 (the z's are then unrelated)
# PROBE_THRESHOLD lies between (≈ the geometric mean of 0.0023 and 0.0072). With K = 32
# probes the squared RMS of K draws N(0, s²) is s²·χ²_K / K: 1% noise (s = 0.01) stays
# below 0.004 with probability P(χ²_32 < 5.12) ≈ 1.5e-8 per matrix, a bf16 copy
# (s ≈ 0.0017) rises above it with P(χ²_32 > 177) ≈ 1e-21. Noise is measured against ‖W‖_F,
# i.e. against √(std² + mean²): 1% noise is expected above the threshold while |mean| <
# 2·std (the projections measured have |mean| < 0.04·std). z is blind to a rescaled W, so
# ‖W‖_F is compared as well, at NORM_RTOL (a bf16 cast moves it by < 2e-4 on these small
# matrices, less on larger ones; 1% noise by < 7e-4).
PROBE_METHOD = "Rademacher probes z_k = a_k^T W b_k / ||W||_F in float64, original layout"
PROBE_SEED = 20241209
PROBE_COUNT = 32
PROBE_THRESHOLD = 0.004
NORM_RTOL = 1e-3
# The fingerprint of adapters written before the probes, still written beside them (so
# older versions of s2ft check new adapters) and still checked where no probes exist:
# mean |W| is blind to reordered values and to small noise, which the probes see.
CHECKSUM_METHOD = "float64 mean |W| of each adapted matrix"
# Relative tolerance of the mean |W| checksum: a dtype cast (fp32 <-> bf16) moves the
# mean |W| of a matrix by far less; a different checkpoint moves it by more.
CHECKSUM_RTOL = 1e-4
# Elements of a weight converted to float64 at a time: the fingerprint never copies a
# whole weight (32 MiB of float64 per chunk, on the weight's own device).
FINGERPRINT_CHUNK = 1 << 22


def _adapter_modules(model: nn.Module) -> dict[str, S2Linear]:
    return {name: m for name, m in model.named_modules() if isinstance(m, S2Linear)}


@lru_cache(maxsize=8)
def _probes(seed: int, count: int, rows: int, cols: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The ±1 probes of an ``rows × cols`` matrix, ``(rows, count)`` and ``(cols, count)``
    in float64: drawn on the CPU from a seeded generator, the same on every machine."""
    g = torch.Generator().manual_seed(seed)
    signs = torch.randint(0, 2, (rows + cols, count), generator=g, dtype=torch.int64)
    signs = (2 * signs - 1).to(torch.float64)
    return signs[:rows], signs[rows:]


@dataclass(frozen=True)
class MatrixStatistics:
    """What the fingerprint records of one weight matrix (see ``PROBE_METHOD``)."""

    mean_abs: float
    norm: float
    z: tuple[float, ...]


@torch.no_grad()
def matrix_statistics(
    weight: torch.Tensor,
    rows: torch.Tensor | None = None,
    cols: torch.Tensor | None = None,
    seed: int = PROBE_SEED,
    count: int = PROBE_COUNT,
) -> MatrixStatistics:
    """Mean |W|, ‖W‖_F and the probe statistics of ``weight`` in float64, in the original
    layout: ``rows[r]`` / ``cols[c]`` is the original position of the stored row ``r`` /
    column ``c`` (None: as stored). A co-permuted weight is not un-permuted: the probes are
    (``aᵀ W b = a[rows]ᵀ W_stored b[cols]``). The weight is read in row chunks of
    ``FINGERPRINT_CHUNK`` elements, each converted on its own device: no copy of the whole
    weight is made."""
    n, m = weight.shape
    # float64 where the device has it (MPS has not: its chunks go to the CPU)
    device = weight.device if weight.device.type != "mps" else torch.device("cpu")
    a, b = _probes(seed, count, n, m)
    a = (a if rows is None else a[rows.cpu()]).to(device)
    b = (b if cols is None else b[cols.cpu()]).to(device)
    projected = torch.zeros(count, dtype=torch.float64, device=device)
    square_sum = torch.zeros((), dtype=torch.float64, device=device)
    abs_sum = torch.zeros((), dtype=torch.float64, device=device)
    step = max(1, FINGERPRINT_CHUNK // max(m, 1))
    for start in range(0, n, step):
        chunk = weight[start : start + step].to(device=device, dtype=torch.float64)
        projected += (a[start : start + step] * (chunk @ b)).sum(0)
        flat = chunk.reshape(-1)
        square_sum += flat @ flat
        abs_sum += flat.abs().sum()
    norm = square_sum.sqrt().item()
    z = (projected / norm).tolist() if norm > 0 else [0.0] * count
    return MatrixStatistics(abs_sum.item() / max(n * m, 1), norm, tuple(z))


def stored_positions(
    model: nn.Module, names
) -> dict[str, tuple[torch.Tensor | None, torch.Tensor | None]]:
    """For the matrices ``names`` of a model co-permuted for training (``s2ft_layout``),
    the original position of every stored row (producers) or column (consumers), as
    :func:`matrix_statistics` takes them; empty for a model in the original layout."""
    conversion = state_of(model).conversion
    if conversion is None:
        return {}
    layout = conversion.layout
    shape = model_shape(model)
    names = set(names)
    positions = {}
    for layer, structures in layout.items():
        for matrix, target in TARGETS.items():
            plan = structures.get(target.structure)
            path = module_path(model, layer, matrix)
            if plan is None or path not in names:
                continue
            index = unit_index(plan.unit_perm(matrix), shape.unit_width(matrix))
            positions[path] = (None, index) if target.consumer else (index, None)
    return positions


def fingerprint(model: nn.Module, weights: dict[str, torch.Tensor]) -> dict:
    """What identifies the base an adapter belongs to: architecture, shapes and, per
    adapted matrix, its statistics in the original layout (a co-permuted model's stored
    rows and columns are placed by :func:`stored_positions`)."""
    shape = model_shape(model)
    positions = stored_positions(model, weights)
    stats = {
        name: matrix_statistics(w, *positions.get(name, (None, None)))
        for name, w in sorted(weights.items())
    }
    return {
        "model_type": shape.model_type,
        "architectures": list(getattr(model.config, "architectures", None) or []),
        "shape": shape.__dict__,
        "matrices": {name: list(w.shape) for name, w in sorted(weights.items())},
        "checksum": {
            "method": CHECKSUM_METHOD,
            "values": {name: s.mean_abs for name, s in stats.items()},
        },
        "probes": {
            "method": PROBE_METHOD,
            "seed": PROBE_SEED,
            "count": PROBE_COUNT,
            "values": {name: {"norm": s.norm, "z": list(s.z)} for name, s in stats.items()},
        },
    }


def matrix_record(base_fingerprint: dict, name: str) -> dict:
    """What a fingerprint holds about one matrix: ``probes`` ((seed, count), norm, z) if
    it has this version's probes for it, and ``mean_abs`` (the mean |W|, which every
    adapter has). Raises KeyError, TypeError or ValueError on a damaged fingerprint."""
    record = {}
    probes = base_fingerprint.get("probes")
    if probes is not None and probes["method"] == PROBE_METHOD and name in probes["values"]:
        count, value = int(probes["count"]), probes["values"][name]
        z = tuple(float(x) for x in value["z"])
        if len(z) != count:
            raise ValueError(f"{count} probes, {len(z)} values for {name}")
        record["probes"] = ((int(probes["seed"]), count), float(value["norm"]), z)
    checksum = base_fingerprint.get("checksum")
    if checksum is not None and checksum.get("method", CHECKSUM_METHOD) == CHECKSUM_METHOD:
        record["mean_abs"] = float(checksum["values"][name])  # every adapter has it
    return record


def weights_differ(name: str, want: dict, got: dict, where: tuple[str, str]) -> str | None:
    """How matrix ``name`` differs between two :func:`matrix_record`s, ``want`` of base
    ``where[0]`` and ``got`` of ``where[1]`` (a phrase for a message), or None if it does
    not: by the probes where both have them with one seed and count, else by mean |W|
    (all that adapters from before the probes hold). KeyError if nothing is comparable."""
    if "probes" in want and "probes" in got and want["probes"][0] == got["probes"][0]:
        (_, count), want_norm, want_z = want["probes"]
        _, got_norm, got_z = got["probes"]
        distance = (sum((w - g) ** 2 for w, g in zip(want_z, got_z, strict=True)) / count) ** 0.5
        if distance > PROBE_THRESHOLD:
            return (
                f"{name} seen through {count} seeded random-sign probes differs by "
                f"{distance:.3g} (RMS) between {where[0]} and {where[1]}, where the same "
                f"weights cast to another dtype or moved to another device stay below "
                f"{PROBE_THRESHOLD}: its values were changed or reordered"
            )
        if abs(got_norm - want_norm) > NORM_RTOL * abs(want_norm):
            return (
                f"the Frobenius norm of {name} is {want_norm:.6g} in {where[0]} and "
                f"{got_norm:.6g} in {where[1]}"
            )
        return None
    want_sum, got_sum = want["mean_abs"], got["mean_abs"]
    if abs(got_sum - want_sum) > CHECKSUM_RTOL * abs(want_sum):
        return (
            f"the checksum (mean |W|) of {name} is {want_sum:.6g} in {where[0]} and "
            f"{got_sum:.6g} in {where[1]}"
        )
    return None


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
    weights = {}
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
        weights[name] = weight
    if force:
        return
    positions = stored_positions(model, weights)
    for name, weight in weights.items():
        want = matrix_record(expected, name)
        if not want:
            raise S2FTError(
                f"{path}: its fingerprint of {name} was written by another version of s2ft "
                "and cannot be checked by this one; upgrade s2ft, or pass force=True "
                "(--force) if you are sure it belongs to this base (shapes are still checked)."
            )
        seed, count = want["probes"][0] if "probes" in want else (PROBE_SEED, PROBE_COUNT)
        stats = matrix_statistics(weight, *positions.get(name, (None, None)), seed, count)
        got = {"probes": ((seed, count), stats.norm, stats.z), "mean_abs": stats.mean_abs}
        problem = weights_differ(name, want, got, ("the adapter's base", "this model"))
        if problem:
            raise AdapterMismatchError(
                f"{path} was trained on other weights: {problem}. {fix} If you are sure the "
                "weights are compatible (e.g. a re-saved copy), pass force=True (--force); "
                "shapes are still checked."
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
        matrix shapes) without a model; a PEFT export of an adapter reads as that adapter."""
        from .peft_format import is_peft_export, load_peft_export

        path = Path(path)
        if is_peft_export(path):
            return load_peft_export(path)
        config, tensors, files = read_adapter(path)
        return cls.from_tensors(config, tensors, f"Adapter {path}", files)

    @classmethod
    def from_tensors(
        cls, config: dict, tensors: dict, source: str, files: tuple[Path, Path]
    ) -> Adapter:
        """An adapter from its config and its file's tensors (``M.rows``/``M.cols`` and
        ``M.delta``), validated against the fingerprint's matrix shapes; ``files`` name the
        config and the weights in messages."""
        config_file, weights_file = files
        try:
            fingerprint = config["base_model"]["fingerprint"]
            matrices = dict(fingerprint["matrices"])
            dict(fingerprint["shape"]), dict(fingerprint["checksum"]["values"])
        except (KeyError, TypeError, ValueError) as err:
            raise S2FTError(
                f"{config_file} lacks the base model's fingerprint ({err}); the file is "
                "damaged — re-export the adapter."
            ) from None
        adapter = cls(config, {}, source)
        for key in sorted(k for k in tensors if k.endswith(".delta")):
            name = key.removesuffix(".delta")
            axis = "rows" if f"{name}.rows" in tensors else "cols"
            index, delta = tensors.get(f"{name}.{axis}"), tensors[key]
            shape = matrices.get(name)
            if shape is None or index is None or index.dtype != torch.long or index.ndim != 1:
                raise S2FTError(
                    f"{weights_file}: {name}.delta has no int64 {name}.rows or "
                    f"{name}.cols for a matrix of the fingerprint; the file is damaged — "
                    "re-export the adapter."
                )
            out, inp = shape
            limit = out if axis == "rows" else inp
            want = (len(index), inp) if axis == "rows" else (out, len(index))
            if len(index) == 0 or index.min() < 0 or index.max() >= limit or delta.shape != want:
                raise S2FTError(
                    f"{weights_file}: {name} needs {axis} ids in [0, {limit}) and a delta "
                    f"of shape {want}, got {len(index)} ids and {tuple(delta.shape)}; the file "
                    "is damaged — re-export the adapter."
                )
            adapter.updates[name] = Update(axis, index, delta)
        return adapter

    def check_base(self, model: nn.Module, force: bool = False) -> None:
        """Refuse a base model this adapter was not trained on, naming what differs
        (``force`` skips the weights' statistics, never the shapes)."""
        expected = {**self.config["base_model"]["fingerprint"]}
        expected["name_or_path"] = self.config["base_model"].get("name_or_path")
        try:
            _check_fingerprint(expected, model, self.source, force)
        except (KeyError, TypeError, ValueError) as err:
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
        delta = full_tensor(m.delta.detach())  # every process gathers a sharded one
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


def write_pretrained(model: nn.Module, path: str | Path, is_main_process: bool = True):
    """``save_pretrained`` of a converted or loaded model (see state.py): every process of
    a sharded model gathers the deltas, the main one writes."""
    sharded = any(isinstance(m.delta, DTensor) for m in _adapter_modules(model).values())
    if not (is_main_process or sharded):
        return None
    adapter = adapter_of(model)
    return adapter.save(path) if is_main_process else None


def base_fingerprint(model: nn.Module) -> dict:
    """The fingerprint of a converted model's base (its adapted weights as they are now)."""
    return fingerprint(model, {name: m.weight for name, m in _adapter_modules(model).items()})


def adapter_of(model: nn.Module) -> Adapter:
    """The model's S²FT update (trained or loaded) as an :class:`Adapter` in the original
    layout, with its config and the base's fingerprint."""
    state = state_of(model)
    state.check("save")
    modules = _adapter_modules(model)
    if state.conversion is not None:
        settings = state.conversion.config.model_dump()
        settings["selection"] = state.conversion.selection.to_dict()["units"]
    else:  # an adapter loaded onto a base: keep what it was trained with
        kept = ("targets", "strategy", "order", "allocation", "layers", "seed", "calibration")
        settings = {k: v for k, v in (state.loaded or {}).items() if k in (*kept, "selection")}
    if state.conversion is not None:  # its base is frozen: measured once, at the first save
        remember_base_fingerprint(model)
        base = state.conversion.base_fingerprint
    else:
        base = base_fingerprint(model)
    config = adapter_config(
        getattr(model.config, "_name_or_path", "") or "",
        base,
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


def _adapter_files(path: Path) -> tuple[Path, Path, int]:
    """The config and weights files of an adapter directory, and the version their names
    belong to."""
    names = {ADAPTER_VERSION: (CONFIG_NAME, WEIGHTS_NAME), **V1_FILES}
    for version, (config, weights) in names.items():
        if (path / config).is_file() and (path / weights).is_file():
            return path / config, path / weights, version
    raise S2FTError(
        f"{path} is not an s2ft adapter directory: it needs {CONFIG_NAME} and "
        f"{WEIGHTS_NAME} (written by save_adapter or `s2ft export`)."
    )


def read_adapter(path: str | Path) -> tuple[dict, dict[str, torch.Tensor], tuple[Path, Path]]:
    """The config, tensors and (config, weights) files of an adapter directory of this
    version or version 1, validated."""
    path = Path(path)
    config_file, weights_file, version = _adapter_files(path)
    config = read_json(
        config_file,
        "the file is damaged — re-export the adapter (s2ft export RUN_DIR --out DIR).",
    )
    if not isinstance(config, dict):
        config = {}
    if "peft_type" in config:
        raise S2FTError(
            f"{path} is a PEFT {config['peft_type']} adapter that s2ft did not write (its "
            f"{config_file.name} has peft_type, and there is no s2ft_source.json): load it "
            "with peft (PeftModel.from_pretrained(base, path)). s2ft reads its own adapters "
            "and its PEFT exports (s2ft export --format peft)."
        )
    if config.get("format") != ADAPTER_FORMAT or config.get("version") != version:
        raise S2FTError(
            f"{config_file} is not an {ADAPTER_FORMAT} version {version} config "
            f"(format {config.get('format')!r}, version {config.get('version')!r}); upgrade "
            "s2ft or re-export the adapter."
        )
    try:
        tensors = load_file(str(weights_file))
    except (SafetensorError, OSError) as err:
        raise S2FTError(
            f"{weights_file} is not a readable safetensors file ({err}); it is damaged "
            "or not an s2ft adapter — re-export it (adapters are read only as safetensors, so "
            "no code in a file can run)."
        ) from err
    return config, tensors, (config_file, weights_file)


def load_adapter(model: nn.Module, path: str | Path | Adapter, force: bool = False) -> nn.Module:
    """Attach an adapter (a directory, or one already read) to a plain base model, unfused:
    the base weights stay untouched and the update is applied on the fly by
    :class:`S2Linear` layers; ``model.save_pretrained(dir)`` writes it again."""
    state = state_of(model)
    state.check("load")
    adapter = path if isinstance(path, Adapter) else Adapter.load(path)
    adapter.check_base(model, force)
    for name, u in adapter.updates.items():
        base = model.get_submodule(name)
        layer = S2Linear(base, u.axis, u.index, u.delta, False, delta_dtype=u.delta.dtype)
        replace_module(model, name, layer)
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
    state = state_of(model)
    state.check("merge")
    modules = _adapter_modules(model)
    twice = sorted({n for a, _ in state_of(model).fused for n in a.updates} & set(modules))
    if twice:
        raise S2FTError(
            f"{twice[0]} already has a fused adapter; unmerge_adapter() it before merging "
            "another one onto the same matrices."
        )
    adapter = Adapter({}, _updates_of(modules), "The merged adapter")
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
    for name, m in _adapter_modules(model).items():
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
