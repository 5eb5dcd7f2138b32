"""Short causal depthwise convolution (the q/k/v conv of gated delta-rule mixers), with a carried state.

On CUDA it runs fla's Triton `causal_conv1d`; elsewhere a torch sum of shifted products. Both use fla's state
convention: the state [B, D, W] holds the last W inputs before x, oldest first (only the last W - 1 reach the output).

The final state is always built here, in torch (a copy of W inputs): fla's kernel drops the gradient of the oldest
slot of its final state when T >= W (that slot is never read by the next conv, but it is a real output).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from retrofit.ops.gated_delta_rule import select_fla_module
from retrofit.ops.padding import last_real_inputs, put_time, real_tokens_first, take_time

_FLA_CONV_MODULE = "fla.modules.causal_conv1d"
_ACTIVATIONS = (None, "silu")


def short_conv(
    x: Tensor,
    weight: Tensor,
    bias: Tensor | None = None,
    *,
    initial_state: Tensor | None = None,
    output_final_state: bool = False,
    activation: str | None = "silu",
    valid: Tensor | None = None,
) -> tuple[Tensor, Tensor | None]:
    """Causal depthwise conv: y[t] = act(bias + sum_w weight[:, w] * xx[t + w]), xx = cat(state[..., 1:], x) in time.

    Args:
        x: [B, T, D]. weight: [D, W]. bias: [D] or None. activation: "silu" or None.
        initial_state: [B, D, W], the last W inputs before x (zeros if None); it receives a gradient.
        output_final_state: also return the last W inputs of cat(state, x) as [B, D, W] (also right when T < W),
            which is the state for the next call.
        valid: [B, T] bool, False on padding: padded positions are skipped exactly (`retrofit.ops.padding`);
            their outputs are meaningless and the final state holds the last W real inputs.

    Returns:
        y [B, T, D] in x's dtype, and the final state [B, D, W] in x's dtype or None.
    """
    if activation not in _ACTIVATIONS:
        raise ValueError(f"activation must be 'silu' or None, got {activation!r}.")
    if x.dim() != 3 or weight.dim() != 2 or weight.shape[0] != x.shape[-1]:
        raise ValueError(f"x must be [B, T, D] and weight [D, W]; got {tuple(x.shape)} and {tuple(weight.shape)}.")
    B, _, D = x.shape
    W = weight.shape[1]
    if bias is not None and bias.shape != (D,):
        raise ValueError(f"bias must be [D]={(D,)}, got {tuple(bias.shape)}.")
    if initial_state is not None and initial_state.shape != (B, D, W):
        raise ValueError(f"initial_state must be [B, D, W]={(B, D, W)}, got {tuple(initial_state.shape)}.")
    state = x.new_zeros(B, D, W) if initial_state is None else initial_state.to(x.dtype)
    order = real_tokens_first(valid) if valid is not None else None
    if order is not None:
        x = take_time(x, order)
    fla = select_fla_module(x, _FLA_CONV_MODULE)
    if fla is None:
        y = _short_conv_torch(x, weight, bias, state, activation)
    else:
        y, _ = fla.causal_conv1d(x=x, weight=weight, bias=bias, initial_state=initial_state, activation=activation)
    if order is not None:
        return put_time(y, order), last_real_inputs(state, x, valid) if output_final_state else None
    final_state = torch.cat([state, x[:, -W:].transpose(1, 2)], dim=-1)[..., -W:] if output_final_state else None
    return y, final_state


def _short_conv_torch(x: Tensor, weight: Tensor, bias: Tensor | None, state: Tensor, activation: str | None) -> Tensor:
    """`short_conv`'s output over the state's last W - 1 inputs followed by x, as a sum of W shifted products:
    element-wise work that a compiler fuses with its neighbours (a decoding step is one fused kernel, not a
    convolution call). Computed in float32 (float64 for float64 inputs) and returned in x's dtype."""
    dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
    length, taps = x.shape[1], weight.shape[1]
    xx = torch.cat([state[..., 1:], x.transpose(1, 2)], dim=-1).to(dtype)  # [B, D, W - 1 + T]
    weight = weight.to(dtype)
    y = sum(weight[:, w, None] * xx[..., w : w + length] for w in range(taps))
    if bias is not None:
        y = y + bias.to(dtype)[:, None]
    if activation == "silu":
        y = F.silu(y)
    return y.transpose(1, 2).to(x.dtype)
