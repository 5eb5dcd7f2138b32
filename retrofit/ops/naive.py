"""Naive references for the ops in `retrofit.ops`: explicit loops, in the input dtype (tests run them in float64).

They define what the fast kernels compute and share nothing with them except `l2norm`. They are slow (a Python loop
per token, per tap) and meant for tests and for reading.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from retrofit.ops.gated_delta_rule import l2norm


def naive_gated_delta_rule(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    g: Tensor,
    beta: Tensor,
    *,
    initial_state: Tensor | None = None,
    scale: float | None = None,
    use_qk_l2norm: bool = False,
) -> tuple[Tensor, Tensor]:
    """Token-by-token gated delta rule; same arguments and shapes as `retrofit.ops.gated_delta_rule`.

    For each token t and value head: S <- exp(g_t) S; S <- S + k_t (beta_t (v_t - S^T k_t))^T; o_t = S^T (scale q_t).
    Returns (o [B, T, HV, V], final state [B, HV, K, V]), both in q's dtype.
    """
    B, T, H, K = q.shape
    HV, V = v.shape[2], v.shape[3]
    scale = K**-0.5 if scale is None else scale
    if use_qk_l2norm:
        q, k = l2norm(q), l2norm(k)
    # GVA: value head hv reads q/k head hv // (HV // H).
    q = q.repeat_interleave(HV // H, dim=2)
    k = k.repeat_interleave(HV // H, dim=2)
    S = q.new_zeros(B, HV, K, V) if initial_state is None else initial_state.to(q.dtype)
    outputs = []
    for t in range(T):
        S = S * g[:, t].exp()[:, :, None, None]
        k_t = k[:, t]
        error = v[:, t] - torch.einsum("bhkv,bhk->bhv", S, k_t)
        S = S + k_t[:, :, :, None] * (beta[:, t, :, None] * error)[:, :, None, :]
        outputs.append(torch.einsum("bhkv,bhk->bhv", S, scale * q[:, t]))
    return torch.stack(outputs, dim=1), S


def naive_short_conv(
    x: Tensor,
    weight: Tensor,
    bias: Tensor | None = None,
    *,
    initial_state: Tensor | None = None,
    activation: str | None = "silu",
) -> tuple[Tensor, Tensor]:
    """Causal depthwise conv as a loop over time and taps; same arguments as `retrofit.ops.short_conv`.

    The input at time s < 0 is initial_state[..., W + s] (the state holds the last W inputs before x, oldest first),
    and y[t] = act(bias + sum_w weight[:, w] * input[t - (W - 1) + w]). Returns (y [B, T, D], final state [B, D, W]:
    the last W inputs, from the state where x is shorter than W).
    """
    B, T, D = x.shape
    W = weight.shape[1]
    state = x.new_zeros(B, D, W) if initial_state is None else initial_state.to(x.dtype)

    def input_at(s: int) -> Tensor:
        return x[:, s] if s >= 0 else state[:, :, W + s]

    ys = []
    for t in range(T):
        y_t = x.new_zeros(B, D) if bias is None else bias.expand(B, D).clone()
        for w in range(W):
            y_t = y_t + weight[:, w] * input_at(t - (W - 1) + w)
        ys.append(F.silu(y_t) if activation == "silu" else y_t)
    final_state = torch.stack([input_at(T - W + j) for j in range(W)], dim=-1)
    return torch.stack(ys, dim=1), final_state


def naive_gated_rms_norm(x: Tensor, gate: Tensor, weight: Tensor, eps: float = 1e-5) -> Tensor:
    """x / sqrt(mean(x^2) + eps) * weight * silu(gate) over the last dim, in x's dtype."""
    rms = (x.pow(2).sum(-1, keepdim=True) / x.shape[-1] + eps).sqrt()
    return x / rms * weight * gate * torch.sigmoid(gate)
