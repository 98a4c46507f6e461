"""The model families s2ft knows, as data (paper §3.1: the coupled structures are the same
in every family; only where they live differs).

A :class:`Family` says, for each of the seven roles of ``targets.TARGETS`` that the family
has (q/k/v/o, gate/up/down), where its weight lives in a decoder block (:class:`Place`):
the module, the parameter, which roles share one fused weight and how (one after another
or unit by unit), whether the weight is stored transposed, whether it is a 3-D tensor of
experts. It also names what else must follow the heads when they are co-permuted (full
width q/k norms, attention sinks, per-head norms), how the config states the sizes, and
what the output head does to the logits (scaling, soft-capping). Every stage reads this
table; nothing else names a family. No torch here: ``s2ft models`` and recipe checks
answer without it.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from .targets import TARGETS


@dataclass(frozen=True)
class Place:
    """Where one role's weight lives, relative to a decoder block.

    ``module``: the module's path in the block (``self_attn.q_proj``); ``param``: its
    weight's attribute (``weight``, or an experts module's 3-D ``gate_up_proj``);
    ``fused``: the roles stored in this weight, in storage order (empty: the role alone);
    ``interleaved``: fused roles alternate unit by unit (GPT-NeoX's per-head q/k/v,
    gpt-oss's gate/up channels) rather than follow one another (Phi-3's q|k|v);
    ``transposed``: stored ``(in, out)`` (GPT-2's ``Conv1D``, gpt-oss's experts);
    ``bias``: the attribute of the bias that follows a producer's rows (``bias``; an
    experts module's ``gate_up_proj_bias``), if present.
    """

    module: str
    param: str = "weight"
    fused: tuple[str, ...] = ()
    interleaved: bool = False
    transposed: bool = False
    bias: str = "bias"

    @property
    def experts(self) -> bool:
        """Whether the weight is a 3-D tensor of experts (``num_experts × out × in``)."""
        return self.param != "weight"


# LLaMA's names: every role a module of its own, self_attn.q_proj ... mlp.down_proj
LLAMA_PLACES = {
    role: Place(f"{'self_attn' if target.structure == 'attention' else 'mlp'}.{role}")
    for role, target in TARGETS.items()
}
ATTENTION = {r: p for r, p in LLAMA_PLACES.items() if TARGETS[r].structure == "attention"}
QKV = ("q_proj", "k_proj", "v_proj")
GATE_UP = ("gate_proj", "up_proj")


def _experts(interleaved: bool = False, transposed: bool = False, bias: str = "") -> dict:
    """The FFN roles of a transformers 5 experts module: ``gate_up_proj`` (gate and up,
    fused) and ``down_proj``, each ``num_experts × out × in`` (or transposed)."""
    gate_up = Place(
        "mlp.experts", "gate_up_proj", GATE_UP, interleaved, transposed,
        f"gate_up_proj{bias}" if bias else "",
    )  # fmt: skip
    return {
        "gate_proj": gate_up,
        "up_proj": gate_up,
        "down_proj": Place("mlp.experts", "down_proj", transposed=transposed, bias=""),
    }


@dataclass(frozen=True)
class Family:
    """One family's layout: its roles' places and everything that follows the units.

    ``followers``: per unit (``query head`` or ``key/value head``), block-relative paths of
    tensors with a slice per unit that must move with it (a full-width q/k norm, attention
    sinks) or of a module list with one module per unit (StableLM's per-head norms); those
    absent from a model are skipped. ``shared_expert``: an FFN beside the experts (its own
    gate/up/down, LLaMA's names), whose channels are units of the FFN as well.
    Config attributes: ``ffn_size`` (the FFN's or each expert's width, first present;
    ``None`` there means 4 × hidden, GPT-2's ``n_inner``), ``num_experts``, ``shared_size``,
    ``head_dim`` and ``kv_heads`` (None: the family ignores such a setting and computes
    hidden / heads, or has multi-head attention).
    Head: ``logit_softcap`` (``tanh`` soft-capping), ``logit_multiplier``,
    ``logit_divisor``: config attributes of what the output head does to the logits.
    ``recompute_ffn``: a LLaMA-style SiLU-gated FFN (``engine/ffn.py`` may recompute its
    activation). ``gguf_config``: config attributes that transformers' GGUF reader (5.24)
    leaves out for the family, by the GGUF key (after ``<architecture>.``) that states them
    (``gguf_bases.py`` reads them from the file).
    """

    model_type: str
    description: str
    places: dict[str, Place] = field(default_factory=lambda: dict(LLAMA_PLACES))
    layers: str = "model.layers"
    followers: dict[str, tuple[str, ...]] = field(default_factory=dict)
    shared_expert: str | None = None
    ffn_size: tuple[str, ...] = ("intermediate_size",)
    head_dim: str | None = "head_dim"
    kv_heads: str | None = "num_key_value_heads"
    num_experts: str | None = None
    shared_size: str | None = None
    logit_softcap: str | None = None
    logit_multiplier: str | None = None
    logit_divisor: str | None = None
    recompute_ffn: bool = False
    gguf_config: dict[str, str] = field(default_factory=dict)

    @property
    def roles(self) -> tuple[str, ...]:
        """The roles this family has, in table order."""
        return tuple(r for r in TARGETS if r in self.places)

    @property
    def moe(self) -> bool:
        return self.num_experts is not None

    def fused_roles(self, role: str) -> tuple[str, ...]:
        """The roles sharing ``role``'s weight, in storage order (itself alone if none)."""
        return self.places[role].fused or (role,)


QK_NORMS = {
    "query head": ("self_attn.q_norm.weight",),
    "key/value head": ("self_attn.k_norm.weight",),
}
MOE_SIZES = dict(num_experts="num_experts", ffn_size=("moe_intermediate_size",))

FAMILIES: dict[str, Family] = {
    f.model_type: f
    for f in (
        Family("llama", "LLaMA 1/2/3 (MHA or GQA)", recompute_ffn=True),
        Family("mistral", "Mistral (GQA, sliding window)", recompute_ffn=True),
        Family("qwen2", "Qwen2 / Qwen2.5 (GQA, q/k/v biases)", recompute_ffn=True),
        Family("qwen3", "Qwen3 (GQA, per-head q/k norms, explicit head_dim)",
               recompute_ffn=True, gguf_config={"head_dim": "attention.key_length"}),
        Family("gemma", "Gemma (GeGLU, head_dim 256, scaled embeddings)"),
        Family("gemma2", "Gemma 2 (logit soft-capping, sandwich norms)",
               logit_softcap="final_logit_softcapping", gguf_config={
                   "final_logit_softcapping": "final_logit_softcapping",
                   "attn_logit_softcapping": "attn_logit_softcapping",
               }),
        Family("gemma3_text", "Gemma 3 text (per-head q/k norms, optional soft-capping)",
               logit_softcap="final_logit_softcapping",
               gguf_config={"final_logit_softcapping": "final_logit_softcapping"}),
        Family("phi3", "Phi-3 / Phi-4 (fused qkv_proj and gate_up_proj)", places={
            **{r: Place("self_attn.qkv_proj", fused=QKV) for r in QKV},
            "o_proj": Place("self_attn.o_proj"),
            **{r: Place("mlp.gate_up_proj", fused=GATE_UP) for r in GATE_UP},
            "down_proj": Place("mlp.down_proj"),
        }),
        Family("olmo2", "OLMo 2 (full-width q/k norms)", followers=QK_NORMS,
               recompute_ffn=True),
        Family("granite", "Granite (scaled residuals and logits)",
               logit_divisor="logits_scaling", recompute_ffn=True),
        Family("cohere", "Command-R (parallel block, logit scale, optional q/k norms)",
               followers=QK_NORMS, logit_multiplier="logit_scale", recompute_ffn=True),
        Family("stablelm", "StableLM (partial rotary, optional per-head norms)", head_dim=None,
               followers={
            "query head": ("self_attn.q_layernorm.norms",),
            "key/value head": ("self_attn.k_layernorm.norms",),
        }, recompute_ffn=True),
        Family("smollm3", "SmolLM3 (GQA, NoPE layers)", recompute_ffn=True),
        Family("starcoder2", "StarCoder2 (biases, FFN without gate: c_fc, c_proj)", places={
            **ATTENTION,
            "up_proj": Place("mlp.c_fc"),
            "down_proj": Place("mlp.c_proj"),
        }),
        Family("gpt_neox", "GPT-NeoX / Pythia (per-head fused query_key_value, no gate)",
               layers="gpt_neox.layers", head_dim=None, kv_heads=None, places={
            **{r: Place("attention.query_key_value", fused=QKV, interleaved=True) for r in QKV},
            "o_proj": Place("attention.dense"),
            "up_proj": Place("mlp.dense_h_to_4h"),
            "down_proj": Place("mlp.dense_4h_to_h"),
        }),  # fmt: skip
        Family("gpt2", "GPT-2 (Conv1D weights stored transposed, fused c_attn, no gate)",
               layers="transformer.h", ffn_size=("n_inner",), head_dim=None, kv_heads=None,
               gguf_config={"n_positions": "context_length"},
               places={
            **{r: Place("attn.c_attn", fused=QKV, transposed=True) for r in QKV},
            "o_proj": Place("attn.c_proj", transposed=True),
            "up_proj": Place("mlp.c_fc", transposed=True),
            "down_proj": Place("mlp.c_proj", transposed=True),
        }),  # fmt: skip
        Family("mixtral", "Mixtral (mixture of experts, top-2)",
               places={**ATTENTION, **_experts()}, num_experts="num_local_experts"),
        Family("qwen2_moe", "Qwen2-MoE / Qwen1.5-MoE (experts and a shared expert)",
               places={**ATTENTION, **_experts()}, shared_expert="mlp.shared_expert",
               shared_size="shared_expert_intermediate_size", **MOE_SIZES, gguf_config={
                   "moe_intermediate_size": "expert_feed_forward_length",
                   "shared_expert_intermediate_size": "expert_shared_feed_forward_length",
               }),
        Family("qwen3_moe", "Qwen3-MoE (experts, per-head q/k norms)",
               places={**ATTENTION, **_experts()}, **MOE_SIZES,
               gguf_config={"moe_intermediate_size": "expert_feed_forward_length"}),
        Family("olmoe", "OLMoE (experts, full-width q/k norms)", followers=QK_NORMS,
               places={**ATTENTION, **_experts()}, num_experts="num_experts"),
        Family("gpt_oss", "gpt-oss (experts stored transposed with biases, interleaved "
               "gate/up; attention sinks)",
               places={**ATTENTION, **_experts(True, True, "_bias")},
               followers={"query head": ("self_attn.sinks",)},
               num_experts="num_local_experts"),
    )
}  # fmt: skip


def supported_types() -> str:
    return ", ".join(FAMILIES)


def family_of(model_type: str | None) -> Family | None:
    return FAMILIES.get(model_type)  # type: ignore[arg-type]


def _weights(family: Family) -> str:
    """Where a family's roles live, one entry per weight; LLaMA-named modules grouped."""
    by_weight: dict[tuple, list[str]] = {}
    for role, place in family.places.items():
        by_weight.setdefault((place.module, place.param), []).append(role)
    named: dict[str, list[str]] = {}  # block prefix -> roles stored under their own name
    where = []
    for (module, param), roles in by_weight.items():
        prefix, _, leaf = module.rpartition(".")
        if param == "weight" and roles == [leaf]:
            named.setdefault(prefix, []).append(leaf.removesuffix("_proj"))
            continue
        place = family.places[roles[0]]
        how = "|".join(r.removesuffix("_proj") for r in roles)
        how += ", per expert" if place.experts else ""
        how += ", unit by unit" if place.interleaved else ""
        how += ", stored (in, out)" if place.transposed else ""
        where.append(f"{module if param == 'weight' else f'{module}.{param}'} ({how})")
    grouped = [
        f"{prefix}.{{{','.join(leaves)}}}_proj" if len(leaves) > 1 else f"{prefix}.{leaves[0]}_proj"
        for prefix, leaves in named.items()
    ]
    return "; ".join(grouped + where)


def family_rows() -> list[dict[str, str]]:
    """Each family as ``s2ft models`` lists it: its roles, where they live, its units and
    what else its conversion moves or its loss applies."""
    rows = []
    for family in FAMILIES.values():
        units = "units: heads, channels"
        if family.moe:
            units = "units: heads, channels of each expert"
            units += " and of the shared expert" if family.shared_expert else ""
        moved = [
            p.removesuffix(".weight").removesuffix(".norms").rsplit(".", 1)[-1]
            for paths in family.followers.values()
            for p in paths
        ]
        notes = [f"{'/'.join(dict.fromkeys(moved))} move with the heads"] if moved else []
        for attr, what in (
            (family.logit_softcap, "logits soft-capped"),
            (family.logit_multiplier, "logits scaled"),
            (family.logit_divisor, "logits scaled"),
        ):
            if attr:
                notes.append(f"{what} ({attr})")
        rows.append(
            {
                "model type": family.model_type,
                "family": family.description,
                "roles": ", ".join(r.removesuffix("_proj") for r in family.roles),
                "weights": _weights(family),
                "units": units,
                "notes": "; ".join(notes),
            }
        )
    return rows
