"""Streaming inference with sleep: `SleepCache` and the cached forward behind `model.generate` (the `retrofit
generate` command is `retrofit.generate_command`).

Inference reads a stream of tokens (prompt and generated alike) in chunks of L tokens (DESIGN.md, "Semantics"):

* every new token gets one wake pass: all blocks once, from the streaming fast states, attending to the retained
  KV window plus the earlier tokens of its chunk. A prompt is processed in segments that end at chunk boundaries,
  which computes the same as one token at a time;
* when a token arrives and the current chunk already holds L tokens, the chunk sleeps first: `SleepEngine.sleep`
  runs its N passes FROM THE STATE AT THE CHUNK'S START (the engine reuses the wake pass as the first pass) and
  evicts, returning the next chunk's starting states and retained windows (none under hard eviction, the last L-1
  wake tokens under sliding). Sleeping lazily, only once a next token exists, is what `SleepEngine.forward` does
  (a chunk sleeps when another follows it), so greedy decoding equals the argmax of the engine's wake logits;
* `consolidate` (`model.sleep(cache)`) sleeps the current chunk now, full or not, and starts a new chunk at the
  current position: what a server can do while it waits for the user.

KV memory is bounded: each attention block holds at most L-1 retained tokens plus the current chunk (<= L tokens),
and a sliding-window block at most its window - 1 of them (older keys are never read again).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor
from transformers.cache_utils import Cache
from transformers.modeling_outputs import CausalLMOutputWithPast

from retrofit.blocks import BlockState, Chunk, KVWindow, LinearState, SleepAdapter, join_readable
from retrofit.engine import SleepEngine

# The name under which this transformers passes a cache to `forward`, returns it in a model output and keeps it
# between `generate` steps: `cache` from transformers 5.25 on, `past_key_values` before.
CACHE_NAME = "cache" if "cache" in CausalLMOutputWithPast.__dataclass_fields__ else "past_key_values"


def cached_output(logits: Tensor, cache: Cache) -> CausalLMOutputWithPast:
    """A causal-LM output that hands `cache` back to `generate`, under this transformers' name for it."""
    return CausalLMOutputWithPast(logits=logits, **{CACHE_NAME: cache})


def take_cache(cache: Cache | None, kwargs: dict) -> Cache | None:
    """The cache a `forward` was given: `cache=` (transformers >= 5.25), or `past_key_values=` (the name before)."""
    legacy = kwargs.pop("past_key_values", None)
    return cache if cache is not None else legacy


@dataclass
class _ChunkTokens:
    """The current chunk's tokens so far: ids, RoPE positions and validity, each `[B, c]`."""

    ids: Tensor
    positions: Tensor
    valid: Tensor

    def append(self, ids: Tensor, positions: Tensor, valid: Tensor) -> None:
        self.ids = torch.cat([self.ids, ids], dim=1)
        self.positions = torch.cat([self.positions, positions], dim=1)
        self.valid = torch.cat([self.valid, valid], dim=1)

    @property
    def length(self) -> int:
        return self.ids.shape[1]


class StreamingCache(Cache):
    """What the toolkit's caches share: the stream position, for `generate`, and no rollback or beam search."""

    def __init__(self) -> None:
        super().__init__(layers=[])
        self.seen = 0
        self.num_valid: Tensor | None = None

    def get_seq_length(self, layer_idx: int = 0) -> int:
        """Tokens seen so far; `generate` slices the new tokens off `input_ids` with it."""
        return self.seen

    @property
    def is_compileable(self) -> bool:
        return False

    @property
    def is_croppable(self) -> bool:
        """A sleep cannot be undone, and fast states cannot be rolled back: no cropping."""
        return False

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        raise NotImplementedError("beam search is not supported with this cache: use greedy decoding or sampling")

    @staticmethod
    def positions_after(before: Tensor, valid: Tensor) -> Tensor:
        """RoPE ids of new tokens `[B, T]` that continue a count of `before` `[B]` real tokens (padding does not
        advance them), as `retrofit.engine.sequence_positions` counts on the whole stream."""
        return (before[:, None] + valid.long().cumsum(-1) - 1).clamp(min=0)

    def advance(self, valid: Tensor) -> None:
        """Count the new tokens `valid` `[B, T]` as seen."""
        self.seen += valid.shape[1]
        self.num_valid = self.num_valid + valid.long().sum(-1)


class SleepCache(StreamingCache):
    """The streaming state of a sleeping model, as a transformers `Cache` that `generate` carries between steps.

    `generate` makes one; pass `cache=SleepCache()` (`past_key_values=` before transformers 5.25) to keep it (to
    `model.sleep(cache)` when idle, or to continue the stream with more tokens). Its per-block lists are sized to the
    model on the first step.

    Attributes:
        chunk_start_states: each block's fast state at the current chunk's start (what its sleep starts from).
        states: each block's streaming fast state, after the last token seen.
        windows: each attention block's retained KV window (tokens before the current chunk), or None.
        chunk_kv: each attention block's keys/values of the current chunk's tokens so far, or None.
        chunk: the current chunk's token ids, positions and validity.
        chunk_start: index of the current chunk's first token in the stream.
        seen: tokens seen so far (padding included: it is the stream index of the next token).
        num_valid: `[B]` real (non-padding) tokens seen so far per row; global RoPE positions count these.
    """

    def __init__(self) -> None:
        super().__init__()
        self.chunk_start_states: list[BlockState] = []
        self.states: list[BlockState] = []
        self.windows: list[KVWindow | None] = []
        self.chunk_kv: list[KVWindow | None] = []
        self.chunk: _ChunkTokens | None = None
        self.chunk_start = 0

    # ------------------------------------------------------------------ streaming

    def kv_lengths(self) -> list[tuple[int, int]]:
        """Per attention block: (retained window tokens, current chunk tokens) held in KV memory."""
        return [
            (w.length if w is not None else 0, kv.length)
            for w, kv in zip(self.windows, self.chunk_kv, strict=True)
            if kv is not None
        ]

    def step(self, engine: SleepEngine, input_ids: Tensor, valid: Tensor) -> Tensor:
        """Wake logits `[B, T, V]` of the new tokens `input_ids` `[B, T]`, sleeping at every chunk boundary."""
        if engine.config.wake_passes != 1:
            raise ValueError(
                f"streaming inference needs sleep_config.wake_passes = 1, not {engine.config.wake_passes} (a streamed "
                "token runs one pass); generate with use_cache=False (the engine recomputes every step), or apply "
                "a sleep config with wake_passes=1"
            )
        if self.num_valid is None:  # first call: size the per-block lists to the model
            num_blocks = len(engine.adapter.blocks)
            self.chunk_start_states, self.states = [None] * num_blocks, [None] * num_blocks
            self.windows, self.chunk_kv = [None] * num_blocks, [None] * num_blocks
            self.num_valid = valid.new_zeros(valid.shape[0], dtype=torch.long)
        window, logits, offset = engine.config.window, [], 0
        while offset < input_ids.shape[1]:
            if self.chunk is not None and self.chunk.length >= window:
                self.consolidate(engine)
            used = self.chunk.length if self.chunk is not None else 0
            stop = min(offset + window - used, input_ids.shape[1])
            logits.append(self._wake(engine, input_ids[:, offset:stop], valid[:, offset:stop]))
            offset = stop
        return torch.cat(logits, dim=1)

    def consolidate(self, engine: SleepEngine) -> int:
        """Sleep on the current chunk now (from its starting state), evict, and start a new chunk here.

        Returns the number of tokens consolidated (0 when the current chunk is empty).
        """
        if self.chunk is None:
            return 0
        chunk = self.chunk
        states, windows = engine.sleep(
            chunk.ids, self.chunk_start, chunk.positions, self.chunk_start_states, self.windows, chunk.valid
        )
        self.chunk_start_states, self.states, self.windows = states, list(states), windows
        self.chunk_kv = [None] * len(self.chunk_kv)
        self.chunk, self.chunk_start = None, self.seen
        return chunk.length

    def _positions(self, engine: SleepEngine, valid: Tensor) -> Tensor:
        """RoPE ids of new tokens, as `retrofit.engine.sequence_positions` gives them on the whole stream."""
        if engine.config.positions == "global":
            before = self.num_valid
        else:
            before = self.chunk.valid.long().sum(-1) if self.chunk is not None else torch.zeros_like(self.num_valid)
        return self.positions_after(before, valid)

    def _wake(self, engine: SleepEngine, input_ids: Tensor, valid: Tensor) -> Tensor:
        """One wake pass over tokens that all belong to the current chunk."""
        positions = self._positions(engine, valid)
        chunk = engine.chunk_for_tokens(self.seen, positions, valid)
        adapter = engine.adapter
        h = adapter.embed(input_ids)
        for i, block in enumerate(adapter.blocks):
            kv = join_readable(self.windows[i], self.chunk_kv[i], block.kv_window)
            h, self.states[i], own = block(h, self.states[i], kv, chunk)
            if own is not None:
                self.chunk_kv[i] = join_readable(self.chunk_kv[i], own, block.kv_window)
        if self.chunk is None:
            self.chunk = _ChunkTokens(input_ids, positions, valid)
        else:
            self.chunk.append(input_ids, positions, valid)
        self.advance(valid)
        return adapter.head(h)


class StreamCache(StreamingCache):
    """The keys, values and fast states of a model without sleep, so that `generate` feeds only the new tokens.

    Nothing is evicted: each attention block keeps every key it can still read (a sliding-window block its window),
    as a plain transformer's cache does. A model that runs its stack several times per token (Ouro's UT steps) keeps
    one set per pass, as Ouro's published cache keeps one KV slot per (step, layer).

    Attributes:
        states: `[pass][block]` fast state after the last token seen.
        windows: `[pass][block]` keys and values of the tokens seen (attention blocks), or None.
        seen: tokens seen so far (padding included).
        num_valid: `[B]` real tokens seen so far per row; RoPE positions count these.
    """

    def __init__(self) -> None:
        super().__init__()
        self.states: list[list[BlockState]] = []
        self.windows: list[list[KVWindow | None]] = []

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        """Beam search: keep the rows `beam_idx` of every state, window and count (nothing is evicted to undo)."""

        def rows(x: Tensor) -> Tensor:
            return x.index_select(0, beam_idx.to(x.device))

        self.states = [
            [None if s is None else LinearState(rows(s.recurrent), tuple(rows(c) for c in s.conv)) for s in states]
            for states in self.states
        ]
        self.windows = [
            [
                None if w is None else w._replace(keys=rows(w.keys), values=rows(w.values), valid=rows(w.valid))
                for w in ws
            ]
            for ws in self.windows
        ]
        if self.num_valid is not None:
            self.num_valid = rows(self.num_valid)

    def run(
        self, adapter: SleepAdapter, input_ids: Tensor, valid: Tensor, passes: int, positions: Tensor | None = None
    ) -> list[Tensor]:
        """Run `passes` passes of every block over the new tokens; return h after each pass, each `[B, T, D]`.

        `positions` (RoPE ids of the new tokens) default to counting the real tokens of the stream.
        """
        blocks = adapter.blocks
        if self.num_valid is None:
            self.states = [[None] * len(blocks) for _ in range(passes)]
            self.windows = [[None] * len(blocks) for _ in range(passes)]
            self.num_valid = valid.new_zeros(valid.shape[0], dtype=torch.long)
        elif len(self.states) != passes:
            raise ValueError(
                f"this cache holds {len(self.states)} pass(es) per token, and this call runs {passes}: keep the "
                "number of passes (ut_steps) fixed while streaming, or start a new cache"
            )
        if positions is None:
            positions = self.positions_after(self.num_valid, valid)
        chunk = Chunk(self.seen, positions, valid, adapter.rope(positions), None, not bool(valid.all()))
        h, outputs = adapter.embed(input_ids), []
        for states, windows in zip(self.states, self.windows, strict=True):
            for i, block in enumerate(blocks):
                h, states[i], own = block(h, states[i], windows[i], chunk)
                if own is not None:
                    windows[i] = join_readable(windows[i], own, block.kv_window)
            outputs.append(h)
        self.advance(valid)
        return outputs


# ---------------------------------------------------------------------- command line
