"""OLMo-Hybrid (`olmo_hybrid`): transformers' own model, patched to sleep (`retrofit.native`).

* Gated DeltaNet layers (pre-norm): fla-style `q_proj`, `k_proj`, `v_proj` (through `conv1d`), `a_proj`, `b_proj`,
  `g_proj` (the output gate), `o_norm`, `o_proj`; with `linear_allow_neg_eigval` beta is `2 sigmoid(b)`, in (0, 2).
* Attention layers (post-norm, as OLMo 3): `q_norm`/`k_norm` over all heads before the head split, RoPE through
  transformers' `apply_rotary_pos_emb` (none in NoPE mode), then `post_attention_layernorm` on the attention output
  and `post_feedforward_layernorm` on the MLP output.

Default loop range: `retrofit.native.middle_periods`.
"""

from transformers.models.olmo_hybrid import modeling_olmo_hybrid as olmo

from model_patches.olmo_hybrid.blocks import OLMO_HYBRID_LAYOUT, PostNormAttentionBlock
from retrofit.layers.views import GatedDeltaNetView
from retrofit.native import NativeFamily, middle_periods
from retrofit.registry import register_native

LORA_TARGETS = (
    "q_proj", "k_proj", "v_proj", "a_proj", "b_proj", "g_proj", "o_proj",  # Gated DeltaNet, and q/k/v/o of attention
    "gate_proj", "up_proj", "down_proj",  # MLP
)  # fmt: skip


def blocks(causal_lm):
    return [
        GatedDeltaNetView(layer, OLMO_HYBRID_LAYOUT)
        if hasattr(layer, "linear_attn")
        else PostNormAttentionBlock(layer, olmo.apply_rotary_pos_emb)
        for layer in causal_lm.model.layers
    ]


register_native(
    "olmo_hybrid", olmo.OlmoHybridConfig, olmo.OlmoHybridForCausalLM, NativeFamily(blocks, middle_periods, LORA_TARGETS)
)
