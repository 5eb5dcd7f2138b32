"""Naive reference of `retrofit.ops.dynamic_conv`: an explicit loop over tokens and taps, in the input dtype.

It shares nothing with the fast op and defines what it computes; tests run it in float64.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def naive_dynamic_conv(
    x: Tensor,
    kernels: Tensor,
    *,
    initial_state: Tensor | None = None,
    activation: str | None = None,
) -> tuple[Tensor, Tensor]:
    """Token-by-token dynamic conv, written as Jet-Nemotron's decode step: roll the window, then `sum(window * k_t)`.

    The window starts as `initial_state` (the last W inputs before x, oldest first; zeros if None). For each token t
    the window drops its oldest slot and takes x[t] in the last one, and y[t] = act(sum_w window[..., w] *
    kernels[:, t, :, w]). Returns (y [B, T, D], the final window [B, D, W]).
    """
    B, T, D = x.shape
    W = kernels.shape[-1]
    window = x.new_zeros(B, D, W) if initial_state is None else initial_state.to(x.dtype)
    ys = []
    for t in range(T):
        window = torch.cat([window[..., 1:], x[:, t, :, None]], dim=-1)
        y_t = x.new_zeros(B, D)
        for w in range(W):
            y_t = y_t + window[..., w] * kernels[:, t, :, w]
        ys.append(F.silu(y_t) if activation == "silu" else y_t)
    return torch.stack(ys, dim=1), window
