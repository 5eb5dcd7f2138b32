"""Jet-Nemotron for transformers 5 and the sleep engine, loading the published safetensors unchanged.

Layout (the published weight names): `model.embed_tokens`, `model.layers.{i}` = pre-norm residual block with
`self_attn` (a `JetBlock`, or Qwen2 attention with q/k/v biases, GQA and RoPE; `swa` layers attend to the last
`efficient_attention_config.swa.window_size` tokens) and the SwiGLU `mlp`, `model.norm`, and `lm_head` tied to the
embedding. The Hub's remote code is not needed: `import retrofit` registers these classes for `jet_nemotron`.

Sleep loops the middle half of the blocks by default (`[n // 4, n - n // 4)`: `[7, 21)` for the 28-layer 2B,
`[9, 27)` for the 36-layer 4B), the paper's setting for Jet-Nemotron-2B.
"""

from __future__ import annotations

from functools import partial

from torch import nn
from transformers import GenerationMixin, PreTrainedModel

from model_patches.jet_nemotron.configuration import JetNemotronConfig
from model_patches.jet_nemotron.jet_block import JetBlock, init_static_kernel
from retrofit.layers.attention import Attention
from retrofit.layers.decoder import swiglu_decoder_layers
from retrofit.layers.gated_deltanet import init_delta_rule_parameters
from retrofit.layers.norm import RMSNorm
from retrofit.layers.rope import RotaryEmbedding
from retrofit.modeling import SleepCausalLMMixin

# Jet-Nemotron's published RMSNorm multiplies by its weight in float32, then casts (Qwen2's order casts first).
JetRMSNorm = partial(RMSNorm, weight_in_float32=True)


def _mixer(config: JetNemotronConfig, layer_type: str) -> nn.Module:
    if layer_type == "jet":
        return JetBlock(config.hidden_size, config.jet_block_settings())
    return Attention(
        config.hidden_size,
        config.num_attention_heads,
        config.num_key_value_heads,
        config.head_dim,
        qkv_bias=True,
        window=config.swa_window if layer_type == "swa" else None,
    )


class JetNemotronPreTrainedModel(PreTrainedModel):
    config_class = JetNemotronConfig
    base_model_prefix = "model"
    _no_split_modules = ["DecoderLayer"]
    _supports_sdpa = True

    def _init_weights(self, module: nn.Module) -> None:
        """Linear/embedding init from transformers; JetBlock gates as fla; the static conv kernel as `nn.Conv1d`.

        Only for from-scratch models: weights loaded from a checkpoint are never re-initialised.
        """
        super()._init_weights(module)
        init_delta_rule_parameters(module)
        init_static_kernel(module)


class JetNemotronModel(JetNemotronPreTrainedModel):
    def __init__(self, config: JetNemotronConfig) -> None:
        super().__init__(config)
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size, config.pad_token_id)
        mixers = (_mixer(config, layer_type) for layer_type in config.layer_types)
        self.layers = swiglu_decoder_layers(
            mixers, config.hidden_size, config.intermediate_size, config.rms_norm_eps, JetRMSNorm
        )
        self.norm = JetRMSNorm(config.hidden_size, config.rms_norm_eps)
        self.rotary_emb = RotaryEmbedding(config.head_dim, config.rope_parameters["rope_theta"])
        self.post_init()


class JetNemotronForCausalLM(SleepCausalLMMixin, JetNemotronPreTrainedModel, GenerationMixin):
    _tied_weights_keys = {"lm_head.weight": "model.embed_tokens.weight"}

    def __init__(self, config: JetNemotronConfig) -> None:
        super().__init__(config)
        self.model = JetNemotronModel(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    def default_loop_range(self) -> tuple[int, int]:
        """The middle half of the blocks, `[n // 4, n - n // 4)`."""
        n = len(self.model.layers)
        return (n // 4, n - n // 4)
