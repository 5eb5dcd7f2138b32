"""What every sleeping causal LM shares: the engine adapter and the forward that dispatches to the engine.

A model family subclasses its `PreTrainedModel` from `SleepCausalLMMixin` and lays its modules out as
`model.embed_tokens`, `model.layers` (blocks following `retrofit.blocks.SleepBlock`), `model.norm`,
`model.rotary_emb` and `lm_head`. Without a `sleep_config` the model runs its plain forward; with one
(set by `retrofit.apply_sleep` or loaded from `config.json`) the forward runs through `SleepEngine`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from transformers.modeling_outputs import CausalLMOutputWithPast

from retrofit.blocks import Chunk
from retrofit.config import SleepConfig
from retrofit.engine import IGNORE_INDEX, SleepEngine, next_token_targets, sequence_positions, upcast


class DecoderAdapter:
    """The engine's view of a decoder-only LM: embedding, blocks, final norm + head, RoPE."""

    def __init__(self, causal_lm: nn.Module, default_loop_range: tuple[int, int]) -> None:
        self.model = causal_lm.model
        self.lm_head = causal_lm.lm_head
        self.blocks = causal_lm.model.layers
        self.default_loop_range = default_loop_range

    def embed(self, input_ids: Tensor) -> Tensor:
        return self.model.embed_tokens(input_ids)

    def head(self, h: Tensor) -> Tensor:
        return self.lm_head(self.model.norm(h))

    def rope(self, positions: Tensor) -> tuple[Tensor, Tensor]:
        return self.model.rotary_emb(positions, dtype=self.model.embed_tokens.weight.dtype)


class SleepCausalLMMixin:
    """Forward dispatch (plain vs. sleeping) and the sleep hooks shared by all families."""

    def default_loop_range(self) -> tuple[int, int]:
        """The blocks a sleep loops by default: all of them; families override."""
        return (0, len(self.model.layers))

    def get_sleep_adapter(self) -> DecoderAdapter:
        return DecoderAdapter(self, self.default_loop_range())

    @property
    def sleep_config(self) -> SleepConfig | None:
        data = getattr(self.config, "sleep_config", None)
        return SleepConfig.from_dict(data) if data else None

    def sleep_engine(self) -> SleepEngine:
        config = self.sleep_config
        if config is None:
            raise RuntimeError("this model is not sleeping: call retrofit.apply_sleep(model, SleepConfig(...)) first")
        return SleepEngine(self.get_sleep_adapter(), config)

    def forward(
        self,
        input_ids: Tensor,
        attention_mask: Tensor | None = None,
        labels: Tensor | None = None,
        return_logits: bool | None = None,
        **kwargs,
    ) -> CausalLMOutputWithPast:
        """Causal-LM forward. `labels` follow the HF convention (-100 ignored, shifted inside).

        A sleeping model returns logits when there are no labels or when `return_logits=True`; with labels
        alone it computes the head at label positions only.
        """
        if self.sleep_config is not None:
            want_logits = labels is None if return_logits is None else return_logits
            out = self.sleep_engine().forward(input_ids, attention_mask, labels, return_logits=want_logits)
            return CausalLMOutputWithPast(loss=out.loss, logits=out.logits)
        return self.plain_forward(input_ids, attention_mask, labels)

    def plain_forward(
        self, input_ids: Tensor, attention_mask: Tensor | None = None, labels: Tensor | None = None
    ) -> CausalLMOutputWithPast:
        """The model without sleep: every block once over the whole sequence, full causal attention."""
        valid = torch.ones_like(input_ids, dtype=torch.bool) if attention_mask is None else attention_mask.bool()
        adapter = self.get_sleep_adapter()
        positions = sequence_positions(valid, "global", input_ids.shape[1])
        chunk = Chunk(0, positions, valid, adapter.rope(positions), None, not bool(valid.all()))
        h = adapter.embed(input_ids)
        for block in adapter.blocks:
            h, _, _ = block(h, None, None, chunk)
        logits = adapter.head(h)
        loss = None
        if labels is not None:
            targets = next_token_targets(labels, valid)
            loss = F.cross_entropy(upcast(logits).flatten(0, 1), targets.flatten(), ignore_index=IGNORE_INDEX)
        return CausalLMOutputWithPast(loss=loss, logits=logits)
