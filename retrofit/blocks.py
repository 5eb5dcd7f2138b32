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
    """

    start: int
    positions: Tensor
    valid: Tensor
    rope: tuple[Tensor, Tensor] | None
    window: int | None
    padded: bool


class KVWindow(NamedTuple):
    """Keys and values of consecutive tokens `[start, start + R)` of one attention block."""

    keys: Tensor  # [B, H_kv, R, D]
    values: Tensor  # [B, H_kv, R, D]
    valid: Tensor  # [B, R] bool
    start: int
    padded: bool = True  # whether `valid` may hold a False (known on the host, so that no mask needs a sync)

    @property
    def length(self) -> int:
        return self.keys.shape[-2]

    def extend(self, other: KVWindow) -> KVWindow:
        """This window followed by `other`, which must start where this one ends."""
        if other.start != self.start + self.length:
            raise ValueError(f"KV windows are not contiguous: {self.start}+{self.length} != {other.start}")
        return KVWindow(
            torch.cat([self.keys, other.keys], dim=-2),
            torch.cat([self.values, other.values], dim=-2),
            torch.cat([self.valid, other.valid], dim=-1),
            self.start,
            self.padded or other.padded,
        )

    def last(self, n: int) -> KVWindow | None:
        """The most recent `n` tokens (all of them if fewer), or `None` for `n <= 0`."""
        if n <= 0:
            return None
        drop = max(self.length - n, 0)
        keys, values = self.keys[..., drop:, :], self.values[..., drop:, :]
        return KVWindow(keys, values, self.valid[:, drop:], self.start + drop, self.padded)

    def detach(self) -> KVWindow:
        return KVWindow(self.keys.detach(), self.values.detach(), self.valid, self.start, self.padded)


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
    """What a model family exposes to the engine."""

    blocks: nn.ModuleList
    default_loop_range: tuple[int, int]

    def embed(self, input_ids: Tensor) -> Tensor: ...

    def head(self, h: Tensor) -> Tensor: ...

    def rope(self, positions: Tensor) -> tuple[Tensor, Tensor] | None: ...
