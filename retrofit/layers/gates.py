"""The per-head gate projections of a delta-rule mixer (a and b: a handful of outputs per token)."""

from __future__ import annotations

import torch
from torch import Tensor, nn


def gate_projection(linear: nn.Module, x: Tensor) -> Tensor:
    """`linear(x)` for a projection to a few outputs per token, one per head.

    In a compiled step without gradients a plain `nn.Linear` is written as a multiply-and-sum, which inductor fuses
    with the activation after it into one kernel. cuBLAS takes two kernels for each such projection (a dot product,
    then a reduction): 3.5 us at batch 1 and 16 us at batch 16 for Jet-Nemotron-2B's 12 outputs on an H100, twice a
    layer (benchmarks/README.md). Anything else calls `linear`: training, eager code, an adapter such as a LoRA
    layer, and a module with hooks (ZeRO-3 gathering, accelerate's offloading), which the sum would bypass.
    """
    if not (compiled_inference() and is_plain_linear(linear)):
        return linear(x)
    accumulate = torch.promote_types(x.dtype, torch.float32)
    y = (x.unsqueeze(-2).to(accumulate) * linear.weight.to(accumulate)).sum(-1)
    return (y if linear.bias is None else y + linear.bias).to(x.dtype)


def compiled_inference() -> bool:
    """Whether this code is being traced by `torch.compile` without gradients: a compiled decoding step, where a
    projection may be computed otherwise than by calling its module."""
    return torch.compiler.is_compiling() and not torch.is_grad_enabled()


def is_plain_linear(linear: nn.Module) -> bool:
    """An `nn.Linear` itself, with no hooks and its forward not replaced: `F.linear` over its weight and bias
    computes exactly what calling it does."""
    hooked = linear._forward_hooks or linear._forward_pre_hooks or "forward" in vars(linear)
    return type(linear) is nn.Linear and not hooked
