"""Per-pass activation checkpointing whose saved inputs wait in host memory.

A sleep of N passes over C chunks has N·C pass boundaries (the features h and the fast states entering each
pass). Plain checkpointing keeps all of them on the GPU, so memory still grows with N. Here each pass keeps only
its inputs, and on CUDA they go to pinned host memory (`torch.autograd.graph.save_on_cpu`) until backward reaches
that pass and recomputes it. GPU memory is then one pass's activations, whatever N and the number of chunks.

Two recomputations, by whether gradients are reduced across processes:
- one process (no `torch.distributed` group): reentrant, as `torch.utils.checkpoint` with `use_reentrant=True`.
  The pass runs without autograd; backward re-runs it under autograd and calls `torch.autograd.backward` on it, so
  a looped weight's gradient is accumulated once per pass and chunk. No graph is built in the forward, which makes
  it the faster one: item a of `benchmarks.run` on an H100 (2026-12-05), a Jet-Nemotron-2B step at N = 1 / 6 took
  326 / 788 ms against 356 / 898 ms with torch's non-reentrant checkpoint.
- under a process group (DDP, DeepSpeed ZeRO, FSDP2): torch's non-reentrant checkpoint. Backward runs through the
  graph of the original forward and only refills its saved tensors, so each weight's gradient arrives once per
  backward, however often the loop range ran: what their gradient reductions need. (The reentrant scheme's
  arrivals per pass stop ZeRO-2, and DDP and FSDP2 reduce partial gradients.)
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor
from torch.autograd.graph import save_on_cpu
from torch.utils._pytree import tree_flatten, tree_unflatten
from torch.utils.checkpoint import checkpoint

from retrofit.ops import training_kernels


def checkpoint_offloaded(fn: Callable[..., Any], *args: Any) -> Any:
    """`fn(*args)`, recomputed in backward; its tensor inputs wait on the host (CUDA) meanwhile (module docstring).

    `args` may be nested lists, tuples and NamedTuples of tensors and plain values; every tensor among them is
    offloaded, not only those at the top level. Use it with `loss.backward()`, not `torch.autograd.grad`.
    """
    leaves, spec = tree_flatten(args)
    positions = [i for i, leaf in enumerate(leaves) if isinstance(leaf, Tensor)]
    tensors = [leaves[i] for i in positions]
    # The recomputation keeps the plain leaves only: a reference to an input tensor would pin it on the GPU.
    plain = _fill(leaves, positions, [None] * len(positions))
    offload = any(t.is_cuda for t in tensors)
    with save_on_cpu(pin_memory=True) if offload else contextlib.nullcontext():
        if dist.is_available() and dist.is_initialized():
            return checkpoint(_Refill(fn, plain, positions, spec), *tensors, use_reentrant=False)
        result: dict[str, Any] = {}
        outputs = _RecomputedPass.apply(fn, spec, plain, positions, result, *tensors)
    out_leaves = list(result["leaves"])
    for i, tensor in zip(result["positions"], outputs, strict=True):
        out_leaves[i] = tensor
    return tree_unflatten(out_leaves, result["spec"])


class _Refill:
    """`fn` called on its arguments with the tensors put back in their places (what torch's checkpoint runs)."""

    def __init__(self, fn: Callable[..., Any], plain: list[Any], positions: list[int], spec: Any) -> None:
        self.fn, self.plain, self.positions, self.spec = fn, plain, positions, spec

    def __call__(self, *tensors: Tensor) -> Any:
        return self.fn(*tree_unflatten(_fill(self.plain, self.positions, tensors), self.spec))


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
