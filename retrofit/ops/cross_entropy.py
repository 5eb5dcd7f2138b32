"""Cross-entropy of a language-model head without the [tokens x vocab] logits.

A step whose every token is labelled (a `text` task) would hold logits of `tokens x vocab` floats, plus their
gradient: for Qwen3.5's 248K vocabulary and a 2000-token window at batch 8, 16 GB in float32. Here the head runs on
`HEAD_ROWS` rows at a time, each chunk's loss is summed, and its logits are recomputed in the backward instead of
kept (activation checkpointing), so at most one chunk of logits lives at a time. The head is any callable (final norm
and `lm_head`), so module hooks (DeepSpeed ZeRO-3's gathers, PEFT's adapters) run as they do in a plain forward.

On CUDA, where fla is installed and `lm_head` is a plain, trained `nn.Linear` whose whole weight is here (no PEFT
wrapper, no ZeRO-3 partition, no hooks), fla's fused linear cross-entropy does the same in Triton while gradients are
on: chunks of rows, the gradients computed in the forward, logits never kept (`USE_FLA = False` turns it off, for
comparisons).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from retrofit.ops.gated_delta_rule import select_fla_module

HEAD_ROWS = 1024  # rows of logits per chunk: 1 GiB of float32 at a 248K vocabulary
USE_FLA = True
_FLA_MODULE = "fla.modules.fused_linear_cross_entropy"


def head_cross_entropy(
    head: Callable[[Tensor], Tensor],
    hidden: Tensor,
    targets: Tensor,
    rows: int | None = None,
    parts: tuple[Callable[[Tensor], Tensor], nn.Module] | None = None,
) -> Tensor:
    """Summed cross-entropy of `head(hidden)` [N, V] against `targets` [N] (no ignored entries), in at least float32,
    computed `rows` rows (default `HEAD_ROWS`) at a time (see the module docstring); one call when N <= rows.

    `parts` splits the head into what comes before its output projection and that projection (`lm_head`): with
    them, fla's fused kernel serves where it can (module docstring)."""
    fused = _fla_fused_loss(hidden, parts)
    if fused is not None:
        features, lm_head = parts
        # A 16-bit head adds up its weight gradient in its own dtype, as autograd does for a 16-bit parameter: fla's
        # fp32 accumulation would run the [V, D] weight-gradient matmul of every row chunk in fp32.
        fp32 = lm_head.weight.dtype == torch.float32
        return fused(
            features(hidden), targets, lm_head.weight, lm_head.bias, reduction="sum", accumulate_grad_in_fp32=fp32
        )
    rows = rows or HEAD_ROWS
    if hidden.shape[0] <= rows:
        return _summed_loss(head, hidden, targets)
    total = hidden.new_zeros((), dtype=torch.promote_types(hidden.dtype, torch.float32))
    for start in range(0, hidden.shape[0], rows):
        part = slice(start, start + rows)
        total = total + checkpoint(_summed_loss, head, hidden[part], targets[part], use_reentrant=False)
    return total


def head_token_scores(
    head: Callable[[Tensor], Tensor], hidden: Tensor, targets: Tensor, rows: int | None = None
) -> tuple[Tensor, Tensor]:
    """Each row's cross-entropy of `head(hidden)` [N, V] against `targets` [N], in at least float32, and whether the
    row's argmax is its target; `rows` rows (default `HEAD_ROWS`) at a time, so that evaluation never holds more
    than one chunk of logits. Not for training: nothing is recomputed for a backward."""
    rows = rows or HEAD_ROWS
    losses, hits = [], []
    for start in range(0, hidden.shape[0], rows):
        logits = head(hidden[start : start + rows])
        logits = logits.to(torch.promote_types(logits.dtype, torch.float32))
        part = targets[start : start + rows]
        losses.append(F.cross_entropy(logits, part, reduction="none"))
        hits.append(logits.argmax(-1) == part)
    if not losses:
        return hidden.new_zeros(0, dtype=torch.float32), torch.zeros(0, dtype=torch.bool, device=hidden.device)
    return torch.cat(losses), torch.cat(hits)


def _summed_loss(head: Callable[[Tensor], Tensor], hidden: Tensor, targets: Tensor) -> Tensor:
    logits = head(hidden)
    return F.cross_entropy(logits.to(torch.promote_types(logits.dtype, torch.float32)), targets, reduction="sum")


def _fla_fused_loss(hidden: Tensor, parts: tuple[Callable[[Tensor], Tensor], nn.Module] | None) -> Callable | None:
    """fla's `fused_linear_cross_entropy_loss` where it computes exactly this head's loss, else None."""
    if not USE_FLA or parts is None:
        return None
    lm_head = parts[1]
    weight = lm_head.weight if isinstance(lm_head, nn.Linear) else None
    whole = (
        torch.is_grad_enabled()  # it computes the head's gradients in its forward: wasted in evaluation
        and type(lm_head) is nn.Linear
        and weight.requires_grad  # a frozen head (LoRA elsewhere): its weight gradient would be wasted too
        and type(weight) in (torch.Tensor, nn.Parameter)
        and weight.numel() > 0
        and not hasattr(weight, "ds_id")  # a DeepSpeed ZeRO-3 parameter: gathered by hooks only
        and not (lm_head._forward_hooks or lm_head._forward_pre_hooks)
    )
    module = select_fla_module(hidden, _FLA_MODULE) if whole else None
    return None if module is None else module.fused_linear_cross_entropy_loss
