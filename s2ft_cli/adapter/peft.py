"""S²FT adapters as PEFT LoRA adapters, and back: serving engines and PEFT read them.

Every S²FT update is exactly a LoRA (paper §5: the update is a low-rank, structured
addition to the frozen weight). A column update ``W[:, cols] += Δ`` (Δ: out × k) is
``B = Δ`` with ``A`` the k one-hot rows selecting ``cols`` (k × in); a row update
``W[rows, :] += Δ`` (Δ: k × in) is ``B`` the one-hot columns placing ``rows`` (out × k)
with ``A = Δ``. Rank k per module and scale ``lora_alpha / r = 1``: ``B A x`` multiplies by
ones and adds zeros, so PEFT computes the same numbers.

An export is a PEFT adapter directory (``adapter_config.json`` with ``peft_type: LORA``,
``adapter_model.safetensors`` with ``…lora_A.weight`` / ``…lora_B.weight``) plus
``s2ft_source.json``: the S²FT adapter's own config (the base's fingerprint included) and
each module's axis and rank, by which s2ft reads the export back as the adapter it came
from. PEFT needs ``rank_pattern`` / ``alpha_pattern`` for per-module ranks; serving
engines (vLLM, SGLang, TGI, LoRAX) ignore those and use one rank, so ``rank=N`` pads every
module with zero rows and columns to rank N (one ``r``, ``lora_alpha = r``, exact).

Every family's weights reach PEFT (``engine/families.py``): a fused weight (Phi-3's
``qkv_proj``) is one LoRA module whose rows are those of all its roles; GPT-2's Conv1D
weights take ``fan_in_fan_out`` (PEFT's LoRA of a transposed weight); a 3-D experts tensor
takes PEFT's ``target_parameters``, one LoRA per expert of one rank, its factors stacked as
PEFT stacks them (``lora_A``: experts × rank rows; ``lora_B``: columns rank-major,
``k · experts + e``), the producer weight's wrapped inside the ``down_proj``'s
(``experts.base_layer.lora_*``) where both are adapted.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from ..engine.families import family_of
from ..engine.layers import Update
from ..engine.shapes import flip, place_of
from ..errors import S2FTError
from ..files import atomic_write_dir, read_json

PEFT_CONFIG_NAME = "adapter_config.json"
PEFT_WEIGHTS_NAME = "adapter_model.safetensors"
SOURCE_NAME = "s2ft_source.json"
SOURCE_FORMAT = "s2ft-peft-export"
SOURCE_VERSION = 1
PREFIX = "base_model.model."  # PEFT's keys: the model inside its wrapper
VLLM_MAX_RANK = 512  # vLLM's largest --max-lora-rank


@dataclass(frozen=True)
class Target:
    """How one adapted weight is a PEFT LoRA: ``key`` (the LoRA module's path, without
    ``lora_A.weight``), whether the weight is stored transposed and its experts (0: a 2-D
    weight), and the ``(out, in)`` shape of the map one LoRA adapts (one expert's)."""

    name: str
    key: str
    transposed: bool
    experts: int
    shape: tuple[int, int]


def _targets(config: dict, axes: dict[str, str]) -> dict[str, Target]:
    """Every adapted weight's :class:`Target` (``axes``: each weight's update axis), read
    from the adapter's ``config``, its fingerprint (family and shapes), alone."""
    fingerprint = config["base_model"]["fingerprint"]
    family = family_of(fingerprint.get("model_type"))
    experts = int(fingerprint["shape"].get("num_experts") or 0)
    names = sorted(axes)
    targets = {}
    for name in names:
        axis = axes[name]
        rows, cols = fingerprint["matrices"][name]
        place = place_of(family, name) if family is not None else None
        transposed = place is not None and place.transposed
        if place is not None and place.experts:
            # the stored (E, A, B) seen as E·A × B (rows) or A × E·B (columns)
            rows, cols = (rows // experts, cols) if axis == "rows" else (rows, cols // experts)
            path, _, param = name.rpartition(".")
            producer = next((n for n in names if n.startswith(f"{path}.") and n != name), None)
            inner = param != "down_proj" and producer is not None
            key = f"{PREFIX}{path}{'.base_layer' if inner else ''}"
            count = experts
        else:
            key, count = f"{PREFIX}{name}", 0
        shape = (cols, rows) if transposed else (rows, cols)
        targets[name] = Target(name, key, transposed, count, shape)
    return targets


def _local(update, target: Target) -> list[Update]:
    """The update of each LoRA: the weight's, or one per expert (ids within it), in the
    ``(out, in)`` orientation."""
    if not target.experts:
        return [update.oriented(target.transposed)]
    out, inp = target.shape
    math_axis = flip(update.axis) if target.transposed else update.axis
    length = out if math_axis == "rows" else inp
    pieces = update.per_expert(length, target.experts)
    return [pieces[e].oriented(target.transposed) for e in range(target.experts)]


def _adapter_targets(adapter) -> dict[str, Target]:
    return _targets(adapter.config, {n: u.axis for n, u in adapter.updates.items()})


def _ranks(adapter, targets: dict[str, Target]) -> dict[str, int]:
    """Each LoRA module's rank: its update's rows/columns, the largest expert's for an
    experts tensor."""
    return {
        name: max(len(u.index) for u in _local(adapter.updates[name], t))
        for name, t in targets.items()
    }


def check_ranks(adapter, ranks: dict[str, int], rank: int | None) -> None:
    """Refuse a module whose rank (``ranks``: :func:`_ranks`) exceeds ``rank`` (the padded
    rank asked for) or vLLM's limit, naming it, its rank and the smallest that holds all."""
    limit = VLLM_MAX_RANK if rank is None else rank
    if rank is not None and rank > VLLM_MAX_RANK:
        raise S2FTError(f"--rank {rank} is above vLLM's largest LoRA rank, {VLLM_MAX_RANK}.")
    for name, k in sorted(ranks.items()):
        if k > limit:
            what = f"--rank {rank}" if rank is not None else f"vLLM's limit, {VLLM_MAX_RANK}"
            axis = adapter.updates[name].axis
            smallest = max(ranks.values())
            fits = (
                f"the smallest --rank that holds every module is {smallest}"
                if smallest <= VLLM_MAX_RANK
                else f"no --rank up to {VLLM_MAX_RANK} holds every module"
            )
            raise S2FTError(
                f"{name} has rank {k} (its {axis}), above {what}: {fits}. Or train with "
                "s2ft.max_units_per_layer (a cap on the units of one layer: the rank a "
                "serving engine reserves), smaller s2ft.targets ratios, or s2ft.allocation: "
                "per_layer."
            )


def lora_factors(update, shape: tuple[int, int], rank: int):
    """(A, B) of one update in the ``(out, in)`` orientation: ``B @ A`` is the update in
    the original layout, zeros beyond its own rank up to ``rank``."""
    out, inp = shape
    k, delta = len(update.index), update.delta
    a = delta.new_zeros(rank, inp)
    b = delta.new_zeros(out, rank)
    steps = torch.arange(k)
    if update.axis == "cols":
        a[steps, update.index] = 1
        b[:, :k] = delta
    else:
        a[:k] = delta
        b[update.index, steps] = 1
    return a.contiguous(), b.contiguous()


def _factors(update, target: Target, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(lora_A, lora_B) of one adapted weight as PEFT stores them; an experts tensor's
    LoRAs stacked: A's rows expert by expert, B's columns ``k · experts + e``."""
    pieces = [lora_factors(u, target.shape, rank) for u in _local(update, target)]
    if not target.experts:
        return pieces[0]
    a = torch.cat([a for a, _ in pieces])
    b = torch.stack([b for _, b in pieces], dim=2).reshape(target.shape[0], -1)
    return a.contiguous(), b.contiguous()


def lora_pairs(adapter, what: str) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Each adapted 2-D weight's exact LoRA ``(A, B)`` at its own rank, ``(out, in)``
    orientation (a transposed weight's turned), for LoRA formats with no experts
    (``what`` names the format in the refusal of an experts tensor)."""
    pairs = {}
    for name, target in _adapter_targets(adapter).items():
        if target.experts:
            raise S2FTError(
                f"{name} is a tensor of experts, which {what} cannot adapt with a LoRA; "
                "export the merged model instead."
            )
        (update,) = _local(adapter.updates[name], target)
        pairs[name] = lora_factors(update, target.shape, len(update.index))
    return pairs


def peft_config(
    adapter, targets: dict[str, Target], ranks: dict[str, int], rank: int | None
) -> dict:
    """PEFT's LoraConfig as a dict: one ``r`` = ``lora_alpha`` (padded), or per-module
    ``rank_pattern`` / ``alpha_pattern`` (exact module and parameter paths)."""
    r = rank if rank is not None else max(ranks.values())
    patterns = {} if rank is not None else {re.escape(n): k for n, k in sorted(ranks.items())}
    experts = sorted(n for n, t in targets.items() if t.experts)
    return {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": adapter.config["base_model"].get("name_or_path") or None,
        "r": r,
        "lora_alpha": r,
        "rank_pattern": patterns,
        "alpha_pattern": patterns,
        "target_modules": sorted(n for n, t in targets.items() if not t.experts),
        "target_parameters": experts or None,
        "lora_dropout": 0.0,
        "bias": "none",
        "fan_in_fan_out": any(t.transposed and not t.experts for t in targets.values()),
        "use_rslora": False,
        "use_dora": False,
        "init_lora_weights": True,
        "inference_mode": True,
        "modules_to_save": None,
    }


def save_peft(adapter, path: str | Path, rank: int | None = None) -> Path:
    """Write ``adapter`` (an :class:`~s2ft_cli.adapter.format.Adapter`) as a PEFT LoRA
    adapter directory (padded to ``rank`` if given)."""
    targets = _adapter_targets(adapter)
    ranks = _ranks(adapter, targets)
    check_ranks(adapter, ranks, rank)
    linear = {t.transposed for t in targets.values() if not t.experts}
    if len(linear) > 1:
        raise S2FTError(
            "This adapter changes weights stored both ways ((out, in) and GPT-2's transposed "
            "(in, out)), which one PEFT LoRA config (one fan_in_fan_out) cannot express."
        )
    tensors = {}
    for name, u in sorted(adapter.updates.items()):
        a, b = _factors(u, targets[name], rank or ranks[name])
        tensors[f"{targets[name].key}.lora_A.weight"] = a.detach().cpu()
        tensors[f"{targets[name].key}.lora_B.weight"] = b.detach().cpu()
    source = {
        "format": SOURCE_FORMAT,
        "version": SOURCE_VERSION,
        "rank": rank,
        "modules": {
            n: {"axis": u.axis, "rank": len(u.index), "lora_rank": rank or ranks[n]}
            for n, u in adapter.updates.items()
        },
        "adapter": adapter.config,
    }

    config = peft_config(adapter, targets, ranks, rank)

    def write(tmp: Path) -> None:
        save_file(tensors, str(tmp / PEFT_WEIGHTS_NAME), metadata={"format": "pt"})
        (tmp / PEFT_CONFIG_NAME).write_text(json.dumps(config, indent=1))
        (tmp / SOURCE_NAME).write_text(json.dumps(source, indent=1))

    path = Path(path)
    atomic_write_dir(path, write)
    return path


def is_peft_export(path: Path) -> bool:
    return (Path(path) / SOURCE_NAME).is_file()


def read_peft_export(path: str | Path) -> tuple[dict, dict[str, torch.Tensor], tuple[Path, Path]]:
    """What the S²FT adapter a PEFT export of ours came from holds, as ``read_adapter``
    returns it (config, tensors, files): its config from ``s2ft_source.json``, each
    module's ids and delta read back from its one-hot factor and its other factor (checked:
    one 1 per row or column, zeros elsewhere and in padding)."""
    path = Path(path)
    damaged = "the export is damaged — export the adapter again (s2ft export --format peft)."
    source = read_json(path / SOURCE_NAME, damaged)
    source = source if isinstance(source, dict) else {}
    modules = source.get("modules")
    if (
        source.get("format") != SOURCE_FORMAT
        or not isinstance(modules, dict)
        or not isinstance(source.get("adapter"), dict)
        or any(
            not isinstance(m, dict) or m.get("axis") not in ("rows", "cols")
            or not isinstance(m.get("rank"), int) or m["rank"] < 1
            for m in modules.values()
        )
    ):  # fmt: skip
        raise S2FTError(f"{path / SOURCE_NAME} is not an s2ft export record; {damaged}")
    try:
        tensors = load_file(str(path / PEFT_WEIGHTS_NAME))
    except Exception as err:  # a missing or unreadable file: the same advice
        raise S2FTError(f"{path / PEFT_WEIGHTS_NAME} cannot be read ({err}); {damaged}") from None
    targets = _targets(source["adapter"], {n: m["axis"] for n, m in modules.items()})
    stored = {}
    for name, module in modules.items():
        target = targets[name]
        a = tensors.get(f"{target.key}.lora_A.weight")
        b = tensors.get(f"{target.key}.lora_B.weight")
        if a is None or b is None:
            raise S2FTError(
                f"{path / PEFT_WEIGHTS_NAME} lacks the LoRA factors of {name}; {damaged}"
            )
        read = _read_factors(a, b, target, module)
        if read is None:
            raise S2FTError(f"{name}'s LoRA factors are not an s2ft export's; {damaged}")
        stored[f"{name}.{module['axis']}"], stored[f"{name}.delta"] = read
    files = (path / SOURCE_NAME, path / PEFT_WEIGHTS_NAME)
    return source["adapter"], stored, files


def _one_lora(a: torch.Tensor, b: torch.Tensor, axis: str, k: int | None):
    """The ids and delta (``(out, in)`` orientation) of one LoRA of an export, ``k`` its
    rank (None: counted from its one-hot factor); None if it is not an export's."""
    one_hot_full = a if axis == "cols" else b.T
    if k is None:
        k = int(one_hot_full.ne(0).any(1).sum())
    one_hot, delta = (a[:k], b[:, :k]) if axis == "cols" else (b[:, :k].T, a[:k])
    index = one_hot.argmax(dim=1)
    expected = torch.zeros_like(one_hot)
    expected[torch.arange(k), index] = 1
    if not torch.equal(one_hot, expected) or a[k:].any() or b[:, k:].any():
        return None
    return index, delta


def _read_factors(a: torch.Tensor, b: torch.Tensor, target: Target, module: dict):
    """The stored ids and delta of one adapted weight from its LoRA factors (every
    expert's, for an experts tensor), or None if they are not an export's."""
    axis = module["axis"]
    math_axis = flip(axis) if target.transposed else axis
    if not target.experts:
        read = _one_lora(a, b, math_axis, module["rank"])
        if read is None:
            return None
        index, delta = read
        return index, (delta.t() if target.transposed else delta).contiguous()
    count = target.experts
    rank = a.shape[0] // count
    out, inp = target.shape
    length = out if math_axis == "rows" else inp
    ids, deltas = [], []
    for e in range(count):
        read = _one_lora(
            a[e * rank : (e + 1) * rank], b.view(out, rank, count)[:, :, e], math_axis, None
        )
        if read is None:
            return None
        index, delta = read
        ids.append(index + e * length)
        deltas.append(delta.t() if target.transposed else delta)
    index = torch.cat(ids)
    if len(index) != module["rank"]:
        return None
    return index, torch.cat(deltas, 0 if axis == "rows" else 1).contiguous()
