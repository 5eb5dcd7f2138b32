"""What every sleeping causal LM shares: the engine adapter and the forward that dispatches to the engine.

A model family subclasses its `PreTrainedModel` from `SleepCausalLMMixin` and lays its modules out as
`model.embed_tokens`, `model.layers` (blocks following `retrofit.blocks.SleepBlock`), `model.norm`,
`model.rotary_emb` and `lm_head`. Without a `sleep_config` the model runs its plain forward; with one
(set by `retrofit.apply_sleep` or loaded from `config.json`) the forward runs through `SleepEngine`, and with a
cache (`past_key_values`, or `use_cache=True`) it streams new tokens through `retrofit.generation.SleepCache`, which
is what `generate` does. `from_pretrained` refuses a checkpoint whose weights do not match its config.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from transformers.modeling_outputs import CausalLMOutputWithPast

from retrofit.blocks import Chunk
from retrofit.config import SleepConfig
from retrofit.engine import IGNORE_INDEX, SleepEngine, next_token_targets, sequence_positions, upcast
from retrofit.generation import SleepCache


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
        past_key_values: SleepCache | None = None,
        use_cache: bool | None = None,
        **kwargs,
    ) -> CausalLMOutputWithPast:
        """Causal-LM forward. `labels` follow the HF convention (-100 ignored, shifted inside).

        A sleeping model returns logits when there are no labels or when `return_logits=True`; with labels
        alone it computes the head at label positions only. With `past_key_values` (or `use_cache=True`) it
        streams `input_ids` (the new tokens) through the cache and returns their logits and the cache;
        `attention_mask` then covers the whole stream, as `generate` passes it.
        """
        if self.sleep_config is not None and (past_key_values is not None or use_cache):
            if labels is not None:
                raise ValueError("labels are not supported with a cache: call the model without past_key_values")
            cache = SleepCache() if past_key_values is None else past_key_values
            if not isinstance(cache, SleepCache):
                raise TypeError(f"a sleeping model streams through a SleepCache, not a {type(cache).__name__}")
            new = input_ids.shape[1]
            valid = torch.ones_like(input_ids, dtype=torch.bool) if attention_mask is None else attention_mask.bool()
            logits = cache.step(self.sleep_engine(), input_ids, valid[:, -new:])
            return CausalLMOutputWithPast(logits=logits, past_key_values=cache)
        if self.sleep_config is not None:
            want_logits = labels is None if return_logits is None else return_logits
            out = self.sleep_engine().forward(input_ids, attention_mask, labels, return_logits=want_logits)
            return CausalLMOutputWithPast(loss=out.loss, logits=out.logits)
        refuse_cache(past_key_values, use_cache)
        return self.plain_forward(input_ids, attention_mask, labels)

    def sleep(self, cache: SleepCache) -> int:
        """Consolidate the current partial window of `cache` now (idle-time sleep); return the tokens consolidated.

        The chunk so far sleeps from its starting state and is evicted; the next token starts a new chunk.
        """
        with torch.no_grad():
            return cache.consolidate(self.sleep_engine())

    def _prepare_cache_for_generation(self, generation_config: Any, model_kwargs: dict, *args: Any) -> None:
        """`generate` hook: a sleeping model streams through a `SleepCache`; a plain model recomputes each step.

        The plain forward keeps no KV, so it must see the whole sequence at every step (`use_cache=False`).
        """
        if self.sleep_config is None:
            generation_config.use_cache = False
            return
        cache = model_kwargs.get("past_key_values")
        if cache is not None:
            if not isinstance(cache, SleepCache):
                raise TypeError(f"a sleeping model generates with a SleepCache, not a {type(cache).__name__}")
            cache._is_user_defined = True
        elif generation_config.use_cache is not False:
            model_kwargs["past_key_values"] = SleepCache()

    @classmethod
    def from_pretrained(cls, *args: Any, **kwargs: Any) -> Any:
        """`PreTrainedModel.from_pretrained`, refusing weights that do not match the config (transformers only
        warns about missing and unexpected keys): raises `ValueError` naming the first bad key."""
        wants_info = kwargs.pop("output_loading_info", False)
        ignore_mismatched = kwargs.pop("ignore_mismatched_sizes", False)
        model, info = super().from_pretrained(*args, output_loading_info=True, ignore_mismatched_sizes=True, **kwargs)
        source = args[0] if args else kwargs.get("pretrained_model_name_or_path")
        check_loading_info(info, source, check_shapes=not ignore_mismatched)
        return (model, info) if wants_info else model

    def plain_forward(
        self, input_ids: Tensor, attention_mask: Tensor | None = None, labels: Tensor | None = None
    ) -> CausalLMOutputWithPast:
        """The model without sleep: every block once over the whole sequence, each attention layer with its own window
        (full causal, or sliding)."""
        valid = torch.ones_like(input_ids, dtype=torch.bool) if attention_mask is None else attention_mask.bool()
        adapter = self.get_sleep_adapter()
        positions = sequence_positions(valid, "global", input_ids.shape[1])
        chunk = Chunk(0, positions, valid, adapter.rope(positions), None, not bool(valid.all()))
        h = adapter.embed(input_ids)
        for block in adapter.blocks:
            h, _, _ = block(h, None, None, chunk)
        logits = adapter.head(h)
        loss = None if labels is None else next_token_loss(logits, labels, valid)
        return CausalLMOutputWithPast(loss=loss, logits=logits)


def next_token_loss(logits: Tensor, labels: Tensor, valid: Tensor) -> Tensor:
    """Mean cross-entropy over the label tokens, as the engine computes it (0 for a batch without any)."""
    targets = next_token_targets(labels, valid).flatten()
    total = F.cross_entropy(upcast(logits).flatten(0, 1), targets, ignore_index=IGNORE_INDEX, reduction="sum")
    return total / (targets != IGNORE_INDEX).sum().clamp(min=1)


def refuse_cache(past_key_values: Any, use_cache: bool | None) -> None:
    """A model without sleep keeps no cache (its forward recomputes the whole sequence): a decode loop that passed
    only the new tokens would get logits without context, so it is told so."""
    if past_key_values is not None or use_cache:
        raise ValueError(
            "this model has no sleep, so it keeps no cache: call it on the whole sequence (use_cache=False), "
            "or retrofit.apply_sleep(model, SleepConfig(...)) to stream through a SleepCache"
        )


def check_loading_info(info: dict[str, Any], source: Any, *, check_shapes: bool = True) -> None:
    """Raise `ValueError` naming the first missing, unexpected or mis-shaped weight of a load from `source`."""
    problems = [
        (sorted(info.get("missing_keys", ())), "is missing from the checkpoint"),
        (sorted(info.get("unexpected_keys", ())), "is in the checkpoint but not in the model its config describes"),
    ]
    if check_shapes:
        mismatched = sorted(info.get("mismatched_keys", ()))
        problems.append(
            ([f"{k} (checkpoint {tuple(a)}, model {tuple(b)})" for k, a, b in mismatched], "has the wrong shape")
        )
    for keys, what in problems:
        if keys:
            more = f" (and {len(keys) - 1} more)" if len(keys) > 1 else ""
            raise ValueError(
                f"{source}: weight {keys[0]} {what}{more}. The weights do not match config.json: load the folder "
                "that was saved with this config, or fix the config (layer types, sizes, sleep retrofit) to match"
            )
