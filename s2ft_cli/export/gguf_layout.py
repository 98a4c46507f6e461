"""Where the weights S²FT trains lie in a GGUF file: llama.cpp's names and layouts.

llama.cpp's converter writes a Hugging Face weight under the name the ``gguf`` package's
tensor-name map gives it (``model.layers.3.self_attn.q_proj`` → ``blk.3.attn_q``), in the
``(out, in)`` orientation (GPT-2's transposed ``Conv1D`` turned), with its rows regrouped
role by role where the checkpoint interleaves them (GPT-NeoX's q/k/v head by head), a
fused weight kept whole where the architecture has the fused tensor (Phi-3's ``attn_qkv``)
and split by role where it does not (an experts ``gate_up_proj`` into ``ffn_gate_exps``
and ``ffn_up_exps``), and, for architectures whose rope rotates adjacent pairs (LLaMA's in
llama.cpp), the query and key rows of each head reordered from halves to pairs.

Every one of these is a reordering of the rows of the ``(out, in)`` weight: the same
gather places a merged weight and a LoRA's ``B`` (``export/gguf.py``). Which one a file
needs is read from the file itself (its architecture and its tensor names), and checked
before anything is written: the base's own weights, laid out so, must be the file's
(``export/gguf.py``).
"""

from __future__ import annotations

import torch

from ..engine.families import Family
from ..engine.shapes import ModelShape, place_of, role_slots
from ..engine.targets import TARGETS
from ..errors import S2FTError

# llama.cpp architectures whose rope rotates adjacent pairs (LLAMA_ROPE_TYPE_NORM): their
# converter permutes the q/k rows of Hugging Face's rotate-half layout (LlamaModel.permute)
PAIRED_ROPE_ARCHS = frozenset({"llama", "granite", "granitemoe", "smollm3"})


def _pairs(heads: int, head_dim: int) -> torch.Tensor:
    """The row order of llama.cpp's paired rope within ``heads`` heads of rotate-half rows."""
    return torch.arange(heads * head_dim).view(heads, 2, head_dim // 2).transpose(1, 2).flatten()


class GGUFLayout:
    """The GGUF tensors of a model's S²FT weights, for one file (``arch``, its tensor
    names ``present``)."""

    def __init__(self, shape: ModelShape, arch: str, present: set[str]):
        import gguf

        archs = {name: key for key, name in gguf.MODEL_ARCH_NAMES.items()}
        if arch not in archs:
            raise S2FTError(f"The gguf package does not know the architecture {arch!r}.")
        self.shape, self.arch, self.present = shape, arch, present
        self.names = gguf.get_tensor_name_map(archs[arch], shape.num_layers)

    @property
    def family(self) -> Family:
        return self.shape.family

    def _gguf_name(self, hf_path: str) -> str | None:
        name = self.names.get_name(hf_path)
        return f"{name}.weight" if name is not None else None

    def _layer(self, name: str) -> int:
        prefix = f"{self.family.layers}."
        return int(name[len(prefix) :].split(".", 1)[0])

    def _roles(self, name: str) -> tuple[str, ...]:
        """The roles stored in weight ``name`` (an adapter's name), in storage order."""
        place = place_of(self.family, name)
        if place is None:
            raise S2FTError(f"{name} is no weight of a role of {self.family.model_type}.")
        role = next((r for r, own in self.family.places.items() if own == place), None)
        if role is None:  # a shared expert's gate_proj / up_proj / down_proj
            return (place.module.rsplit(".", 1)[-1],)
        return self.family.fused_roles(role)

    def _role_rows(self, name: str, role: str) -> torch.Tensor:
        """Rows of ``role``'s units in weight ``name`` (``(out, in)``, within one expert),
        in llama.cpp's order."""
        slot = next(s for s in role_slots(self.shape, self._layer(name), role) if s.name == name)
        rows = slot.ids(range(slot.count))
        if self.arch in PAIRED_ROPE_ARCHS and role in ("q_proj", "k_proj"):
            rows = rows[_pairs(slot.count, self.shape.head_dim)]
        return rows

    def pieces(self, name: str, weight: torch.Tensor) -> list[tuple[str, torch.Tensor]]:
        """The GGUF tensors (name, values) of weight ``name`` (an adapter's name: a module's
        path, an experts tensor's) given in the ``(out, in)`` orientation (an experts
        tensor: ``experts × out × in``), or of a LoRA ``B`` of it (its rows the weight's)."""
        roles = self._roles(name)
        if TARGETS[roles[0]].axis == "cols":  # a consumer: its rows are not the units'
            return [(self._required(name, name), weight)]
        parts = [(role, self._role_rows(name, role)) for role in roles]
        whole = self._gguf_name(name)
        if len(parts) == 1 or whole in self.present:
            rows = torch.cat([rows for _, rows in parts])
            if len(rows) != weight.shape[-2]:
                raise S2FTError(f"{name}: {weight.shape[-2]} rows, its roles hold {len(rows)}.")
            return [(self._required(name, name), weight.index_select(-2, rows))]
        parent = name.rsplit(".", 1)[0]
        return [
            (self._required(f"{parent}.{role}", name), weight.index_select(-2, rows))
            for role, rows in parts
        ]

    def _required(self, hf_path: str, name: str) -> str:
        gguf_name = self._gguf_name(hf_path)
        if gguf_name is None or gguf_name not in self.present:
            raise S2FTError(
                f"{name}: the GGUF file ({self.arch}) has no tensor for {hf_path} "
                f"({gguf_name or 'no name in the gguf package'}); s2ft cannot place the "
                "update there."
            )
        return gguf_name
