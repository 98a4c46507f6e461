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
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from ..errors import S2FTError
from ..files import atomic_write_dir, read_json

PEFT_CONFIG_NAME = "adapter_config.json"
PEFT_WEIGHTS_NAME = "adapter_model.safetensors"
SOURCE_NAME = "s2ft_source.json"
SOURCE_FORMAT = "s2ft-peft-export"
SOURCE_VERSION = 1
PREFIX = "base_model.model."  # PEFT's keys: the model inside its wrapper
VLLM_MAX_RANK = 512  # vLLM's largest --max-lora-rank


def _shape(adapter, name: str) -> tuple[int, int]:
    out, inp = adapter.config["base_model"]["fingerprint"]["matrices"][name]
    return out, inp


def check_ranks(adapter, rank: int | None) -> None:
    """Refuse a module whose rank exceeds ``rank`` (the padded rank asked for) or vLLM's
    limit, naming it and its rank."""
    limit = VLLM_MAX_RANK if rank is None else rank
    if rank is not None and rank > VLLM_MAX_RANK:
        raise S2FTError(f"--rank {rank} is above vLLM's largest LoRA rank, {VLLM_MAX_RANK}.")
    for name, u in sorted(adapter.updates.items()):
        if len(u.index) > limit:
            what = f"--rank {rank}" if rank is not None else f"vLLM's limit, {VLLM_MAX_RANK}"
            raise S2FTError(
                f"{name} has rank {len(u.index)} (its {u.axis}), above {what}: pass a larger "
                "--rank, or train with smaller s2ft.targets ratios or with s2ft.allocation: "
                "per_layer (the same number of units in every layer)."
            )


def lora_factors(update, shape: tuple[int, int], rank: int):
    """(A, B) of one update: ``B @ A`` is the update in the original layout, zeros beyond
    its own rank up to ``rank``."""
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


def peft_config(adapter, rank: int | None) -> dict:
    """PEFT's LoraConfig as a dict: one ``r`` = ``lora_alpha`` (padded), or per-module
    ``rank_pattern`` / ``alpha_pattern`` (exact module paths)."""
    ranks = {name: len(u.index) for name, u in adapter.updates.items()}
    r = rank if rank is not None else max(ranks.values())
    patterns = {} if rank is not None else {re.escape(n): k for n, k in sorted(ranks.items())}
    return {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": adapter.config["base_model"].get("name_or_path") or None,
        "r": r,
        "lora_alpha": r,
        "rank_pattern": patterns,
        "alpha_pattern": patterns,
        "target_modules": sorted(ranks),
        "lora_dropout": 0.0,
        "bias": "none",
        "fan_in_fan_out": False,
        "use_rslora": False,
        "use_dora": False,
        "init_lora_weights": True,
        "inference_mode": True,
        "modules_to_save": None,
    }


def save_peft(adapter, path: str | Path, rank: int | None = None) -> Path:
    """Write ``adapter`` (an :class:`~s2ft_cli.adapter.format.Adapter`) as a PEFT LoRA
    adapter directory (padded to ``rank`` if given)."""
    check_ranks(adapter, rank)
    tensors = {}
    for name, u in sorted(adapter.updates.items()):
        a, b = lora_factors(u, _shape(adapter, name), rank or len(u.index))
        tensors[f"{PREFIX}{name}.lora_A.weight"] = a.detach().cpu()
        tensors[f"{PREFIX}{name}.lora_B.weight"] = b.detach().cpu()
    source = {
        "format": SOURCE_FORMAT,
        "version": SOURCE_VERSION,
        "rank": rank,
        "modules": {n: {"axis": u.axis, "rank": len(u.index)} for n, u in adapter.updates.items()},
        "adapter": adapter.config,
    }

    def write(tmp: Path) -> None:
        save_file(tensors, str(tmp / PEFT_WEIGHTS_NAME), metadata={"format": "pt"})
        (tmp / PEFT_CONFIG_NAME).write_text(json.dumps(peft_config(adapter, rank), indent=1))
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
    stored = {}
    for name, module in modules.items():
        a = tensors.get(f"{PREFIX}{name}.lora_A.weight")
        b = tensors.get(f"{PREFIX}{name}.lora_B.weight")
        if a is None or b is None:
            raise S2FTError(
                f"{path / PEFT_WEIGHTS_NAME} lacks the LoRA factors of {name}; {damaged}"
            )
        k, axis = module["rank"], module["axis"]
        one_hot, delta = (a[:k], b[:, :k]) if axis == "cols" else (b[:, :k].T, a[:k])
        index = one_hot.argmax(dim=1)
        expected = torch.zeros_like(one_hot)
        expected[torch.arange(k), index] = 1
        if not torch.equal(one_hot, expected) or a[k:].any() or b[:, k:].any():
            raise S2FTError(f"{name}'s LoRA factors are not an s2ft export's; {damaged}")
        stored[f"{name}.{axis}"], stored[f"{name}.delta"] = index, delta.contiguous()
    files = (path / SOURCE_NAME, path / PEFT_WEIGHTS_NAME)
    return source["adapter"], stored, files
