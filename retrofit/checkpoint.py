"""Per-pass activation checkpointing whose saved inputs wait in host memory.

A sleep of N passes over C chunks has N·C pass boundaries (the features h and the fast states entering each
pass). Plain checkpointing keeps all of them on the GPU, so memory still grows with N. Here each pass keeps only
its inputs, and on CUDA they go to pinned host memory (`torch.autograd.graph.save_on_cpu`) until backward reaches
that pass and recomputes it. GPU memory is then one pass's activations, whatever N and the number of chunks.

The recomputation is torch's non-reentrant checkpoint: backward runs through the graph of the original forward and
only refills its saved tensors. Each parameter's gradient therefore arrives once per backward, however often the
loop range ran, which is what DDP, DeepSpeed ZeRO and FSDP2 need when they reduce gradients. (A reentrant scheme,
with a nested backward per pass, hands a looped weight's gradient over once per pass and chunk: ZeRO-2 stops on it,
and DDP and FSDP2 reduce partial gradients.)
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from typing import Any

from torch import Tensor
from torch.autograd.graph import save_on_cpu
from torch.utils._pytree import tree_flatten, tree_unflatten
from torch.utils.checkpoint import checkpoint


def checkpoint_offloaded(fn: Callable[..., Any], *args: Any) -> Any:
    """`fn(*args)`, recomputed in backward; its tensor inputs wait on the host (CUDA) meanwhile.

    `args` may be nested lists, tuples and NamedTuples of tensors and plain values; every tensor among them is
    offloaded, not only those at the top level.
    """
    leaves, spec = tree_flatten(args)
    positions = [i for i, leaf in enumerate(leaves) if isinstance(leaf, Tensor)]
    tensors = [leaves[i] for i in positions]
    # `run` keeps the plain leaves only: a reference to an input tensor would pin it on the GPU.
    plain = list(leaves)
    for i in positions:
        plain[i] = None

    def run(*inputs: Tensor) -> Any:
        filled = list(plain)
        for i, tensor in zip(positions, inputs, strict=True):
            filled[i] = tensor
        return fn(*tree_unflatten(filled, spec))

    # The checkpoint saves its inputs under the hooks active here; inside the pass its own hooks keep nothing.
    offload = any(t.is_cuda for t in tensors)
    with save_on_cpu(pin_memory=True) if offload else contextlib.nullcontext():
        return checkpoint(run, *tensors, use_reentrant=False)
