"""Config of Ouro (`model_type: ouro`), reading the published config.json as it is, plus the retrofit's mixers.

The published files (`ByteDance/Ouro-1.4B` / `-2.6B`) are Qwen2 configs plus `total_ut_steps` (passes of the shared
layer stack) and `early_exit_threshold` (the inference exit rule). Choices made for transformers 5:

* `rope_theta` / `rope_scaling: null` become transformers 5's `rope_parameters` (`{"rope_type": "default",
  "rope_theta": ...}`, theta 1e6 when a config gives none); only default RoPE is implemented, as in the published
  models.
* `auto_map` is dropped: it points at the Hub's remote code, which does not run on transformers 5. `import
  retrofit` registers this class for `ouro`, so `from_pretrained` uses it without `trust_remote_code`.
* Only `full_attention` layers are accepted: the released configs use no other type (`use_sliding_window: false`).

Two fields describe the sleep retrofit (`OuroForCausalLM.prepare_for_sleep` fills them; they are `null` in a
published config, so a base checkpoint builds the base model):

* `jet_mixer_layers`: the Ouro layer indices after which an MLP-free Jet mixer block sits, e.g. `[3, 7, 11, 15, 19,
  23]` for the 24-layer 1.4B;
* `jet_mixer_config`: the mixers' JetBlock settings, in the published Jet-Nemotron `efficient_attention_config.jet`
  form (`num_heads`, `head_dim`, `expand_v`, `conv_size`, `dconv_generator_reduction`, `norm_eps`).

Both are saved in `config.json`, so `from_pretrained` rebuilds the inserted modules and loads their weights.
"""

from __future__ import annotations

from typing import Any

from huggingface_hub.dataclasses import strict
from transformers import PreTrainedConfig
from transformers.modeling_rope_utils import RopeParameters

from model_patches.jet_nemotron import JetBlockSettings
from retrofit.configuration import PublishedDecoderConfig

NUM_JET_MIXERS = 6  # the paper's count for Ouro-1.4B (§6.3)

# The default mixer: 8 heads of 128 (key) x 256 (value), kernel-4 dynamic conv. On Ouro-1.4B (d = 2048) each mixer
# has 19.4M parameters, 6 of them 116M (8% of the model), within the paper's "<10% extra parameters".
DEFAULT_JET_MIXER_CONFIG: dict[str, Any] = {
    "num_heads": 8,
    "head_dim": 128,
    "expand_v": 2.0,
    "conv_size": 4,
    "dconv_generator_reduction": 8,
    "norm_eps": 1e-5,
}


def evenly_spaced_layers(num_layers: int, count: int = NUM_JET_MIXERS) -> list[int]:
    """Layers after which `count` mixers sit, spread evenly, the last one after the last layer.

    24 layers -> `[3, 7, 11, 15, 19, 23]`; 28 -> `[4, 8, 13, 18, 22, 27]`. Fewer layers than mixers: one after each.
    """
    count = min(count, num_layers)
    return [round((k + 1) * num_layers / count) - 1 for k in range(count)]


@strict
class OuroConfig(PublishedDecoderConfig, PreTrainedConfig):
    """Ouro: a Qwen2-shaped decoder (sandwich-norm layers, untied head) whose whole layer stack runs
    `total_ut_steps` times, with an early-exit gate. The defaults are those of Ouro-1.4B.
    """

    model_type = "ouro"
    keys_to_ignore_at_inference = ["past_key_values"]
    default_theta = 1_000_000.0  # the published models' rope_theta, used when a config gives none
    # Fields that describe the retrofit, not the checkpoint's weights: a recipe's `model.config_overrides` sets them
    # after loading, so that `apply_sleep` inserts the mixers they describe (`retrofit.training.pretrained`).
    retrofit_fields = ("jet_mixer_layers", "jet_mixer_config")

    vocab_size: int = 49152
    hidden_size: int = 2048
    intermediate_size: int = 5632
    num_hidden_layers: int = 24
    num_attention_heads: int = 16
    num_key_value_heads: int | None = 16
    head_dim: int | None = None
    hidden_act: str = "silu"
    max_position_embeddings: int = 65536
    initializer_range: float = 0.02
    rms_norm_eps: float = 1e-6
    use_cache: bool = True
    tie_word_embeddings: bool = False
    rope_parameters: RopeParameters | dict | None = None
    attention_dropout: float | int = 0.0
    use_sliding_window: bool = False
    sliding_window: int | None = None
    max_window_layers: int | None = None
    layer_types: list[str] | None = None
    total_ut_steps: int = 4
    early_exit_threshold: float = 1.0
    jet_mixer_layers: list[int] | None = None
    jet_mixer_config: dict | None = None
    pad_token_id: int | None = None
    bos_token_id: int | None = 0
    eos_token_id: int | list[int] | None = 0
    sleep_config: dict | None = None

    def __post_init__(self, **kwargs) -> None:
        self.fill_decoder_defaults(kwargs)
        if self.layer_types is None:
            self.layer_types = ["full_attention"] * self.num_hidden_layers
        super().__post_init__(**kwargs)

    def validate_layer_type(self) -> None:
        """Full attention only (the released models), a loop count >= 1, and mixers at existing layers."""
        self.check_decoder_fields("Ouro")
        if set(self.layer_types) != {"full_attention"} or self.use_sliding_window:
            raise ValueError(
                f"layer_types {sorted(set(self.layer_types))} with use_sliding_window={self.use_sliding_window}: only "
                "full_attention layers are supported (the released Ouro models use no other); set every layer_types "
                "entry to full_attention and use_sliding_window to false"
            )
        if self.total_ut_steps < 1:
            raise ValueError(f"total_ut_steps = {self.total_ut_steps} must be >= 1")
        layers = self.jet_mixer_layers
        if layers is not None and (
            sorted(set(layers)) != list(layers) or not all(0 <= i < self.num_hidden_layers for i in layers)
        ):
            raise ValueError(
                f"jet_mixer_layers = {layers} must be increasing layer indices in [0, {self.num_hidden_layers})"
            )

    @property
    def num_sleep_blocks(self) -> int:
        """The blocks the engine sees once `apply_sleep` has inserted the Jet mixers: the layers plus the mixers."""
        mixers = self.jet_mixer_layers
        return self.num_hidden_layers + len(
            mixers if mixers is not None else evenly_spaced_layers(self.num_hidden_layers)
        )

    def jet_mixer_settings(self) -> JetBlockSettings:
        """The mixers' parsed JetBlock settings (the defaults when `jet_mixer_config` is unset)."""
        return JetBlockSettings.from_dict(self.jet_mixer_config or DEFAULT_JET_MIXER_CONFIG)
