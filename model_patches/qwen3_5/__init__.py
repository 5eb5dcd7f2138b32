"""Qwen3.5 / 3.6, dense and MoE (`qwen3_5_text`, `qwen3_5_moe_text`): transformers' own models, patched to sleep.

Nothing is re-implemented: `apply_sleep` gives the loaded `Qwen3_5ForCausalLM` / `Qwen3_5MoeForCausalLM` instance the
sleep hooks (`retrofit.native`), and the engine runs the views of its decoder layers in `blocks.py`.

Default loop range: whole periods of the 3:1 layout (three Gated DeltaNet layers, then one gated-attention layer)
around the middle half of the stack, `[s, n - s)` with `s` the multiple of the period at or below `n / 4`: `[4, 20)`
for 24 layers, `[8, 24)` for 32, `[16, 48)` for 64. A loop pass then starts on linear layers that write the fast state
and ends on the attention layer that reads the window, as every pass of the paper's loop over Jet-Nemotron's middle
half holds both kinds.
"""

from transformers.models.qwen3_5 import modeling_qwen3_5 as dense
from transformers.models.qwen3_5_moe import modeling_qwen3_5_moe as moe

from model_patches.qwen3_5.blocks import GatedAttentionBlock, GatedDeltaNetBlock, Projections, qwen3_5_projections
from retrofit.native import NativeFamily
from retrofit.registry import register_native

LORA_TARGETS = (
    # Gated DeltaNet: every projection (some tools skip these silently)
    "in_proj_qkv", "in_proj_z", "in_proj_a", "in_proj_b", "out_proj",
    # gated attention
    "q_proj", "k_proj", "v_proj", "o_proj",
    # MLP, and each expert and the shared expert of a MoE block
    "gate_proj", "up_proj", "down_proj",
)  # fmt: skip


def attention_period(layer_types: list[str]) -> int:
    """Layers per period of the hybrid layout: up to and including the first attention layer (4 for 3:1)."""
    return next((i + 1 for i, kind in enumerate(layer_types) if kind == "full_attention"), len(layer_types))


def family(modeling, projections: Projections, lora_targets: tuple[str, ...] = LORA_TARGETS) -> NativeFamily:
    """The blocks, loop range and LoRA targets of a Qwen-style hybrid as `modeling` (transformers' module) lays it out,
    its Gated DeltaNet projected by `projections`."""

    def block(layer):
        if hasattr(layer, "linear_attn"):
            return GatedDeltaNetBlock(layer, projections)
        return GatedAttentionBlock(layer, modeling.apply_rotary_pos_emb)

    def blocks(causal_lm):
        return [block(layer) for layer in causal_lm.model.layers]

    def loop_range(causal_lm) -> tuple[int, int]:
        layer_types = causal_lm.config.layer_types
        period, n = attention_period(layer_types), len(layer_types)
        start = (n // 4) // period * period
        return (start, n - start)

    return NativeFamily(blocks, loop_range, lora_targets)


register_native("qwen3_5_text", dense.Qwen3_5TextConfig, dense.Qwen3_5ForCausalLM, family(dense, qwen3_5_projections))
register_native(
    "qwen3_5_moe_text", moe.Qwen3_5MoeTextConfig, moe.Qwen3_5MoeForCausalLM, family(moe, qwen3_5_projections)
)
