"""Softmax attention over a chunk plus a retained KV window, through torch SDPA."""

from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.attention import SDPBackend, sdpa_kernel

from retrofit.blocks import Chunk, KVRing, KVWindow
from retrofit.layers.packing import project
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

    def input_projections(self) -> tuple[nn.Linear, ...]:
        """The projections of the input, in the order `forward` reads them (`retrofit.layers.packing`)."""
        return self.q_proj, self.k_proj, self.v_proj

    def forward(self, x: Tensor, state: None, kv: KVWindow | None, chunk: Chunk) -> tuple[Tensor, None, KVWindow]:
        batch, length, _ = x.shape
        q, k, v = project(x, self.input_projections())
        q = q.view(batch, length, self.num_heads, self.head_dim).transpose(1, 2)
        k = k.view(batch, length, self.num_kv_heads, self.head_dim).transpose(1, 2)
        v = v.view(batch, length, self.num_kv_heads, self.head_dim).transpose(1, 2)
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
    window = _min_window(window, chunk.window)
    if isinstance(kv, KVRing) and length == 1 and kv.keys is not None:
        held = kv.window()
        out = _one_query(q, [(held, attention_mask(held, chunk, window)), (own, None)])
        kv.write(own)
        return out, own
    if isinstance(kv, KVRing):
        keys = kv.read_with(own)
    elif kv is None:
        keys = own
    else:
        keys = kv.extend(own)
    plain_causal = kv is None and not chunk.padded and (window is None or window >= length)
    # Decoding: one query, the newest token, that may see every key (no padding, all within the window).
    sees_all = length == 1 and not keys.padded and (window is None or window >= keys.length)
    keys_, values = keys.keys, keys.values
    grouped = num_heads != num_kv_heads
    mask = None
    if not (plain_causal or sees_all):
        mask = attention_mask(keys, chunk, window)
        if length == 1:
            return _one_query(q, [(keys, mask)]), own
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


def _one_query(q: Tensor, parts: list[tuple[KVWindow, Tensor | None]]) -> Tensor:
    """Attention of one query per head `[B, H, 1, D]` (a decoded token) over the keys of `parts`, each a window of
    grouped KV heads `[B, H_kv, R, D]` with its mask `[B, 1, 1, R]` (None: all visible), as if they were one window.

    Written out (scores in the input dtype, softmax in float32, as transformers' eager attention) rather than through
    SDPA: the query heads that share a KV head are that head's queries, so every window is read once and none is
    copied. SDPA has no fused kernel for a masked single query that reads a long window fast: it takes the math
    kernel under `enable_gqa` (a float32 copy of the window per query head) and otherwise the memory-efficient one,
    whose B x H_kv blocks each walk all R keys alone (60-130 us per layer at batch 1 on an H100, benchmarks/README.md).
    Taking the retained window and the token's own keys as two parts spares the copy that joining them would make.
    """
    batch, num_heads, _, head_dim = q.shape
    num_kv_heads = parts[0][0].keys.shape[1]
    grouped = q.reshape(batch, num_kv_heads, num_heads // num_kv_heads, head_dim)
    score_dtype = torch.promote_types(q.dtype, torch.float32)
    scores = []
    for window, mask in parts:
        part = (grouped @ window.keys.transpose(-1, -2)).to(score_dtype) * head_dim**-0.5
        scores.append(part if mask is None else part.masked_fill(~mask, float("-inf")))
    weights = torch.cat(scores, dim=-1).softmax(-1).to(q.dtype).split([w.length for w, _ in parts], dim=-1)
    # Each part's weights contiguous: a view into the joined rows starts them at an odd offset, and cuBLAS's fast
    # kernels need 16-byte aligned rows (KVRing's storage is a multiple of 8 slots for the same reason).
    out = sum(w.contiguous() @ window.values for w, (window, _) in zip(weights, parts, strict=True))
    return out.reshape(batch, num_heads, 1, -1)
