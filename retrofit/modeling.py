"""What every sleeping causal LM shares: the engine adapter and the forward that dispatches to the engine.

A model family subclasses its `PreTrainedModel` from `SleepCausalLMMixin` and lays its modules out as
`model.embed_tokens`, `model.layers` (blocks following `retrofit.blocks.SleepBlock`), `model.norm`,
`model.rotary_emb` and `lm_head`. Without a `sleep_config` the model runs its plain forward; with one
(set by `retrofit.apply_sleep` or loaded from `config.json`) the forward runs through `SleepEngine`. With a cache
(`cache=`, or `use_cache=True`) it streams new tokens through `retrofit.generation.SleepCache` (a model without
sleep through a `StreamCache`, with no eviction), which is what `generate` does. `from_pretrained` refuses a
checkpoint whose weights do not match its config.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from transformers.cache_utils import Cache
from transformers.modeling_outputs import CausalLMOutputWithPast

from retrofit.config import SleepConfig
from retrofit.engine import IGNORE_INDEX, SleepEngine, next_token_targets, upcast
from retrofit.generation import CACHE_NAME, SleepCache, StreamCache, cached_output, take_cache


@dataclass
class SleepCausalLMOutput(CausalLMOutputWithPast):
    """transformers' causal-LM output, plus what `return_token_scores=True` gives for evaluation: each position's
    next-token loss `[B, T]` (0 where there is no label) and whether the head's argmax is its label (True where
    there is none)."""

    token_loss: Tensor | None = None
    token_correct: Tensor | None = None


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
        return self.lm_head(self.head_features(h))

    def head_features(self, h: Tensor) -> Tensor:
        """What the head computes before its output projection: the final norm."""
        return self.model.norm(h)

    def head_parts(self) -> tuple[Callable[[Tensor], Tensor], nn.Module]:
        """The head as (features, output projection), for fused loss kernels (`retrofit.ops.cross_entropy`)."""
        return self.head_features, self.lm_head

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
        cache: Cache | None = None,
        use_cache: bool | None = None,
        return_token_scores: bool = False,
        **kwargs,
    ) -> CausalLMOutputWithPast:
        """Causal-LM forward. `labels` follow the HF convention (-100 ignored, shifted inside).

        A sleeping model returns logits when there are no labels or when `return_logits=True`; with labels
        alone it computes the head at label positions only; with `return_token_scores=True`, instead of logits, each
        position's loss and whether its argmax is its label (`SleepCausalLMOutput`), without ever holding `[B, T, V]`
        logits.

        With a `cache` (`past_key_values` before transformers 5.25), or `use_cache=True`, it streams `input_ids` (the
        new tokens) through the cache and returns their logits and the cache; `attention_mask` then covers the whole
        stream, as `generate` passes it. A sleeping model streams through a `SleepCache`, a model without sleep
        through a `StreamCache`.
        """
        cache, valid, positions = self.stream_inputs(input_ids, attention_mask, cache, use_cache, labels, kwargs)
        if self.sleep_config is None:
            return self.plain_forward(input_ids, valid, labels, cache=cache, positions=positions)
        if positions is not None:
            raise ValueError(
                "a sleeping model takes its RoPE positions from sleep_config.positions (global or chunk): call it "
                "without position_ids"
            )
        if cache is not None:
            padded = False if attention_mask is None else None  # known without asking the device
            return cached_output(cache.step(self.sleep_engine(), input_ids, valid, padded), cache)
        want_logits = labels is None if return_logits is None else return_logits
        if return_token_scores:
            out = self.sleep_engine().forward(input_ids, attention_mask, labels, return_token_scores=True)
            return SleepCausalLMOutput(loss=out.loss, token_loss=out.token_loss, token_correct=out.token_correct)
        out = self.sleep_engine().forward(input_ids, attention_mask, labels, return_logits=want_logits)
        return CausalLMOutputWithPast(loss=out.loss, logits=out.logits)

    def stream_inputs(
        self,
        input_ids: Tensor,
        attention_mask: Tensor | None,
        cache: Cache | None,
        use_cache: bool | None,
        labels: Tensor | None,
        kwargs: dict,
    ) -> tuple[Cache | None, Tensor, Tensor | None]:
        """What a forward streams: its cache (None for whole sequences), the validity of `input_ids` and the
        `position_ids` it was given (or None). `attention_mask` covers the whole stream when there is a cache."""
        cache = self.streaming_cache(take_cache(cache, kwargs), use_cache, labels)
        valid = torch.ones_like(input_ids, dtype=torch.bool) if attention_mask is None else attention_mask.bool()
        if cache is not None:
            valid = valid[:, -input_ids.shape[1] :]
        positions = kwargs.get("position_ids")
        if positions is not None and positions.shape != input_ids.shape:
            positions = positions[..., -input_ids.shape[1] :]
        return cache, valid, positions

    def streaming_cache(self, cache: Cache | None, use_cache: bool | None, labels: Tensor | None) -> Cache | None:
        """The cache to stream through (a new one for `use_cache=True`), or None for a forward over whole sequences."""
        if cache is None and not use_cache:
            return None
        if labels is not None:
            raise ValueError("labels are not supported with a cache: call the model without a cache (use_cache=False)")
        kind = StreamCache if self.sleep_config is None else SleepCache
        if cache is None:
            return kind()
        if not isinstance(cache, kind):
            raise TypeError(
                f"this model streams through a {kind.__name__}, not a {type(cache).__name__}: let generate make the "
                f"cache, or pass {kind.__name__}()"
            )
        return cache

    def sleep(self, cache: SleepCache) -> int:
        """Consolidate the current partial window of `cache` now (idle-time sleep); return the tokens consolidated.

        The chunk so far sleeps from its starting state and is evicted; the next token starts a new chunk.
        """
        with torch.no_grad():
            return cache.consolidate(self.sleep_engine())

    def _prepare_cache_for_generation(self, generation_config: Any, model_kwargs: dict, *args: Any) -> None:
        """`generate` hook (as transformers' models with their own cache type override it): a sleeping model streams
        through a `SleepCache`, a model without sleep through a `StreamCache`, kept under this transformers' cache name
        (`CACHE_NAME`)."""
        cache = model_kwargs.get(CACHE_NAME)
        if cache is not None:
            self.streaming_cache(cache, True, None)  # refuses a cache of the wrong kind
            cache._is_user_defined = True
        elif generation_config.use_cache is not False:
            model_kwargs[CACHE_NAME] = self.streaming_cache(None, True, None)

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
        self,
        input_ids: Tensor,
        valid: Tensor | None = None,
        labels: Tensor | None = None,
        cache: StreamCache | None = None,
        positions: Tensor | None = None,
    ) -> CausalLMOutputWithPast:
        """The model without sleep: every block once, each attention layer with its own window (full causal, or
        sliding). With a `cache` the tokens continue the stream it holds; `valid` marks the real tokens of `input_ids`
        (all by default), and `positions` replace the RoPE positions that count them."""
        valid = torch.ones_like(input_ids, dtype=torch.bool) if valid is None else valid.bool()
        adapter = self.get_sleep_adapter()
        (h,) = (cache if cache is not None else StreamCache()).run(adapter, input_ids, valid, 1, positions)
        logits = adapter.head(h)
        if cache is not None:
            return cached_output(logits, cache)
        loss = None if labels is None else next_token_loss(logits, labels, valid)
        return CausalLMOutputWithPast(loss=loss, logits=logits)


def next_token_loss(logits: Tensor, labels: Tensor, valid: Tensor) -> Tensor:
    """Mean cross-entropy over the label tokens, as the engine computes it (0 for a batch without any)."""
    targets = next_token_targets(labels, valid).flatten()
    total = F.cross_entropy(upcast(logits).flatten(0, 1), targets, ignore_index=IGNORE_INDEX, reduction="sum")
    return total / (targets != IGNORE_INDEX).sum().clamp(min=1)


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
