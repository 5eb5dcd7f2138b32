"""Cross-entropy of a language-model head without the [tokens x vocab] logits.

A step whose every token is labelled (a `text` task) would hold logits of `tokens x vocab` floats, plus their
gradient: for Qwen3.5's 248K vocabulary and a 2000-token window at batch 8, 16 GB in float32. Here the head runs on
`HEAD_ROWS` rows at a time, each chunk's loss is summed, and its logits are recomputed in the backward instead of
kept (activation checkpointing), so at most one chunk of logits lives at a time. The head is any callable (final norm
and `lm_head`), so module hooks (DeepSpeed ZeRO-3's gathers, PEFT's adapters) run as they do in a plain forward.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.checkpoint import checkpoint

HEAD_ROWS = 1024  # rows of logits per chunk: 1 GiB of float32 at a 248K vocabulary


def head_cross_entropy(
    head: Callable[[Tensor], Tensor], hidden: Tensor, targets: Tensor, rows: int | None = None
) -> Tensor:
    """Summed cross-entropy of `head(hidden)` [N, V] against `targets` [N] (no ignored entries), in at least float32,
    computed `rows` rows (default `HEAD_ROWS`) at a time (see the module docstring); one call when N <= rows."""
    rows = rows or HEAD_ROWS
    if hidden.shape[0] <= rows:
        return _summed_loss(head, hidden, targets)
    total = hidden.new_zeros((), dtype=torch.promote_types(hidden.dtype, torch.float32))
    for start in range(0, hidden.shape[0], rows):
        part = slice(start, start + rows)
        total = total + checkpoint(_summed_loss, head, hidden[part], targets[part], use_reentrant=False)
    return total


def _summed_loss(head: Callable[[Tensor], Tensor], hidden: Tensor, targets: Tensor) -> Tensor:
    logits = head(hidden)
    return F.cross_entropy(logits.to(torch.promote_types(logits.dtype, torch.float32)), targets, reduction="sum")
