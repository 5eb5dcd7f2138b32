"""The sleep engine: chunked wake/sleep over any model family's adapter (DESIGN.md, "Semantics").

Reading guide, top to bottom:

1. `SleepEngine.forward` cuts the sequence into chunks of L tokens and decides, per chunk, whether it
   wakes (logits, loss), sleeps (N passes), or both. Only the fast state and, under sliding eviction,
   the last L-1 wake-pass keys/values cross a chunk boundary.
2. `_run_chunk` is one chunk: the prelude once, the loop range for the wake passes, the coda and head
   for the logits, then the remaining sleep passes (continuing from the state and the features the wake
   passes left), then the coda once more on the refined features.
3. Gradient options: truncation across chunks and passes, and activation checkpointing per chunk
   (`torch.utils.checkpoint`) or per (chunk, pass) (`retrofit.checkpoint`, inputs offloaded to the host).
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.checkpoint import checkpoint

from retrofit.blocks import BlockState, Chunk, KVWindow, LinearState, SleepAdapter, join_readable
from retrofit.checkpoint import checkpoint_offloaded
from retrofit.config import SleepConfig
from retrofit.ops.cross_entropy import head_cross_entropy, head_token_scores

IGNORE_INDEX = -100

States = list[BlockState]
Windows = list[KVWindow | None]


@dataclass
class EngineOutput:
    """Result of a chunked forward.

    Attributes:
        loss: mean next-token cross-entropy over label positions (None without labels).
        logits: wake logits `[B, T, V]` (only when asked for; training computes logits at label
            positions only).
        states: each block's fast state after the last chunk (and its sleep, if one ran).
        windows: each attention block's retained KV window after the last chunk.
        num_label_tokens: how many positions the loss averages over.
        token_loss: with `return_token_scores`, each position's next-token cross-entropy `[B, T]` (at least
            float32; 0 where there is no label).
        token_correct: with `return_token_scores`, whether the head's argmax at each position is its label
            `[B, T]` (True where there is no label).
    """

    loss: Tensor | None
    logits: Tensor | None
    states: States
    windows: Windows
    num_label_tokens: int
    token_loss: Tensor | None = None
    token_correct: Tensor | None = None


@dataclass(frozen=True)
class _Plan:
    """What one chunk does: wake logits, a sleep, and which positions need logits.

    `label_index` holds the flat (`B * C`) positions of the chunk's loss tokens when only some positions have one;
    it is None when every position does (or none: no loss). It is found before the first chunk runs, so the head
    never waits for the GPU to count them mid-forward.
    """

    logits: bool
    sleep: bool
    all_logits: bool
    label_index: Tensor | None = None
    token_scores: bool = False  # the head returns each label position's loss and hit, not logits (`_token_scores`)
    # `context_only` with loss tokens in some rows only: those rows wake (their state is the wake's) and the others
    # sleep, as each would alone. `[B]` bool, True for the rows that only wake.
    wake_rows: Tensor | None = None


def sequence_positions(valid: Tensor, mode: str, window: int) -> Tensor:
    """RoPE position ids `[B, T]` that count real tokens only (padding does not advance them).

    `global` counts from the start of the sequence; `chunk` restarts at each chunk of `window` tokens.
    """
    if mode == "global":
        return (valid.long().cumsum(-1) - 1).clamp(min=0)
    batch, length = valid.shape
    pad = (-length) % window
    grouped = F.pad(valid.long(), (0, pad)).view(batch, -1, window)
    return (grouped.cumsum(-1) - 1).clamp(min=0).view(batch, -1)[:, :length]


def upcast(x: Tensor) -> Tensor:
    """`x` in at least float32: losses of bf16 models in fp32, of float64 (test) models in float64."""
    return x.to(torch.promote_types(x.dtype, torch.float32))


def next_token_targets(labels: Tensor, valid: Tensor | None = None) -> Tensor:
    """Targets aligned with logits: position t predicts `labels[t + 1]` (HF causal-LM convention).

    A padded position predicts nothing, so padding before an example never adds a loss term.
    """
    targets = F.pad(labels[:, 1:], (0, 1), value=IGNORE_INDEX)
    return targets if valid is None else targets.masked_fill(~valid, IGNORE_INDEX)


def chunk_bounds(length: int, window: int) -> list[tuple[int, int]]:
    """`[start, stop)` of each chunk of `window` tokens in a sequence of `length` tokens."""
    return [(s, min(s + window, length)) for s in range(0, length, window)]


def _unscored(batch: int, length: int, like: Tensor, dtype: torch.dtype = torch.float32) -> Tensor:
    """`[batch, length, 2]` token scores of positions without a label: loss 0, correct."""
    scores = torch.zeros(batch, length, 2, dtype=dtype, device=like.device)
    scores[..., 1] = 1.0
    return scores


def _select_rows(rows: Tensor, chosen: BlockState, other: BlockState) -> BlockState:
    """`chosen`'s state in the batch rows `rows` (`[B]` bool), `other`'s in the rest."""
    if chosen is None or other is None or chosen is other:
        return other
    recurrent = torch.where(rows.view(-1, 1, 1, 1), chosen.recurrent, other.recurrent)
    conv = tuple(torch.where(rows.view(-1, 1, 1), a, b) for a, b in zip(chosen.conv, other.conv, strict=True))
    return LinearState(recurrent, conv)


def _detach_states(states: States) -> States:
    return [s.detach() if s is not None else None for s in states]


def _detach_windows(windows: Windows) -> Windows:
    return [w.detach() if w is not None else None for w in windows]


class SleepEngine:
    """Runs a model family's blocks under a `SleepConfig`.

    The engine is stateless between calls; it holds the adapter and the config only.
    """

    def __init__(self, adapter: SleepAdapter, config: SleepConfig) -> None:
        num_blocks = len(adapter.blocks)
        config.check_blocks(num_blocks)
        start, stop = config.loop_range or adapter.default_loop_range
        self.adapter = adapter
        self.config = config
        self.prelude = range(0, start)
        self.loop = range(start, stop)
        self.coda = range(stop, num_blocks)
        self.attention_blocks = [i for i, b in enumerate(adapter.blocks) if b.kind != "linear"]
        self.coda_has_attention = any(i in self.coda for i in self.attention_blocks)
        if config.eviction == "sliding" and config.wake_passes > 1:
            raise ValueError("sleep_config: sliding eviction needs wake_passes = 1 (one wake KV per block)")

    # ------------------------------------------------------------------ public API

    def forward(
        self,
        input_ids: Tensor,
        attention_mask: Tensor | None = None,
        labels: Tensor | None = None,
        *,
        return_logits: bool = False,
        return_token_scores: bool = False,
    ) -> EngineOutput:
        """Chunked wake/sleep over `input_ids` `[B, T]`; see the module docstring.

        `return_token_scores` (with `labels`, for evaluation) gives each position's loss and whether its argmax is
        its label instead of logits: the head runs on the label positions a chunk of rows at a time, so no
        `[B, T, V]` tensor is ever held.
        """
        if return_token_scores and (return_logits or labels is None):
            raise ValueError("return_token_scores needs labels, and gives no logits")
        cfg = self.config
        length = input_ids.shape[1]
        valid = torch.ones_like(input_ids, dtype=torch.bool) if attention_mask is None else attention_mask.bool()
        positions = sequence_positions(valid, cfg.positions, cfg.window)
        targets = next_token_targets(labels, valid) if labels is not None else None
        bounds = chunk_bounds(length, cfg.window)
        row_counts, padded = self._chunk_facts(targets, valid, bounds)
        label_counts = [sum(rows) for rows in row_counts]
        chunk_has_loss = [count > 0 for count in label_counts]
        label_index = [
            self._label_index(targets[:, s:e]) if not return_logits and 0 < count < targets[:, s:e].numel() else None
            for (s, e), count in zip(bounds, label_counts, strict=True)
        ]

        states: States = [None] * len(self.adapter.blocks)
        windows: Windows = [None] * len(self.adapter.blocks)
        loss_sum = input_ids.new_zeros((), dtype=torch.float32)
        head_outputs: list[Tensor] = []  # each chunk's logits, or its token scores
        for index, (s, e) in enumerate(bounds):
            has_next = e < length
            if cfg.sleep_on == "every_chunk":
                wants_logits, sleeps = return_logits or chunk_has_loss[index], has_next
            else:  # context_only: a row with loss tokens wakes; one without sleeps (the last chunk wakes anyway)
                some, every = chunk_has_loss[index], all(count > 0 for count in row_counts[index])
                wants_logits, sleeps = return_logits or some, has_next and not every
            mixed = cfg.sleep_on == "context_only" and sleeps and chunk_has_loss[index]
            wake_rows = torch.tensor([c > 0 for c in row_counts[index]], device=valid.device) if mixed else None
            plan = _Plan(wants_logits, sleeps, all_logits=return_logits, label_index=label_index[index],
                         token_scores=return_token_scores, wake_rows=wake_rows)  # fmt: skip
            chunk = self._chunk(s, e, positions, valid, padded[index])
            chunk_targets = targets[:, s:e] if targets is not None else None
            part_loss, logits, states, windows = self._call_chunk(
                input_ids[:, s:e], chunk_targets, chunk, states, windows, plan
            )
            if part_loss is not None:
                loss_sum = loss_sum + part_loss
            if return_token_scores:  # a chunk without labels scores nothing: loss 0, correct
                head_outputs.append(logits if logits is not None else _unscored(input_ids.shape[0], e - s, valid))
            elif logits is not None:
                head_outputs.append(logits)
            if cfg.truncate_chunks is not None and (index + 1) % cfg.truncate_chunks == 0:
                states, windows = _detach_states(states), _detach_windows(windows)

        num_label_tokens = sum(label_counts)
        loss = loss_sum / max(num_label_tokens, 1) if targets is not None else None
        if return_token_scores:
            scores = torch.cat(head_outputs, dim=1)
            return EngineOutput(loss, None, states, windows, num_label_tokens, scores[..., 0], scores[..., 1].bool())
        logits = torch.cat(head_outputs, dim=1) if return_logits else None
        return EngineOutput(loss, logits, states, windows, num_label_tokens)

    def sleep(
        self,
        input_ids: Tensor,
        start: int,
        positions: Tensor,
        states: States,
        windows: Windows,
        valid: Tensor | None = None,
        padded: bool | None = None,
    ) -> tuple[States, Windows]:
        """Consolidate one chunk now: N passes from `states`, then evict. Returns the new state and windows.

        `input_ids` `[B, C]` are the chunk's tokens (C <= L), `start` the index of its first token, and
        `positions` its RoPE ids; `padded` says whether `valid` holds a False (read from it when not given).
        Streaming inference calls this every L tokens, or earlier when idle.
        """
        if valid is None:
            valid = torch.ones_like(input_ids, dtype=torch.bool)
        chunk = self.chunk_for_tokens(start, positions, valid, padded)
        _, _, states, windows = self._call_chunk(
            input_ids, None, chunk, states, windows, _Plan(logits=False, sleep=True, all_logits=False)
        )
        return states, windows

    def chunk_for_tokens(
        self, start: int, positions: Tensor, valid: Tensor, padded: bool | None = None, index: Tensor | None = None
    ) -> Chunk:
        """The `Chunk` description of tokens `[start, start + C)` (used by streaming decoders). `padded` (whether
        `valid` holds a False) is read from `valid` unless given; `index` gives the stream indices as a tensor."""
        padded = not bool(valid.all()) if padded is None else padded
        return Chunk(start, positions, valid, self.adapter.rope(positions), self._eviction_window(), padded, index)

    # ------------------------------------------------------------------ one chunk

    def _call_chunk(
        self, input_ids: Tensor, targets: Tensor | None, chunk: Chunk, states: States, windows: Windows, plan: _Plan
    ) -> tuple[Tensor | None, Tensor | None, States, Windows]:
        run = self._run_chunk
        if self.config.checkpointing == "chunk" and torch.is_grad_enabled():
            return checkpoint(run, input_ids, targets, chunk, states, windows, plan, use_reentrant=False)
        return run(input_ids, targets, chunk, states, windows, plan)

    def _run_chunk(
        self, input_ids: Tensor, targets: Tensor | None, chunk: Chunk, states: States, windows: Windows, plan: _Plan
    ) -> tuple[Tensor | None, Tensor | None, States, Windows]:
        """One chunk: wake passes (+ logits), then the rest of the sleep. Pure function of its inputs."""
        cfg = self.config
        new_states = list(states)
        chunk_kv: Windows = [None] * len(states)

        # Prelude (once) and the wake passes of the loop range. The first loop pass is shared by wake
        # and sleep; its keys/values are the wake KV that sliding eviction retains.
        h = self.adapter.embed(input_ids)
        h = self._run_blocks(self.prelude, h, new_states, windows, chunk, chunk_kv)
        for p in range(cfg.wake_passes):
            h = self._pass(h, new_states, windows, chunk, chunk_kv if p == 0 else None)

        need_wake_coda = plan.logits or not plan.sleep or (cfg.eviction == "sliding" and self.coda_has_attention)
        loss_sum, logits, wake_coda_states = None, None, None
        if need_wake_coda:
            wake_coda_states = list(states)
            h_out = self._run_blocks(self.coda, h, wake_coda_states, windows, chunk, chunk_kv)
            if plan.logits:
                loss_sum, logits = self._head(h_out, targets, plan)

        if plan.sleep:
            woken = list(new_states)  # the loop's states after the wake passes
            h = self._sleep_passes(h, new_states, windows, chunk)
            if cfg.passes > cfg.wake_passes or wake_coda_states is None:
                self._run_blocks(self.coda, h, new_states, windows, chunk, None)
            else:
                self._take(self.coda, new_states, wake_coda_states)
            if plan.wake_rows is not None:  # the rows that only wake keep the wake's states
                self._take(self.coda, woken, wake_coda_states)
                for i in (*self.loop, *self.coda):
                    new_states[i] = _select_rows(plan.wake_rows, woken[i], new_states[i])
        else:
            self._take(self.coda, new_states, wake_coda_states)
        return loss_sum, logits, new_states, self._evict(windows, chunk_kv)

    def _sleep_passes(self, h: Tensor, states: States, windows: Windows, chunk: Chunk) -> Tensor:
        """Loop passes `wake_passes .. N-1`: h is fed forward, S continues; `grad_passes` truncates."""
        cfg = self.config
        first_with_grad = cfg.passes - cfg.grad_passes if cfg.grad_passes is not None else 0
        for p in range(cfg.wake_passes, cfg.passes):
            if p == first_with_grad:
                h = h.detach()
                for i in self.loop:
                    states[i] = states[i].detach() if states[i] is not None else None
            grad = contextlib.nullcontext() if p >= first_with_grad else torch.no_grad()
            with grad:
                h = self._pass(h, states, windows, chunk, None)
        return h

    def _pass(self, h: Tensor, states: States, windows: Windows, chunk: Chunk, chunk_kv: Windows | None) -> Tensor:
        """One pass of the loop range; under `checkpointing: pass` it is recomputed in backward and its
        inputs wait in host memory, so GPU memory does not grow with N (see `retrofit.checkpoint`)."""
        loop_states = [states[i] for i in self.loop]
        loop_windows = [windows[i] for i in self.loop]
        if self.config.checkpointing == "pass" and torch.is_grad_enabled():
            h, loop_states, loop_kv = checkpoint_offloaded(self._loop_pass, h, loop_states, loop_windows, chunk)
        else:
            h, loop_states, loop_kv = self._loop_pass(h, loop_states, loop_windows, chunk)
        for offset, i in enumerate(self.loop):
            states[i] = loop_states[offset]
            if chunk_kv is not None:
                chunk_kv[i] = loop_kv[offset]
        return h

    def _loop_pass(
        self, h: Tensor, loop_states: list[BlockState], loop_windows: Windows, chunk: Chunk
    ) -> tuple[Tensor, list[BlockState], Windows]:
        states: States = [None] * len(self.adapter.blocks)
        windows: Windows = [None] * len(self.adapter.blocks)
        kv: Windows = [None] * len(self.adapter.blocks)
        for offset, i in enumerate(self.loop):
            states[i], windows[i] = loop_states[offset], loop_windows[offset]
        h = self._run_blocks(self.loop, h, states, windows, chunk, kv)
        return h, [states[i] for i in self.loop], [kv[i] for i in self.loop]

    def _run_blocks(
        self, indices: range, h: Tensor, states: States, windows: Windows, chunk: Chunk, chunk_kv: Windows | None
    ) -> Tensor:
        """Run blocks `indices` in order, updating `states` in place and recording their chunk KV."""
        for i in indices:
            h, states[i], kv = self.adapter.blocks[i](h, states[i], windows[i], chunk)
            if chunk_kv is not None:
                chunk_kv[i] = kv
        return h

    def _head(self, h: Tensor, targets: Tensor | None, plan: _Plan) -> tuple[Tensor | None, Tensor | None]:
        """Summed cross-entropy over label positions, and logits when the plan asks for all of them.

        Otherwise the head runs on `plan.label_index` positions only (all when it is None): for a large vocabulary
        and few supervised tokens per chunk, that saves most of the head's memory and time; with many, the loss is
        taken a chunk of rows at a time (`retrofit.ops.cross_entropy`), never holding all their logits.
        """
        if plan.all_logits:
            logits = self.adapter.head(h)
            if targets is None:
                return None, logits
            loss = F.cross_entropy(upcast(logits).flatten(0, 1), targets.flatten(), reduction="sum")
            return loss, logits
        if targets is None:
            return None, None
        if plan.token_scores:
            return self._token_scores(h, targets, plan.label_index)
        h, targets = h.flatten(0, 1), targets.flatten()
        if plan.label_index is not None:
            h, targets = h.index_select(0, plan.label_index), targets.index_select(0, plan.label_index)
        parts = self.adapter.head_parts() if hasattr(self.adapter, "head_parts") else None
        return head_cross_entropy(self.adapter.head, h, targets, parts=parts), None

    def _token_scores(self, h: Tensor, targets: Tensor, label_index: Tensor | None) -> tuple[Tensor, Tensor]:
        """Summed loss over the chunk's label positions, and `[B, C, 2]` scores: each position's loss and 1.0 where
        the head's argmax is its label (0 and 1 where it has none). `label_index`: as in `_Plan`."""
        batch, length = targets.shape
        flat_targets = targets.flatten()
        index = label_index
        if index is None:  # every position has a label
            index = torch.arange(flat_targets.numel(), device=targets.device)
        hidden = h.flatten(0, 1).index_select(0, index)
        loss, hit = head_token_scores(self.adapter.head, hidden, flat_targets.index_select(0, index))
        scores = _unscored(batch, length, targets, loss.dtype).flatten(0, 1)
        scores[index] = torch.stack([loss, hit.to(loss.dtype)], dim=1)
        return loss.sum(), scores.view(batch, length, 2)

    # ------------------------------------------------------------------ helpers

    def _evict(self, windows: Windows, chunk_kv: Windows) -> Windows:
        """Hard eviction drops every window; sliding keeps the last L-1 wake-pass tokens."""
        if self.config.eviction == "hard":
            return [None] * len(windows)
        keep = self.config.window - 1
        out: Windows = [None] * len(windows)
        for i in self.attention_blocks:
            out[i] = join_readable(windows[i], chunk_kv[i], self.adapter.blocks[i].kv_window, keep)
        return out

    def _take(self, indices: range, states: States, source: States) -> None:
        for i in indices:
            states[i] = source[i]

    def _eviction_window(self) -> int | None:
        return self.config.window if self.config.eviction == "sliding" else None

    def _chunk(self, s: int, e: int, positions: Tensor, valid: Tensor, padded: bool) -> Chunk:
        chunk_positions = positions[:, s:e]
        rope = self.adapter.rope(chunk_positions)
        return Chunk(s, chunk_positions, valid[:, s:e], rope, self._eviction_window(), padded)

    @staticmethod
    def _label_index(targets: Tensor) -> Tensor:
        """Flat positions of a chunk's loss tokens (found with the chunk facts, before any chunk is queued)."""
        return (targets != IGNORE_INDEX).flatten().nonzero().squeeze(1)

    @staticmethod
    def _chunk_facts(
        targets: Tensor | None, valid: Tensor, bounds: Sequence[tuple[int, int]]
    ) -> tuple[list[list[int]], list[bool]]:
        """Per chunk: its loss-token count in each row and whether it holds padding, in one device-to-host copy.

        This copy and the loss positions found right after it (`_label_index`) are the forward's only waits for the
        GPU, and both come before any chunk is queued: a wait in mid-forward would drain the queue that the host had
        filled ahead of the GPU (about 45 ms of a 2B model's step on an H100; benchmarks/README.md, item b).
        """
        if targets is None:
            counts = torch.zeros(len(bounds), valid.shape[0], dtype=torch.long, device=valid.device)
        else:
            supervised = targets != IGNORE_INDEX
            counts = torch.stack([supervised[:, s:e].sum(1) for s, e in bounds])
        padded = torch.stack([~valid[:, s:e].all() for s, e in bounds]).long()
        facts = torch.cat([counts, padded[:, None]], dim=1).tolist()
        return [rows[:-1] for rows in facts], [bool(rows[-1]) for rows in facts]
