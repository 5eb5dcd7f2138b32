"""The from-scratch GDN–attention hybrid: the paper's synthetic-task models (Rule 110, Depo)."""

from __future__ import annotations

from torch import nn
from transformers import GenerationMixin, PreTrainedModel

from model_patches.hybrid.configuration import SleepHybridConfig
from retrofit.layers.attention import Attention
from retrofit.layers.decoder import swiglu_decoder_layers
from retrofit.layers.gated_deltanet import GatedDeltaNet, init_delta_rule_parameters
from retrofit.layers.norm import RMSNorm
from retrofit.layers.rope import RotaryEmbedding
from retrofit.modeling import SleepCausalLMMixin


def _mixer(config: SleepHybridConfig, layer_type: str) -> nn.Module:
    if layer_type == "linear_attention":
        return GatedDeltaNet(
            config.hidden_size,
            config.linear_num_heads,
            config.linear_head_dim,
            num_v_heads=config.linear_num_v_heads,
            head_v_dim=config.linear_head_v_dim,
            conv_size=config.linear_conv_size,
        )
    window = config.sliding_window if layer_type == "sliding_attention" else None
    return Attention(
        config.hidden_size, config.num_attention_heads, config.num_key_value_heads, config.head_dim, window=window
    )


class SleepHybridPreTrainedModel(PreTrainedModel):
    config_class = SleepHybridConfig
    base_model_prefix = "model"
    _no_split_modules = ["DecoderLayer"]
    _supports_sdpa = True

    def _init_weights(self, module: nn.Module) -> None:
        super()._init_weights(module)
        init_delta_rule_parameters(module)


class SleepHybridModel(SleepHybridPreTrainedModel):
    def __init__(self, config: SleepHybridConfig) -> None:
        super().__init__(config)
        config.validate_architecture()
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size, config.pad_token_id)
        mixers = (_mixer(config, t) for t in config.layer_types)
        self.layers = swiglu_decoder_layers(mixers, config.hidden_size, config.intermediate_size, config.rms_norm_eps)
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.rotary_emb = RotaryEmbedding(config.head_dim, config.rope_theta)
        self.post_init()


class SleepHybridForCausalLM(SleepCausalLMMixin, SleepHybridPreTrainedModel, GenerationMixin):
    _tied_weights_keys = {"lm_head.weight": "model.embed_tokens.weight"}

    def __init__(self, config: SleepHybridConfig) -> None:
        super().__init__(config)
        self.model = SleepHybridModel(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()
