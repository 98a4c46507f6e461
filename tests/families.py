"""A tiny random model of every family s2ft knows (``engine/families.py``), built from a
transformers config: no download. Each keeps its family's particularities switched on
(soft-capping, logit scaling, q/k norms, biases, sinks, fused and transposed weights,
experts with a shared expert), GQA wherever the family has it."""

from __future__ import annotations

import torch
from transformers import AutoConfig, AutoModelForCausalLM

from s2ft_cli.engine.families import FAMILIES

SIZES = dict(
    hidden_size=32,
    intermediate_size=48,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    vocab_size=112,
    max_position_embeddings=256,
    pad_token_id=0,
    bos_token_id=1,
    eos_token_id=2,
)
MOE = dict(num_experts_per_tok=2, router_jitter_noise=0.0)

# model type -> config overrides (beside SIZES)
FAMILY_CONFIGS: dict[str, dict] = {
    "llama": dict(attention_bias=True),
    "mistral": {},
    "qwen2": {},
    "qwen3": dict(head_dim=12),
    "gemma": dict(head_dim=8),
    "gemma2": dict(head_dim=8, final_logit_softcapping=3.0, attn_logit_softcapping=5.0),
    "gemma3_text": dict(head_dim=8, final_logit_softcapping=3.0),
    "phi3": {},
    "olmo2": {},
    "granite": dict(logits_scaling=4.0, embedding_multiplier=2.0, residual_multiplier=0.5),
    "cohere": dict(use_qk_norm=True, logit_scale=0.5),
    "stablelm": dict(qk_layernorm=True, use_qkv_bias=True),
    "smollm3": {},
    "starcoder2": dict(use_bias=True),
    "gpt_neox": dict(num_key_value_heads=None),
    "gpt2": dict(n_embd=32, n_head=4, n_layer=2, n_inner=48, n_positions=256),
    "mixtral": dict(num_local_experts=4, **MOE),
    "qwen2_moe": dict(
        num_experts=4, moe_intermediate_size=16, shared_expert_intermediate_size=24, **MOE
    ),
    "qwen3_moe": dict(num_experts=4, moe_intermediate_size=16, head_dim=8, **MOE),
    "olmoe": dict(num_experts=4, **MOE),
    "gpt_oss": dict(num_local_experts=4, intermediate_size=16, head_dim=8, **MOE),
}


def family_config(model_type: str):
    overrides = FAMILY_CONFIGS[model_type]
    values = {**SIZES, **overrides}
    values = {k: v for k, v in values.items() if v is not None}
    return AutoConfig.for_model(model_type, **values)


def family_model(model_type: str, seed: int = 0, dtype=torch.float32):
    """A tiny random model of the family, biases and norms non-trivial (so that permuting
    them is tested), in eval mode."""
    torch.manual_seed(seed)
    config = family_config(model_type)
    model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(("bias", "norm.weight", "sinks")) or "layernorm" in name:
                p.add_(torch.randn_like(p) * 0.1)
    return model.eval()


def gate_role(model_type: str) -> str:
    """``gate_proj``, or ``up_proj`` for a family whose FFN has no gate."""
    return "gate_proj" if "gate_proj" in FAMILIES[model_type].places else "up_proj"


def targets_of(model_type: str) -> dict[str, float]:
    """Both structures, producers and consumers (up for a family without a gate)."""
    return {"v_proj": 0.5, "o_proj": 0.5, gate_role(model_type): 0.2, "down_proj": 0.2}
