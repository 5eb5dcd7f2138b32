"""Layers against formulas written out here."""

from __future__ import annotations

import copy

import torch

from retrofit.layers.norm import RMSNorm


def test_rms_norm_matches_qwen2_formula():
    """x / sqrt(mean(x^2) + eps) in (at least) float32, cast back, then times the weight (Qwen2's order)."""
    gen = torch.Generator().manual_seed(0)
    norm = RMSNorm(16, eps=1e-5)
    with torch.no_grad():
        norm.weight.copy_(torch.rand(16, generator=gen) + 0.5)
    x = torch.randn(2, 5, 16, generator=gen, dtype=torch.float64)
    expected = norm.weight.double() * (x / (x.square().mean(-1, keepdim=True) + 1e-5).sqrt())
    torch.testing.assert_close(copy.deepcopy(norm).double()(x), expected, rtol=1e-12, atol=1e-12)

    low = x.to(torch.bfloat16)
    normed = low.float() * torch.rsqrt(low.float().square().mean(-1, keepdim=True) + 1e-5)
    out = norm(low)
    assert out.dtype == torch.float32  # a float32 weight times the bf16 normalised input, as in Qwen2
    torch.testing.assert_close(out, norm.weight * normed.to(torch.bfloat16), rtol=0, atol=0)
