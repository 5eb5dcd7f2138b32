"""Config of Jet-Nemotron (`model_type: jet_nemotron`), reading the published config.json as it is.

The published files (NVlabs/Jet-Nemotron, `jet-ai/Jet-Nemotron-2B`/`-4B`) are Qwen2 configs plus two fields:
`layer_types` (`jet`, `attn`, `swa` per layer) and `efficient_attention_config` (the `jet` block settings and the
`swa` window). Choices made for transformers 5:

* Layer types keep their published names. transformers 5's strict `validate_layer_type` accepts only its own
  vocabulary (`full_attention`, `linear_attention`, ...), so this class replaces it with a check of the Jet
  vocabulary. Keeping the names means a saved config has the published schema, and the official file loads
  unchanged. (Generic transformers helpers that read `layer_types`, e.g. `DynamicCache(config=...)`, do not
  apply: this family keeps its fast state in the sleep engine.)
* `rope_theta` / `rope_scaling: null` become transformers 5's `rope_parameters` (`{"rope_type": "default",
  "rope_theta": ...}`, theta 1e6 when a config gives none); only default RoPE is implemented, as in the published
  models.
* `auto_map` is dropped: it points at the Hub's remote code, which does not run on transformers 5 and which a
  checkpoint saved by this toolkit does not ship. `import retrofit` registers this class for `jet_nemotron`, so
  `from_pretrained` uses it without `trust_remote_code`.
* `efficient_attention_config` is stored as published (`norm_eps` stays the string "1e-5"); `jet_block_settings()`
  parses it. `mode` and `dconv_implementation` select upstream kernels and are ignored here (`retrofit.ops`
  picks its backend itself).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from huggingface_hub.dataclasses import strict
from transformers import PreTrainedConfig
from transformers.modeling_rope_utils import RopeParameters

from retrofit.configuration import PublishedDecoderConfig

LAYER_TYPES = ("jet", "attn", "swa")  # JetBlock, full attention, sliding-window attention


@dataclass(frozen=True)
class JetBlockSettings:
    """The `efficient_attention_config["jet"]` entry, parsed and checked.

    Attributes:
        num_heads: heads of q, k and v (Jet has no grouped values).
        head_dim: the q/k head size (head_k_dim).
        head_v_dim: `head_dim * expand_v`, which must be an integer.
        conv_size: the dynamic conv's kernel size W.
        generator_reduction: the kernel generator's hidden size is `value_dim // generator_reduction`.
        norm_eps: epsilon of the gated output RMSNorm.
    """

    num_heads: int
    head_dim: int
    head_v_dim: int
    conv_size: int
    generator_reduction: int
    norm_eps: float

    @property
    def key_dim(self) -> int:
        return self.num_heads * self.head_dim

    @property
    def value_dim(self) -> int:
        return self.num_heads * self.head_v_dim

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> JetBlockSettings:
        """Parse the published entry; `expand_v` may be a rounded float (2.6666666667 for 96 -> 256)."""
        head_dim = int(data["head_dim"])
        expand_v = float(data.get("expand_v", 2.0))
        head_v_dim = round(head_dim * expand_v)
        if not math.isclose(head_dim * expand_v, head_v_dim, rel_tol=1e-5):
            raise ValueError(
                f"efficient_attention_config.jet.expand_v = {expand_v} times head_dim = {head_dim} is not an integer"
            )
        return cls(
            num_heads=int(data["num_heads"]),
            head_dim=head_dim,
            head_v_dim=head_v_dim,
            conv_size=int(data.get("conv_size", 4)),
            generator_reduction=int(data.get("dconv_generator_reduction", 8)),
            norm_eps=float(data.get("norm_eps", 1e-5)),
        )


@strict
class JetNemotronConfig(PublishedDecoderConfig, PreTrainedConfig):
    """Jet-Nemotron: a Qwen2 decoder whose layers are JetBlocks (`jet`), full attention (`attn`) or sliding-window
    attention (`swa`), each followed by the SwiGLU MLP. The defaults are those of Jet-Nemotron-2B.
    """

    model_type = "jet_nemotron"
    keys_to_ignore_at_inference = ["past_key_values"]
    default_theta = 1_000_000.0  # the published models' rope_theta, used when a config gives none

    vocab_size: int = 151936
    hidden_size: int = 1536
    intermediate_size: int = 8960
    num_hidden_layers: int = 28
    num_attention_heads: int = 12
    num_key_value_heads: int | None = 2
    head_dim: int | None = None
    hidden_act: str = "silu"
    max_position_embeddings: int = 131072
    initializer_range: float = 0.02
    rms_norm_eps: float = 1e-6
    use_cache: bool = True
    tie_word_embeddings: bool = True
    rope_parameters: RopeParameters | dict | None = None
    attention_dropout: float | int = 0.0
    layer_types: list[str] | None = None
    efficient_attention_config: dict | None = None
    pad_token_id: int | None = None
    bos_token_id: int | None = None
    eos_token_id: int | list[int] | None = None
    sleep_config: dict | None = None

    def __post_init__(self, **kwargs) -> None:
        self.fill_decoder_defaults(kwargs)
        if self.layer_types is None:
            self.layer_types = ["attn"] * self.num_hidden_layers
        super().__post_init__(**kwargs)

    def validate_layer_type(self) -> None:
        """Check the Jet vocabulary (`jet`, `attn`, `swa`) and the settings each type needs.

        Replaces transformers' check, which rejects these names (see the module docstring).
        """
        self.check_decoder_fields("Jet-Nemotron")
        unknown = sorted(set(self.layer_types) - set(LAYER_TYPES))
        if unknown:
            raise ValueError(f"layer_types has unknown entries {unknown}; use {list(LAYER_TYPES)}")
        for layer_type in sorted({"jet", "swa"} & set(self.layer_types)):
            if layer_type not in (self.efficient_attention_config or {}):
                raise ValueError(f"layer_types has {layer_type!r} layers but efficient_attention_config has no entry")

    def jet_block_settings(self) -> JetBlockSettings:
        """The parsed settings of the JetBlocks."""
        return JetBlockSettings.from_dict(self.efficient_attention_config["jet"])

    @property
    def swa_window(self) -> int | None:
        """Tokens a `swa` layer attends to, itself included (the published `window_size`)."""
        swa = (self.efficient_attention_config or {}).get("swa")
        return int(swa["window_size"]) if swa else None
