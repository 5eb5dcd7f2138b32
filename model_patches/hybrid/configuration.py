"""Config of the from-scratch GDN–attention hybrid (`model_type: sleep_hybrid`)."""

from __future__ import annotations

from huggingface_hub.dataclasses import strict
from transformers import PreTrainedConfig

LAYER_KINDS = {"full_attention": "attention", "sliding_attention": "sliding", "linear_attention": "linear"}


@strict
class SleepHybridConfig(PreTrainedConfig):
    """A hybrid built from a layer pattern, e.g. the paper's Rule 110 model:
    `layer_types: [full_attention, linear_attention, full_attention, linear_attention]`, d=256.

    Attention layers use RoPE and SDPA; linear layers are Gated DeltaNet (fla layout) with short convs.
    """

    model_type = "sleep_hybrid"

    vocab_size: int = 32
    hidden_size: int = 256
    intermediate_size: int = 768
    num_hidden_layers: int = 4
    layer_types: list[str] | None = None
    num_attention_heads: int = 4
    num_key_value_heads: int | None = None
    head_dim: int | None = None
    sliding_window: int | None = None
    linear_num_heads: int = 4
    linear_head_dim: int = 64
    linear_num_v_heads: int | None = None
    linear_head_v_dim: int | None = None
    linear_conv_size: int = 4
    rope_theta: float = 10000.0
    rms_norm_eps: float = 1e-6
    initializer_range: float = 0.02
    tie_word_embeddings: bool = False
    pad_token_id: int | None = None
    bos_token_id: int | None = None
    eos_token_id: int | None = None
    sleep_config: dict | None = None

    def __post_init__(self, **kwargs) -> None:
        if self.layer_types is None:
            pattern = ("full_attention", "linear_attention")
            self.layer_types = [pattern[i % 2] for i in range(self.num_hidden_layers)]
        if self.num_key_value_heads is None:
            self.num_key_value_heads = self.num_attention_heads
        if self.head_dim is None:
            self.head_dim = self.hidden_size // self.num_attention_heads
        super().__post_init__(**kwargs)

    def validate_architecture(self) -> None:
        """Raise a `ValueError` naming the bad field when the layer pattern cannot be built."""
        if len(self.layer_types) != self.num_hidden_layers:
            raise ValueError(
                f"layer_types has {len(self.layer_types)} entries but num_hidden_layers is {self.num_hidden_layers}"
            )
        unknown = sorted(set(self.layer_types) - set(LAYER_KINDS))
        if unknown:
            raise ValueError(f"layer_types has unknown entries {unknown}; use {sorted(LAYER_KINDS)}")
        if "sliding_attention" in self.layer_types and not self.sliding_window:
            raise ValueError("layer_types has sliding_attention layers but sliding_window is not set")
