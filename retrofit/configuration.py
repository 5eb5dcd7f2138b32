"""What the configs of the published Qwen2-shaped families (Jet-Nemotron, Ouro) share."""

from __future__ import annotations

from typing import Any


class PublishedDecoderConfig:
    """Mixed into a family's `PreTrainedConfig`: reads the published config.json as is and checks that it asks for
    nothing our modeling does not implement.

    The published `auto_map` points at the Hub's remote code, which does not run on transformers 5 and which this
    toolkit replaces (`import retrofit` registers the family), so it is dropped and never written back.
    """

    def fill_decoder_defaults(self, kwargs: dict[str, Any]) -> None:
        """Call first in `__post_init__`: drop `auto_map`, default the KV heads and the head size."""
        kwargs.pop("auto_map", None)
        if self.num_key_value_heads is None:
            self.num_key_value_heads = self.num_attention_heads
        if self.head_dim is None:
            self.head_dim = self.hidden_size // self.num_attention_heads

    def check_decoder_fields(self, family: str) -> None:
        """One entry of `layer_types` per layer, a SiLU MLP and default RoPE; raise `ValueError` naming the field."""
        if len(self.layer_types) != self.num_hidden_layers:
            raise ValueError(
                f"layer_types has {len(self.layer_types)} entries but num_hidden_layers is {self.num_hidden_layers}"
            )
        if self.hidden_act != "silu":
            raise ValueError(f"hidden_act = {self.hidden_act!r} is not supported; {family}'s MLP uses 'silu'")
        rope_type = (self.rope_parameters or {}).get("rope_type", "default")
        if rope_type != "default":
            raise ValueError(f"rope_parameters.rope_type = {rope_type!r} is not supported; only 'default' RoPE")
