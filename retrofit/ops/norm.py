"""Gated RMSNorm: the per-head output norm of gated delta-rule mixers, RMSNorm(x) * weight * silu(gate).

On CUDA it runs fla's fused Triton `rms_norm_gated`; elsewhere plain torch. Both compute in float32.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from retrofit.ops.gated_delta_rule import select_fla_module

_FLA_NORM_MODULE = "fla.modules.norm.fused_norm_gate"


def gated_rms_norm(x: Tensor, gate: Tensor, weight: Tensor, eps: float = 1e-5) -> Tensor:
    """y = x * rsqrt(mean(x^2, -1) + eps) * weight * silu(gate), computed in float32 and returned in x's dtype.

    Args:
        x, gate: [..., D] of the same shape. weight: [D]. eps: added to the mean square.
    """
    if gate.shape != x.shape or weight.shape != x.shape[-1:]:
        raise ValueError(
            f"x and gate must have the same shape [..., D] and weight [D]; "
            f"got {tuple(x.shape)}, {tuple(gate.shape)} and {tuple(weight.shape)}."
        )
    fla = select_fla_module(x, _FLA_NORM_MODULE)
    if fla is not None:
        # fla flattens the leading dims itself and returns x's shape and dtype.
        return fla.rms_norm_gated(x, gate, weight, None, activation="swish", eps=eps)
    return _gated_rms_norm_torch(x, gate, weight, eps)


def _gated_rms_norm_torch(x: Tensor, gate: Tensor, weight: Tensor, eps: float) -> Tensor:
    """`gated_rms_norm` in torch, in float32 (float64 for float64 inputs)."""
    dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
    xf = x.to(dtype)
    y = xf * torch.rsqrt(xf.square().mean(-1, keepdim=True) + eps) * weight.to(dtype) * F.silu(gate.to(dtype))
    return y.to(x.dtype)
