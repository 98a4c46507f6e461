"""The base's fingerprint (paper §5: an adapter belongs to one base): what an adapter
records of the weights it was trained on, and the one place that compares two bases
(loading an adapter onto a model, combining adapters).

Per adapted matrix W (n × m), in its original layout: ‖W‖_F and K statistics
z_k = a_kᵀ W b_k / ‖W‖_F with seeded random-sign (Rademacher) probes a_k ∈ {±1}^n,
b_k ∈ {±1}^m. Over the probes each z_k has mean 0 and variance exactly 1 whatever W is,
and a change E of W moves it by a_kᵀ E b_k / ‖W‖_F, of variance ‖E‖²_F / ‖W‖²_F. The RMS
over k of the change in z, measured (min–max over the adapted matrices of stories260K and
two test models):
  cast to bfloat16 (8-bit significand):     0.0011–0.0023 (≈ the relative rounding error)
  cast to float16:                           0.00014–0.00025
  moved to another device:                   float64 rounding (~1e-15)
  Gaussian noise of 1% of the weights' std:  0.0072–0.0124
  values reordered (all, rows or columns):   1.05–1.8 (the z's are then unrelated)
PROBE_THRESHOLD lies between (≈ the geometric mean of 0.0023 and 0.0072). With K = 32
probes the squared RMS of K draws N(0, s²) is s²·χ²_K / K: 1% noise (s = 0.01) stays below
0.004 with probability P(χ²_32 < 5.12) ≈ 1.5e-8 per matrix, a bf16 copy (s ≈ 0.0017)
rises above it with P(χ²_32 > 177) ≈ 1e-21. Noise is measured against ‖W‖_F, i.e. against
√(std² + mean²): 1% noise is expected above the threshold while |mean| < 2·std (the
projections measured have |mean| < 0.04·std). z is blind to a rescaled W, so ‖W‖_F is
compared as well, at NORM_RTOL (a bf16 cast moves it by < 2e-4 on these small matrices,
less on larger ones; 1% noise by < 7e-4).

Adapters from before the probes hold the mean |W| of each matrix alone (still written
beside the probes, so that older versions of s2ft check new adapters): it is compared
where no probes of this method exist, and is blind to reordered values and small noise.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from functools import lru_cache

import torch
from torch import nn

from ..engine.layers import s2_layers
from ..engine.permute import reorders
from ..engine.shapes import Matrix, get_family, matrix_of, model_shape
from ..engine.state import state_of
from ..errors import AdapterMismatchError, S2FTError

PROBE_METHOD = "Rademacher probes z_k = a_k^T W b_k / ||W||_F in float64, original layout"
PROBE_SEED = 20241209
PROBE_COUNT = 32
PROBE_THRESHOLD = 0.004
NORM_RTOL = 1e-3
CHECKSUM_METHOD = "float64 mean |W| of each adapted matrix"
# Relative tolerance of the mean |W| checksum: a dtype cast (fp32 <-> bf16) moves the
# mean |W| of a matrix by far less; a different checkpoint moves it by more.
CHECKSUM_RTOL = 1e-4
# Elements of a weight converted to float64 at a time: the fingerprint never copies a
# whole weight (32 MiB of float64 per chunk, on the weight's own device).
FINGERPRINT_CHUNK = 1 << 22


@lru_cache(maxsize=8)
def _probes(seed: int, count: int, rows: int, cols: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The ±1 probes of an ``rows × cols`` matrix, ``(rows, count)`` and ``(cols, count)``
    in float64: drawn on the CPU from a seeded generator, the same on every machine."""
    g = torch.Generator().manual_seed(seed)
    signs = torch.randint(0, 2, (rows + cols, count), generator=g, dtype=torch.int64)
    signs = (2 * signs - 1).to(torch.float64)
    return signs[:rows], signs[rows:]


@dataclass(frozen=True)
class Probes:
    """The probe statistics of one matrix: ``count`` probes drawn from ``seed``, ‖W‖_F
    and the z's."""

    seed: int
    count: int
    norm: float
    z: tuple[float, ...]


@dataclass(frozen=True)
class MatrixPrint:
    """What a fingerprint records of one adapted matrix: its shape, its mean |W| and its
    probe statistics (None where the fingerprint holds none of this version's method)."""

    shape: tuple[int, int]
    mean_abs: float | None
    probes: Probes | None

    def differs(self, other: MatrixPrint, name: str, where: tuple[str, str]) -> str | None:
        """How matrix ``name`` differs between this record, of base ``where[0]``, and
        ``other``, of ``where[1]`` (a phrase for a message), or None if it does not: by the
        probes where both have them with one seed and count, else by mean |W|. KeyError if
        nothing is comparable."""
        mine, theirs = self.probes, other.probes
        if mine and theirs and (mine.seed, mine.count) == (theirs.seed, theirs.count):
            distance = (
                sum((w - g) ** 2 for w, g in zip(mine.z, theirs.z, strict=True)) / mine.count
            ) ** 0.5
            if distance > PROBE_THRESHOLD:
                return (
                    f"{name} seen through {mine.count} seeded random-sign probes differs by "
                    f"{distance:.3g} (RMS) between {where[0]} and {where[1]}, where the same "
                    f"weights cast to another dtype or moved to another device stay below "
                    f"{PROBE_THRESHOLD}: its values were changed or reordered"
                )
            if abs(theirs.norm - mine.norm) > NORM_RTOL * abs(mine.norm):
                return (
                    f"the Frobenius norm of {name} is {mine.norm:.6g} in {where[0]} and "
                    f"{theirs.norm:.6g} in {where[1]}"
                )
            return None
        if self.mean_abs is None or other.mean_abs is None:
            raise KeyError("mean_abs")
        if abs(other.mean_abs - self.mean_abs) > CHECKSUM_RTOL * abs(self.mean_abs):
            return (
                f"the checksum (mean |W|) of {name} is {self.mean_abs:.6g} in {where[0]} and "
                f"{other.mean_abs:.6g} in {where[1]}"
            )
        return None


@torch.no_grad()
def matrix_print(
    weight: torch.Tensor | Matrix,
    rows: torch.Tensor | None = None,
    cols: torch.Tensor | None = None,
    seed: int = PROBE_SEED,
    count: int = PROBE_COUNT,
) -> MatrixPrint:
    """Shape, mean |W|, ‖W‖_F and the probe statistics of ``weight`` (a 2-D tensor, or a
    stored weight as adapters index it: :class:`~s2ft_cli.engine.shapes.Matrix`) in
    float64, in the original layout: ``rows[r]`` / ``cols[c]`` is the original position of
    the stored row ``r`` / column ``c`` (None: as stored). A co-permuted weight is not
    un-permuted: the probes are (``aᵀ W b = a[rows]ᵀ W_stored b[cols]``). The weight is read
    in row chunks of ``FINGERPRINT_CHUNK`` elements, each converted on its own device: no
    copy of the whole weight is made."""
    matrix = weight if isinstance(weight, Matrix) else Matrix(weight)
    n, m = matrix.shape
    # float64 where the device has it (MPS has not: its chunks go to the CPU)
    device = matrix.tensor.device
    device = device if device.type != "mps" else torch.device("cpu")
    a, b = _probes(seed, count, n, m)
    a = (a if rows is None else a[rows.cpu()]).to(device)
    b = (b if cols is None else b[cols.cpu()]).to(device)
    projected = torch.zeros(count, dtype=torch.float64, device=device)
    square_sum = torch.zeros((), dtype=torch.float64, device=device)
    abs_sum = torch.zeros((), dtype=torch.float64, device=device)
    step = max(1, FINGERPRINT_CHUNK // max(m, 1))
    for start, block in matrix.row_chunks(step):
        chunk = block.to(device=device, dtype=torch.float64)
        projected += (a[start : start + step] * (chunk @ b)).sum(0)
        flat = chunk.reshape(-1)
        square_sum += flat @ flat
        abs_sum += flat.abs().sum()
    norm = square_sum.sqrt().item()
    z = (projected / norm).tolist() if norm > 0 else [0.0] * count
    return MatrixPrint((n, m), abs_sum.item() / max(n * m, 1), Probes(seed, count, norm, tuple(z)))


def stored_positions(
    model: nn.Module, names
) -> dict[str, tuple[torch.Tensor | None, torch.Tensor | None]]:
    """For the weights ``names`` (adapters' names) of a model co-permuted for training, the
    original position of every stored row or column their units lie on, as
    :func:`matrix_print` takes them (``permute.reorders``); empty for a model in the
    original layout."""
    conversion = state_of(model).conversion
    if conversion is None:
        return {}
    names = set(names)
    positions = {}
    for name, reorder in reorders(model, conversion.layout, model_shape(model)).items():
        if name in names:
            index = reorder.index
            positions[name] = (index, None) if reorder.axis == "rows" else (None, index)
    return positions


@dataclass(frozen=True)
class Fingerprint:
    """What identifies the base an adapter belongs to: architecture, shapes and, per
    adapted matrix (full module path), its :class:`MatrixPrint` in the original layout.
    Stored as ``base_model.fingerprint`` of the adapter's config (:meth:`to_dict`)."""

    model_type: str | None
    architectures: list[str]
    shape: dict
    matrices: dict[str, MatrixPrint]

    @classmethod
    def measure(cls, model: nn.Module, weights: dict[str, Matrix]) -> Fingerprint:
        """The fingerprint of ``weights`` (adapter name → stored weight) of ``model``; a
        co-permuted model's stored rows and columns are placed by :func:`stored_positions`."""
        shape = model_shape(model)
        positions = stored_positions(model, weights)
        return cls(
            shape.model_type,
            list(getattr(model.config, "architectures", None) or []),
            shape.__dict__,
            {
                name: matrix_print(w, *positions.get(name, (None, None)))
                for name, w in sorted(weights.items())
            },
        )

    @classmethod
    def of_base(cls, model: nn.Module) -> Fingerprint:
        """The fingerprint of the weights under a model's S² layers, as they are now."""
        names = [n for path, m in s2_layers(model).items() for n in m.weight_names(path)]
        return cls.measure(model, {name: matrix_of(model, name) for name in names})

    @classmethod
    def from_dict(cls, data: dict) -> Fingerprint:
        """Read a stored fingerprint: probes of another method (a later s2ft's) are not
        trusted, a checksum of another method is not read. Raises KeyError, TypeError or
        ValueError on a damaged one."""
        probes = data.get("probes")
        if probes is not None and probes["method"] != PROBE_METHOD:
            probes = None
        checksum = data.get("checksum")
        if checksum is not None and checksum.get("method", CHECKSUM_METHOD) != CHECKSUM_METHOD:
            checksum = None
        matrices = {}
        for name, shape in data["matrices"].items():
            stats = None
            if probes is not None and name in probes["values"]:
                seed, count = int(probes["seed"]), int(probes["count"])
                value = probes["values"][name]
                z = tuple(float(x) for x in value["z"])
                if len(z) != count:
                    raise ValueError(f"{count} probes, {len(z)} values for {name}")
                stats = Probes(seed, count, float(value["norm"]), z)
            mean_abs = float(checksum["values"][name]) if checksum is not None else None
            matrices[name] = MatrixPrint(tuple(shape), mean_abs, stats)
        return cls(data.get("model_type"), data.get("architectures"), dict(data["shape"]), matrices)

    def to_dict(self) -> dict:
        """The stored form (the adapter format's ``base_model.fingerprint``)."""
        probed = {name: m.probes for name, m in self.matrices.items() if m.probes}
        data = {
            "model_type": self.model_type,
            "architectures": self.architectures,
            "shape": self.shape,
            "matrices": {name: list(m.shape) for name, m in self.matrices.items()},
            "checksum": {
                "method": CHECKSUM_METHOD,
                "values": {
                    n: m.mean_abs for n, m in self.matrices.items() if m.mean_abs is not None
                },
            },
        }
        if probed:
            first = next(iter(probed.values()))
            data["probes"] = {
                "method": PROBE_METHOD,
                "seed": first.seed,
                "count": first.count,
                "values": {n: {"norm": p.norm, "z": list(p.z)} for n, p in probed.items()},
            }
        return data

    @classmethod
    def merged(cls, prints: list[Fingerprint]) -> Fingerprint:
        """The first fingerprint with every fingerprint's matrices: mean |W| of all, probes
        of those drawn like the first probes found (seed, count); a matrix without probes
        is then checked by its mean |W|."""
        drawn = next(
            (
                (m.probes.seed, m.probes.count)
                for p in prints
                for m in p.matrices.values()
                if m.probes
            ),
            None,
        )
        matrices = {}
        for p in prints:
            for name, m in p.matrices.items():
                same = m.probes is not None and (m.probes.seed, m.probes.count) == drawn
                matrices[name] = (
                    m if same or m.probes is None else MatrixPrint(m.shape, m.mean_abs, None)
                )
        first = prints[0]
        return cls(
            first.model_type, first.architectures, first.shape, dict(sorted(matrices.items()))
        )

    def check(self, model: nn.Module, source: str, base_name: str | None, force: bool) -> None:
        """Refuse ``model`` if it is not this fingerprint's base, naming what differs
        (``source`` names the adapter, ``base_name`` the base it was trained on). ``force``
        skips the weights' statistics, never the shapes."""
        fix = (
            "Load the adapter onto the base model it was trained on"
            f" ({base_name or 'see its adapter_config.json'})."
        )
        get_family(model)
        shape = model_shape(model).__dict__
        for key, want in self.shape.items():
            if shape.get(key) != want:
                raise AdapterMismatchError(
                    f"{source} was trained on a different base model: its {key} is {want}, "
                    f"this model's is {shape.get(key)}. {fix}"
                )
        weights = {}
        for name, want in self.matrices.items():
            try:
                weight = matrix_of(model, name)
            except AttributeError:
                raise AdapterMismatchError(
                    f"{source} adapts {name}, which this model does not have. {fix}"
                ) from None
            if tuple(weight.shape) != want.shape:
                raise AdapterMismatchError(
                    f"{source} expects {name} of shape {list(want.shape)}, this model's is "
                    f"{list(weight.shape)}. {fix}"
                )
            weights[name] = weight
        if force:
            return
        positions = stored_positions(model, weights)
        for name, weight in weights.items():
            want = self.matrices[name]
            if want.probes is None and want.mean_abs is None:
                raise S2FTError(
                    f"{source}: its fingerprint of {name} was written by another version of "
                    "s2ft and cannot be checked by this one; upgrade s2ft, or pass force=True "
                    "(--force) if you are sure it belongs to this base (shapes are still "
                    "checked)."
                )
            drawn = (
                (want.probes.seed, want.probes.count) if want.probes else (PROBE_SEED, PROBE_COUNT)
            )
            got = matrix_print(weight, *positions.get(name, (None, None)), *drawn)
            problem = want.differs(got, name, ("the adapter's base", "this model"))
            if problem:
                raise AdapterMismatchError(
                    f"{source} was trained on other weights: {problem}. {fix} If you are sure "
                    "the weights are compatible (e.g. a re-saved copy), pass force=True "
                    "(--force); shapes are still checked."
                )

    def check_same_base(
        self, other: Fingerprint, sources: tuple[str, str], names: tuple, force: bool
    ) -> None:
        """Refuse ``other`` (of adapter ``sources[1]``, trained on base ``names[1]``) if it
        is not this one's base (adapter ``sources[0]``, base ``names[0]``): same architecture
        and shapes always; same weights unless ``force``, by the statistics of the matrices
        both hold, else by the bases' names."""
        first, second = sources
        for key in ("model_type", "architectures", "shape"):
            if getattr(other, key) != getattr(self, key):
                raise AdapterMismatchError(
                    f"{second} and {first} belong to different base models ({key} "
                    f"{getattr(other, key)} and {getattr(self, key)}); combine adapters of one "
                    "base."
                )
        shared = set(other.matrices) & set(self.matrices)
        if not shared and not force and names[1] != names[0]:
            raise AdapterMismatchError(
                f"{second} and {first} adapt no matrix in common, so their bases' weights "
                f"cannot be compared, and name different bases ({names[1]!r} and "
                f"{names[0]!r}); pass --force if they are the same model."
            )
        if force:
            return
        for matrix in sorted(shared):
            try:
                problem = self.matrices[matrix].differs(
                    other.matrices[matrix], matrix, ("the first's base", "the second's")
                )
            except KeyError as err:
                raise S2FTError(
                    f"{first} and {second} cannot be compared: a fingerprint lacks {err} of "
                    f"{matrix} (damaged, or written by another version of s2ft); re-export "
                    "the adapters, or pass --force if their bases are the same model."
                ) from None
            if problem:
                raise AdapterMismatchError(
                    f"{first} and {second} were trained on different weights: {problem}. "
                    "Combine adapters of one base, or pass --force if the bases are copies of "
                    "each other."
                )


def remember_base_fingerprint(model: nn.Module, run: Callable = lambda work: work()) -> None:
    """Record a converted model's base fingerprint from its weights as they are now, before
    they are sharded or quantized, so that its adapter matches the base as loaded; ``run``
    runs the measurement (``Processes.on_main``: on rank 0, shared with every process). A
    fingerprint already recorded is kept."""
    conversion = state_of(model).conversion
    if conversion is not None and conversion.base_fingerprint is None:
        conversion.base_fingerprint = run(lambda: Fingerprint.of_base(model))
