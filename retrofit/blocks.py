"""The interface between the sleep engine and a model family.

A model family exposes a `SleepAdapter`: an embedding, a head, and an ordered list of blocks. A block runs
`h, state, kv_out = block(h, state, kv, chunk)` on one chunk:

* `state` is the block's fast state (a `LinearState` for linear blocks, `None` for attention blocks);
* `kv` is the attention window retained from earlier tokens (a `KVWindow`, or `None`);
* `kv_out` is the chunk's own keys and values (attention blocks), which the engine may retain; a block's
  `kv_window` bounds how many of the latest it can ever read again.

The engine (`retrofit.engine`) owns everything about chunks, passes, eviction and gradients; blocks only
compute.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, NamedTuple, Protocol

import torch
from torch import Tensor, nn

BlockKind = Literal["attention", "sliding", "linear"]


@dataclass(frozen=True)
class Chunk:
    """What every block needs to know about the chunk it runs on.

    Attributes:
        start: index of the chunk's first token in the (padded) sequence; sliding-window masks count
            distances in these indices.
        positions: `[B, C]` RoPE position ids.
        valid: `[B, C]` bool, False on padding. Padding must leave states and KV untouched.
        rope: `(cos, sin)`, each `[B, C, head_dim]`, computed once per chunk by the adapter.
        window: the sliding window imposed by `sliding` eviction (L), or `None` under hard eviction.
        padded: whether any position of `valid` is False (decided once per chunk, not per block).
        index: `[C]` stream indices of the tokens as a tensor, which then replace `start` in masks: a decoding step
            whose index lives on the device can be captured once and replayed at every position.
    """

    start: int
    positions: Tensor
    valid: Tensor
    rope: tuple[Tensor, Tensor] | None
    window: int | None
    padded: bool
    index: Tensor | None = None


class KVWindow(NamedTuple):
    """Keys and values of consecutive tokens `[start, start + R)` of one attention block, or, with `index`, of the
    tokens at those stream indices (a `KVRing`'s slots, in any order)."""

    keys: Tensor  # [B, H_kv, R, D]
    values: Tensor  # [B, H_kv, R, D]
    valid: Tensor  # [B, R] bool
    start: int
    padded: bool = True  # whether `valid` may hold a False (known on the host, so that no mask needs a sync)
    index: Tensor | None = None  # [R] stream index of each token; replaces `start` in masks

    @property
    def length(self) -> int:
        return self.keys.shape[-2]

    def indices(self) -> Tensor:
        """`[R]` stream index of each token."""
        if self.index is not None:
            return self.index
        return torch.arange(self.start, self.start + self.length, device=self.keys.device)

    def extend(self, other: KVWindow) -> KVWindow:
        """This window followed by `other`, which must start where this one ends (unless either carries `index`)."""
        indexed = self.index is not None or other.index is not None
        if not indexed and other.start != self.start + self.length:
            raise ValueError(f"KV windows are not contiguous: {self.start}+{self.length} != {other.start}")
        return KVWindow(
            torch.cat([self.keys, other.keys], dim=-2),
            torch.cat([self.values, other.values], dim=-2),
            torch.cat([self.valid, other.valid], dim=-1),
            self.start,
            self.padded or other.padded,
            torch.cat([self.indices(), other.indices()]) if indexed else None,
        )

    def last(self, n: int) -> KVWindow | None:
        """The most recent `n` tokens (all of them if fewer), or `None` for `n <= 0`."""
        if n <= 0:
            return None
        drop = max(self.length - n, 0)
        keys, values = self.keys[..., drop:, :], self.values[..., drop:, :]
        index = None if self.index is None else self.index[drop:]
        return KVWindow(keys, values, self.valid[:, drop:], self.start + drop, self.padded, index)

    def detach(self) -> KVWindow:
        return KVWindow(self.keys.detach(), self.values.detach(), self.valid, self.start, self.padded, self.index)


# The stream index of a slot that holds no token: no query is ever at distance 0 from it.
NO_TOKEN = -(2**62)
SLOT_ALIGNMENT = 8  # KVRing storage slots: a multiple of 8, so that 16-bit rows of one weight per slot span 16 bytes


class KVRing:
    """A fixed KV buffer of one attention block for streaming inference: the token at stream index `s` lives in slot
    `s % capacity`, so memory never grows and every decoding step has the same shapes.

    A query reads the ring (earlier tokens) and its own chunk's keys, then its keys are written over the oldest
    slots. `capacity` is the most earlier tokens a query may read: `min(L, window) - 1`, since a chunk's query sees
    at most L - 1 earlier tokens (the chunk so far, or the retained window under sliding eviction) and a
    sliding-window layer its window - 1. Storage is allocated on the first write, with room for a multiple of
    `SLOT_ALIGNMENT` slots; the ones past `capacity` stay empty. A decoded token's attention weights over the ring
    then have rows that start on 16 bytes, which cuBLAS's fast matrix-vector kernels need: over an odd 1,999-slot
    ring it fell back to a kernel that took 32 us per layer at batch 1 on an H100, against 5 us over 2,000 slots
    (benchmarks/README.md).
    """

    def __init__(self, capacity: int) -> None:
        if capacity < 1:
            raise ValueError(f"a KV ring holds at least one token, not {capacity}")
        self.capacity = capacity
        self.keys: Tensor | None = None  # [B, H_kv, capacity, D]
        self.values: Tensor | None = None
        self.valid: Tensor | None = None  # [B, capacity] bool
        self.index: Tensor | None = None  # [capacity] stream index per slot, NO_TOKEN when empty

    def read_with(self, own: KVWindow) -> KVWindow:
        """The earlier tokens held here followed by `own` (the keys a chunk's queries read); then `own` is kept."""
        keys = own if self.keys is None else self.window().extend(own)
        self.write(own)
        return keys

    def write(self, window: KVWindow) -> None:
        """Keep the latest `capacity` tokens of `window` in their slots."""
        window = window.last(self.capacity)
        index = window.indices()
        if self.keys is None:
            self._allocate(window)
        slots = index % self.capacity
        # Indexed assignment (`index_put_`), which inductor updates in place inside a compiled decoding step, where it
        # rewrote the whole buffer for `index_copy_` (twice per token).
        self.keys[:, :, slots] = window.keys
        self.values[:, :, slots] = window.values
        self.valid[:, slots] = window.valid
        self.index[slots] = index

    def _allocate(self, like: KVWindow) -> None:
        batch, heads, _, dim = like.keys.shape
        device = like.keys.device
        slots = -(-self.capacity // SLOT_ALIGNMENT) * SLOT_ALIGNMENT
        with torch.inference_mode(False):  # storage that later steps update in place, in or out of inference mode
            self.keys = like.keys.new_zeros(batch, heads, slots, dim)
            self.values = like.values.new_zeros(batch, heads, slots, like.values.shape[-1])
            self.valid = torch.zeros(batch, slots, dtype=torch.bool, device=device)
            self.index = torch.full((slots,), NO_TOKEN, dtype=torch.long, device=device)

    def window(self) -> KVWindow:
        """The buffer as a `KVWindow` with per-slot stream indices (empty slots are invalid)."""
        return KVWindow(self.keys, self.values, self.valid, 0, True, self.index)

    def clear(self) -> None:
        """Forget every token (eviction); storage is kept."""
        if self.valid is not None:
            self.valid.zero_()
            self.index.fill_(NO_TOKEN)

    def held(self, since: int) -> tuple[int, int]:
        """(tokens held before stream index `since`, tokens held from it on), counted on the batch's first row."""
        if self.valid is None:
            return 0, 0
        present = self.valid[0]  # a slot is valid only once written, and until cleared
        later = present & (self.index >= since)
        return int((present & ~later).sum()), int(later.sum())


def join_readable(
    first: KVWindow | None, second: KVWindow | None, kv_window: int | None, keep: int | None = None
) -> KVWindow | None:
    """`first` followed by `second`, cut to what a later query of a block with `kv_window` can still read: the last
    `kv_window - 1` tokens (all for None), and at most `keep`. When `second` alone holds that many, `first` is left
    out: it may end before a `second` that was cut the same way."""
    limits = [n for n in (keep, None if kv_window is None else kv_window - 1) if n is not None]
    limit = min(limits) if limits else None
    if limit is not None and second is not None and second.length >= limit:
        return second.last(limit)
    joined = join_windows(first, second)
    return joined if joined is None or limit is None else joined.last(limit)


def join_windows(first: KVWindow | None, second: KVWindow | None) -> KVWindow | None:
    """`first` followed by `second`, where either may be absent."""
    if first is None:
        return second
    if second is None:
        return first
    return first.extend(second)


class LinearState(NamedTuple):
    """Fast state of a linear-attention block: the recurrent matrix and its short-conv windows."""

    recurrent: Tensor  # [B, H, K, V] float32
    conv: tuple[Tensor, ...]  # each [B, D, W]: the last W inputs of a causal conv

    def detach(self) -> LinearState:
        return LinearState(self.recurrent.detach(), tuple(c.detach() for c in self.conv))


BlockState = LinearState | None


class SleepBlock(Protocol):
    """One residual block of a model, as the engine sees it."""

    kind: BlockKind
    # How far back a query reads (a sliding-window layer's window: the query and the `kv_window - 1` tokens before
    # it), or None (all retained tokens). Keys older than that are never read again, so caches drop them.
    kv_window: int | None

    def __call__(
        self, h: Tensor, state: BlockState, kv: KVWindow | None, chunk: Chunk
    ) -> tuple[Tensor, BlockState, KVWindow | None]: ...


class SleepAdapter(Protocol):
    """What a model family exposes to the engine. It may also offer `head_parts()`: the head as (what comes before
    its output projection, that projection), which lets a fused loss kernel serve the head
    (`retrofit.ops.cross_entropy`)."""

    blocks: nn.ModuleList
    default_loop_range: tuple[int, int]

    def embed(self, input_ids: Tensor) -> Tensor: ...

    def head(self, h: Tensor) -> Tensor: ...

    def rope(self, positions: Tensor) -> tuple[Tensor, Tensor] | None: ...
