"""Run a causal convolution as if padded positions were absent.

Padding must never change a fast state (DESIGN.md, semantics 8). For the recurrent state a padded position is
an exact no-op (`g = 0`, `beta = 0`), but a causal conv shifts every position it sees into its window: a zero
input at a pad pushes real history out. Zeroing pads is exact only where the window is still empty (left
padding at the very start); a sleep replays its chunk, padding included, on top of a live window. So the convs
pack each row's real tokens to the front, convolve there from the incoming state, put the outputs back, and
take the final state from the last W real inputs. Any padding pattern is then invisible.
"""

from __future__ import annotations

import torch
from torch import Tensor


def real_tokens_first(valid: Tensor) -> Tensor:
    """Per row, the time indices of real tokens (in order) and then of padding: `[B, T]`."""
    return torch.argsort((~valid).to(torch.uint8), dim=1, stable=True)


def take_time(x: Tensor, order: Tensor) -> Tensor:
    """`x[b, order[b, i]]` along dim 1, for `x` of shape `[B, T, ...]`."""
    index = order.view(*order.shape, *([1] * (x.dim() - 2))).expand_as(x)
    return x.gather(1, index)


def put_time(packed: Tensor, order: Tensor) -> Tensor:
    """The inverse of `take_time`: position `order[b, i]` receives `packed[b, i]`."""
    index = order.view(*order.shape, *([1] * (packed.dim() - 2))).expand_as(packed)
    return torch.zeros_like(packed).scatter(1, index, packed)


def last_real_inputs(state: Tensor, packed: Tensor, valid: Tensor) -> Tensor:
    """The last W inputs of each row's stream `state` + real tokens, as `[B, D, W]` (`state` is `[B, D, W]`)."""
    width = state.shape[-1]
    stream = torch.cat([state.transpose(1, 2), packed], dim=1)  # [B, W + T, D]
    ends = valid.sum(dim=1, keepdim=True) + torch.arange(width, device=valid.device)  # window ending at the last
    return stream.gather(1, ends[..., None].expand(-1, -1, stream.shape[-1])).transpose(1, 2)
