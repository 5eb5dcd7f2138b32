"""Normalisation modules."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from retrofit.ops import gated_rms_norm


class RMSNorm(nn.Module):
    """RMSNorm computed in (at least) float32 and returned in the input dtype.

    Families differ in where the weight multiplies, which shows in bf16: Qwen2's order (the hybrid, Ouro) casts the
    normed input back first and multiplies in the input dtype; with `weight_in_float32` (Jet-Nemotron's published
    order) the weight multiplies in float32 and the product is cast.
    """

    def __init__(self, hidden_size: int, eps: float = 1e-6, *, weight_in_float32: bool = False) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.eps = eps
        self.weight_in_float32 = weight_in_float32

    def forward(self, x: Tensor) -> Tensor:
        dtype = x.dtype
        x = x.to(torch.promote_types(dtype, torch.float32))  # fp32 under bf16, fp64 in exact tests
        # x * rsqrt(mean(x^2) + eps), one fused kernel on CUDA (aten::_fused_rms_norm) instead of five.
        normed = F.rms_norm(x, x.shape[-1:], eps=self.eps)
        if self.weight_in_float32:
            return (self.weight * normed).to(dtype)
        return self.weight * normed.to(dtype)


class GatedRMSNorm(nn.Module):
    """Per-head RMSNorm times swish(gate): the output norm of gated delta-rule mixers (`o_norm`)."""

    def __init__(self, hidden_size: int, eps: float = 1e-5) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.eps = eps

    def forward(self, x: Tensor, gate: Tensor) -> Tensor:
        return gated_rms_norm(x, gate, self.weight, self.eps)
