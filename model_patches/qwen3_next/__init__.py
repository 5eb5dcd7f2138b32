"""Qwen3-Next (`qwen3_next`): transformers' own model, patched to sleep like Qwen3.5 (`model_patches.qwen3_5`).

Its layers are Qwen3.5's but for the Gated DeltaNet's fused, head-grouped projections (`in_proj_qkvz`,
`in_proj_ba`), which the block unpacks with the module's own `fix_query_key_value_ordering`. Same loop range rule.
"""

from transformers.models.qwen3_next import modeling_qwen3_next as next_modeling

from model_patches.qwen3_5 import family
from model_patches.qwen3_5.blocks import QWEN3_NEXT_LAYOUT
from retrofit.registry import register_native

LORA_TARGETS = (
    "in_proj_qkvz", "in_proj_ba", "out_proj",  # Gated DeltaNet
    "q_proj", "k_proj", "v_proj", "o_proj",  # gated attention
    "gate_proj", "up_proj", "down_proj",  # MLP, experts, shared expert
)  # fmt: skip

register_native(
    "qwen3_next",
    next_modeling.Qwen3NextConfig,
    next_modeling.Qwen3NextForCausalLM,
    family(next_modeling, QWEN3_NEXT_LAYOUT, LORA_TARGETS),
)
