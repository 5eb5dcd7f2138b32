"""Dynamic (token-dependent) causal depthwise convolution: the value convolution of Jet-Nemotron's JetBlock.

Each token t brings its own kernel `kernels[:, t]` `[D, W]`, and the output is
`y[t] = act(sum_w kernels[:, t, :, w] * x[t - (W - 1) + w])`: tap `W - 1` reads the current token, tap 0 the oldest.
This is the alignment of Jet-Nemotron's `DynamicShortConvolution` (left-padded `unfold` over time in its torch path;
its decode step rolls a `[B, D, W]` cache left, writes the new token in the last slot and sums `cache * kernel`).

The state follows `retrofit.ops.short_conv`'s convention: `[B, D, W]`, the last W inputs before x, oldest first
(only the last W - 1 reach the next output). Chaining calls through the state gives the result of one call over the
concatenated sequence.

Torch only: the upstream Triton kernels are not part of fla, and this op is a handful of element-wise products
(W of them, vectorised over batch, time and channels), which is memory-bound either way.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from retrofit.ops.padding import last_real_inputs, put_time, real_tokens_first, take_time

_ACTIVATIONS = (None, "silu")


def dynamic_conv(
    x: Tensor,
    kernels: Tensor,
    *,
    initial_state: Tensor | None = None,
    output_final_state: bool = False,
    activation: str | None = None,
    valid: Tensor | None = None,
) -> tuple[Tensor, Tensor | None]:
    """Causal depthwise conv with a per-token kernel.

    Args:
        x: [B, T, D], the inputs.
        kernels: [B, T, D, W], the kernel of each token; `kernels[..., W - 1]` multiplies the token itself.
        initial_state: [B, D, W], the last W inputs before x (zeros if None); it receives a gradient.
        output_final_state: also return the last W inputs of cat(state, x) in time (right also when T < W).
        activation: None (the plain convolution) or "silu".
        valid: [B, T] bool, False on padding: padded positions are skipped exactly (`retrofit.ops.padding`);
            their outputs are meaningless and the final state holds the last W real inputs.

    Returns:
        y [B, T, D] in x's dtype (the sum accumulated in float32, float64 for float64 inputs, and cast before the
        activation), and the final state
        [B, D, W] in x's dtype, or None.
    """
    if activation not in _ACTIVATIONS:
        raise ValueError(f"activation must be 'silu' or None, got {activation!r}.")
    if x.dim() != 3 or kernels.dim() != 4 or kernels.shape[:3] != x.shape:
        raise ValueError(
            f"x must be [B, T, D] and kernels [B, T, D, W]; got {tuple(x.shape)} and {tuple(kernels.shape)}."
        )
    B, _, D = x.shape
    W = kernels.shape[-1]
    if initial_state is not None and initial_state.shape != (B, D, W):
        raise ValueError(f"initial_state must be [B, D, W]={(B, D, W)}, got {tuple(initial_state.shape)}.")
    state = x.new_zeros(B, D, W) if initial_state is None else initial_state.to(x.dtype)
    if valid is not None:
        order = real_tokens_first(valid)
        packed = take_time(x, order)
        y, _ = dynamic_conv(packed, take_time(kernels, order), initial_state=state, activation=activation)
        return put_time(y, order), last_real_inputs(state, packed, valid) if output_final_state else None
    # Time-major history: the state's last W - 1 inputs, then x. Tap w of token t reads history[:, t + w].
    history = torch.cat([state[..., 1:].transpose(1, 2), x], dim=1)  # [B, T + W - 1, D]
    windows = history.unfold(1, W, 1)  # [B, T, D, W] view: windows[:, t, :, w] = history[:, t + w]
    compute = torch.promote_types(x.dtype, torch.float32)
    y = (kernels.to(compute) * windows.to(compute)).sum(-1).to(x.dtype)  # one product and one reduction, not W
    if activation == "silu":
        y = F.silu(y)  # after the cast, in x's dtype, as Jet-Nemotron's published code orders it
    final_state = torch.cat([state, x.transpose(1, 2)], dim=-1)[..., -W:] if output_final_state else None
    return y, final_state
