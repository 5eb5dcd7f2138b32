"""Softmax attention over a chunk plus a retained KV window, through torch SDPA."""

from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.attention import SDPBackend, sdpa_kernel

from retrofit.blocks import Chunk, KVRing, KVWindow
from retrofit.layers.rope import apply_rotary


def attention_mask(keys: KVWindow, chunk: Chunk, window: int | None) -> Tensor:
    """Boolean mask `[B, 1, C, R]`: causal, within `window` tokens, never onto padding.

    Every query may attend to itself, so padded queries get a finite (ignored) output instead of NaN.
    """
    device = chunk.valid.device
    query_index = (
        chunk.index if chunk.index is not None else chunk.start + torch.arange(chunk.valid.shape[1], device=device)
    )
    key_index = keys.indices()
    distance = query_index[:, None] - key_index[None, :]
    allowed = distance >= 0
    if window is not None:
        allowed = allowed & (distance < window)
    allowed = (allowed[None] & keys.valid[:, None, :]) | (distance == 0)[None]
    return allowed[:, None]


# SDPA backends for a decoded token. cuDNN's attention is left out: it builds an execution plan per shape, which
# took ~10 ms of host time per call on an H100 (torch 2.11, benchmarks/README.md, item d), and a decoded token's key
# count grows by one every step, so no plan is ever reused; the rest need no plan.
DECODE_BACKENDS = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]


def _min_window(*windows: int | None) -> int | None:
    present = [w for w in windows if w is not None]
    return min(present) if present else None


class Attention(nn.Module):
    """Multi-head (grouped-query) attention with RoPE; `window` makes it a sliding-window layer.

    Keys and values of earlier tokens arrive as a `KVWindow`; the chunk's own keys and values are
    returned so the engine can retain them (sliding eviction) or drop them (hard eviction).
    """

    def __init__(
        self,
        hidden_size: int,
        num_heads: int,
        num_kv_heads: int,
        head_dim: int,
        *,
        qkv_bias: bool = False,
        window: int | None = None,
    ) -> None:
        super().__init__()
        self.num_heads, self.num_kv_heads, self.head_dim = num_heads, num_kv_heads, head_dim
        self.window = window
        self.kind = "sliding" if window is not None else "attention"
        self.q_proj = nn.Linear(hidden_size, num_heads * head_dim, bias=qkv_bias)
        self.k_proj = nn.Linear(hidden_size, num_kv_heads * head_dim, bias=qkv_bias)
        self.v_proj = nn.Linear(hidden_size, num_kv_heads * head_dim, bias=qkv_bias)
        self.o_proj = nn.Linear(num_heads * head_dim, hidden_size, bias=False)

    def forward(self, x: Tensor, state: None, kv: KVWindow | None, chunk: Chunk) -> tuple[Tensor, None, KVWindow]:
        batch, length, _ = x.shape
        q = self.q_proj(x).view(batch, length, self.num_heads, self.head_dim).transpose(1, 2)
        k = self.k_proj(x).view(batch, length, self.num_kv_heads, self.head_dim).transpose(1, 2)
        v = self.v_proj(x).view(batch, length, self.num_kv_heads, self.head_dim).transpose(1, 2)
        cos, sin = chunk.rope
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        out, own = attend(q, k, v, kv, chunk, self.window)
        return self.o_proj(out.transpose(1, 2).reshape(batch, length, -1)), None, own


def attend(
    q: Tensor, k: Tensor, v: Tensor, kv: KVWindow | KVRing | None, chunk: Chunk, window: int | None
) -> tuple[Tensor, KVWindow]:
    """Softmax attention of a chunk's queries `[B, H, C, D]` over the retained window `kv` plus the chunk's own keys
    and values `[B, H_kv, C, D]` (RoPE applied): causal, within `window` (and the eviction's), never onto padding.
    A `KVRing` (streaming inference) is read with the chunk's keys, and keeps them.

    Returns the output `[B, H, C, D]` and the chunk's own keys and values, for the engine to retain or drop.
    """
    length, num_heads, num_kv_heads = q.shape[2], q.shape[1], k.shape[1]
    own = KVWindow(k, v, chunk.valid, chunk.start, chunk.padded, chunk.index)
    if isinstance(kv, KVRing):
        keys = kv.read_with(own)
    elif kv is None:
        keys = own
    else:
        keys = kv.extend(own)
    window = _min_window(window, chunk.window)
    plain_causal = kv is None and not chunk.padded and (window is None or window >= length)
    # Decoding: one query, the newest token, that may see every key (no padding, all within the window).
    sees_all = length == 1 and not keys.padded and (window is None or window >= keys.length)
    keys_, values = keys.keys, keys.values
    grouped = num_heads != num_kv_heads
    mask = None
    if not (plain_causal or sees_all):
        mask = attention_mask(keys, chunk, window)
        if grouped and length == 1:
            return _grouped_query(q, keys_, values, mask), own
        if grouped:
            # SDPA's memory-efficient kernel takes a mask but not `enable_gqa`; with both, torch falls back
            # to the math kernel, which materialises [B, H, C, R] scores (slow, and 24 GiB at C = R = 32K).
            # Repeating the KV heads keeps masked attention (sliding windows, retained KV) on a fused kernel.
            repeats = num_heads // num_kv_heads
            keys_, values = keys_.repeat_interleave(repeats, 1), values.repeat_interleave(repeats, 1)
            grouped = False
    with sdpa_kernel(DECODE_BACKENDS) if length == 1 else contextlib.nullcontext():
        out = F.scaled_dot_product_attention(
            q, keys_, values, attn_mask=mask, is_causal=plain_causal, enable_gqa=grouped
        )
    return out, own


def _grouped_query(q: Tensor, keys: Tensor, values: Tensor, mask: Tensor) -> Tensor:
    """Masked attention of one query per head `[B, H, 1, D]` (a decoded token) over grouped KV heads `[B, H_kv, R, D]`.

    The query heads that share a KV head become that head's queries, `[B, H_kv, H / H_kv, D]`, all under the same
    key mask: plain multi-head attention, which SDPA's memory-efficient kernel takes with a mask. Asked for
    `enable_gqa` with a mask, torch runs its math kernel instead, which copies the KV window per query head and
    computes in float32 (0.8 ms per token at batch 16 in a compiled Jet-Nemotron-2B step; benchmarks/README.md).
    """
    batch, num_heads, _, head_dim = q.shape
    num_kv_heads = keys.shape[1]
    with sdpa_kernel(DECODE_BACKENDS):
        out = F.scaled_dot_product_attention(
            q.reshape(batch, num_kv_heads, num_heads // num_kv_heads, head_dim), keys, values, attn_mask=mask
        )
    return out.reshape(batch, num_heads, 1, head_dim)
