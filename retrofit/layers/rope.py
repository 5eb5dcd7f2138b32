"""Rotary position embeddings (the Qwen2/Llama `rotate_half` convention)."""

from __future__ import annotations

import torch
from torch import Tensor, nn


class RotaryEmbedding(nn.Module):
    """Maps position ids to `(cos, sin)` tables.

    The inverse frequencies are recomputed per call rather than kept as a buffer: that costs head_dim/2
    floats and keeps the module free of state that meta-device loading would have to restore.
    """

    def __init__(self, head_dim: int, theta: float) -> None:
        super().__init__()
        self.head_dim = head_dim
        self.theta = float(theta)

    def forward(self, positions: Tensor, dtype: torch.dtype = torch.float32) -> tuple[Tensor, Tensor]:
        compute = torch.promote_types(dtype, torch.float32)  # angles in fp32 (as HF), fp64 for fp64 models
        exponent = torch.arange(0, self.head_dim, 2, device=positions.device, dtype=compute) / self.head_dim
        inv_freq = 1.0 / (self.theta**exponent)
        freqs = positions.to(compute)[..., None] * inv_freq
        emb = torch.cat([freqs, freqs], dim=-1)
        return emb.cos().to(dtype), emb.sin().to(dtype)


def apply_rotary(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotate `x` `[B, H, C, D]` by the tables `[B, C, D]`."""
    cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
    x1, x2 = x.chunk(2, dim=-1)
    return (x * cos + torch.cat([-x2, x1], dim=-1) * sin).to(x.dtype)
