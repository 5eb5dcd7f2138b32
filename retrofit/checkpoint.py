"""Per-pass activation checkpointing whose saved inputs wait in host memory.

A sleep of N passes over C chunks has N·C pass boundaries (the features h and the fast states entering each
pass). Plain checkpointing keeps all of them on the GPU, so memory still grows with N. Here each pass saves only
its inputs, through `save_for_backward` under `torch.autograd.graph.save_on_cpu`: on CUDA they are copied to
pinned host memory and brought back when backward reaches that pass, which recomputes it. GPU memory is then one
pass's activations, whatever N and the number of chunks.

Recomputation follows the reentrant scheme (as `torch.utils.checkpoint` with `use_reentrant=True`): backward
re-runs the pass under autograd and calls `torch.autograd.backward` on it, so parameter gradients accumulate as
usual. Use it with `loss.backward()`, not `torch.autograd.grad`.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor
from torch.utils._pytree import tree_flatten, tree_unflatten

from retrofit.ops import training_kernels


def checkpoint_offloaded(fn: Callable[..., Any], *args: Any) -> Any:
    """`fn(*args)`, recomputed in backward; its tensor inputs wait on the host (CUDA) meanwhile.

    `args` and the result may be nested lists, tuples and NamedTuples of tensors and plain values.
    """
    leaves, spec = tree_flatten(args)
    positions = [i for i, leaf in enumerate(leaves) if isinstance(leaf, Tensor)]
    tensors = [leaves[i] for i in positions]
    # The backward keeps the non-tensor leaves only: a reference to an input tensor would pin it on the GPU.
    plain_leaves = _fill(leaves, positions, [None] * len(positions))
    result: dict[str, Any] = {}
    offload = any(t.is_cuda for t in tensors)
    with torch.autograd.graph.save_on_cpu(pin_memory=True) if offload else contextlib.nullcontext():
        outputs = _RecomputedPass.apply(fn, spec, plain_leaves, positions, result, *tensors)
    out_leaves = list(result["leaves"])
    for i, tensor in zip(result["positions"], outputs, strict=True):
        out_leaves[i] = tensor
    return tree_unflatten(out_leaves, result["spec"])


def _fill(
    leaves: list[Any], positions: list[int], tensors: tuple[Tensor | None, ...] | list[Tensor | None]
) -> list[Any]:
    filled = list(leaves)
    for i, tensor in zip(positions, tensors, strict=True):
        filled[i] = tensor
    return filled


class _AutocastState:
    """The autocast settings of the forward, re-entered when backward recomputes."""

    def __init__(self) -> None:
        self.settings = [
            (device, torch.get_autocast_dtype(device))
            for device in ("cuda", "cpu")
            if torch.is_autocast_enabled(device)
        ]

    def __enter__(self) -> None:
        self.stack = contextlib.ExitStack()
        for device, dtype in self.settings:
            self.stack.enter_context(torch.autocast(device, dtype=dtype))

    def __exit__(self, *exc: object) -> None:
        self.stack.close()


class _RecomputedPass(torch.autograd.Function):
    @staticmethod
    def forward(ctx, fn, spec, leaves, positions, result, *tensors):
        ctx.fn, ctx.spec, ctx.leaves, ctx.positions = fn, spec, leaves, positions
        ctx.autocast = _AutocastState()
        ctx.save_for_backward(*tensors)
        with torch.no_grad(), training_kernels():  # the kernels backward's recompute will differentiate
            out = fn(*tree_unflatten(_fill(leaves, positions, tensors), spec))
        out_leaves, out_spec = tree_flatten(out)
        out_positions = [i for i, leaf in enumerate(out_leaves) if isinstance(leaf, Tensor)]
        result.update(leaves=out_leaves, spec=out_spec, positions=out_positions)
        ctx.out_positions = out_positions
        outputs = tuple(out_leaves[i] for i in out_positions)
        ctx.mark_non_differentiable(*(t for t in outputs if not t.is_floating_point()))
        return outputs

    @staticmethod
    def backward(ctx, *grads):
        needs_grad = ctx.needs_input_grad[5:]
        inputs = [t.detach().requires_grad_(need) for t, need in zip(ctx.saved_tensors, needs_grad, strict=True)]
        with torch.enable_grad(), ctx.autocast:
            out = ctx.fn(*tree_unflatten(_fill(ctx.leaves, ctx.positions, inputs), ctx.spec))
        out_leaves, _ = tree_flatten(out)
        pairs = [
            (out_leaves[i], g)
            for i, g in zip(ctx.out_positions, grads, strict=True)
            if g is not None and out_leaves[i].requires_grad
        ]
        if pairs:
            torch.autograd.backward([o for o, _ in pairs], [g for _, g in pairs])
        return (
            None,
            None,
            None,
            None,
            None,
            *(t.grad if need else None for t, need in zip(inputs, needs_grad, strict=True)),
        )
