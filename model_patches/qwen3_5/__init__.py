"""Qwen3.5 / 3.6, dense and MoE (`qwen3_5_text`, `qwen3_5_moe_text`): transformers' own models, patched to sleep.

Nothing is re-implemented: `apply_sleep` gives the loaded `Qwen3_5ForCausalLM` / `Qwen3_5MoeForCausalLM` instance the
sleep hooks (`retrofit.native`), and the engine runs the views of its decoder layers in `blocks.py`.

Default loop range: whole periods of the 3:1 layout (three Gated DeltaNet layers, then one gated-attention layer)
around the middle half of the stack (`retrofit.native.middle_periods`: `[4, 20)` for 24 layers, `[8, 24)` for 32).
"""

from transformers.models.qwen3_5 import modeling_qwen3_5 as dense
from transformers.models.qwen3_5_moe import modeling_qwen3_5_moe as moe

from model_patches.qwen3_5.blocks import QWEN3_5_LAYOUT, GatedAttentionBlock
from retrofit.layers.views import DeltaNetLayout, GatedDeltaNetView
from retrofit.native import NativeFamily, middle_periods
from retrofit.registry import register_native

LORA_TARGETS = (
    # Gated DeltaNet: every projection (some tools skip these silently)
    "in_proj_qkv", "in_proj_z", "in_proj_a", "in_proj_b", "out_proj",
    # gated attention
    "q_proj", "k_proj", "v_proj", "o_proj",
    # MLP, and each expert and the shared expert of a MoE block
    "gate_proj", "up_proj", "down_proj",
)  # fmt: skip


def family(modeling, layout: DeltaNetLayout, lora_targets: tuple[str, ...] = LORA_TARGETS) -> NativeFamily:
    """The blocks, loop range and LoRA targets of a Qwen-style hybrid as `modeling` (transformers' module) lays it out,
    its Gated DeltaNet as `layout` says."""

    def block(layer):
        if hasattr(layer, "linear_attn"):
            return GatedDeltaNetView(layer, layout)
        return GatedAttentionBlock(layer, modeling.apply_rotary_pos_emb)

    def blocks(causal_lm):
        return [block(layer) for layer in causal_lm.model.layers]

    return NativeFamily(blocks, middle_periods, lora_targets)


register_native("qwen3_5_text", dense.Qwen3_5TextConfig, dense.Qwen3_5ForCausalLM, family(dense, QWEN3_5_LAYOUT))
register_native("qwen3_5_moe_text", moe.Qwen3_5MoeTextConfig, moe.Qwen3_5MoeForCausalLM, family(moe, QWEN3_5_LAYOUT))
