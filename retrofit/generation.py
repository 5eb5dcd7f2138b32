"""Streaming inference with sleep: `SleepCache` and the cached forward behind `model.generate` (the `retrofit
generate` command is `retrofit.generate_command`).

Inference reads a stream of tokens (prompt and generated alike) in chunks of L tokens (DESIGN.md, "Semantics"):

* every new token gets one wake pass: all blocks once, from the streaming fast states, attending to the retained
  KV window plus the earlier tokens of its chunk. A prompt is processed in segments that end at chunk boundaries,
  which computes the same as one token at a time;
* when a token arrives and the current chunk already holds L tokens, the chunk sleeps first: `SleepEngine.sleep`
  runs its N passes FROM THE STATE AT THE CHUNK'S START (the engine reuses the wake pass as the first pass) and
  evicts, returning the next chunk's starting states and retained windows (none under hard eviction, the last L-1
  wake tokens under sliding). Sleeping lazily, only once a next token exists, is what `SleepEngine.forward` does
  (a chunk sleeps when another follows it), so greedy decoding equals the argmax of the engine's wake logits;
* `consolidate` (`model.sleep(cache)`) sleeps the current chunk now, full or not, and starts a new chunk at the
  current position: what a server can do while it waits for the user.

Memory is fixed after the first step: each attention block keeps a `KVRing` of the L-1 earlier tokens a query can
read (a sliding-window block its window - 1), each linear block one fast state, and the current chunk's tokens sit
in `[B, L]` buffers; every step updates them in place, and masks and positions come from tensors. That makes the
one-token wake step the same computation at every position, so on CUDA it is captured once as a CUDA graph and
replayed (one launch per token instead of one per kernel), and so is the sleep of a full window.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable

import torch
from torch import Tensor
from transformers.cache_utils import Cache
from transformers.modeling_outputs import CausalLMOutputWithPast

from retrofit.blocks import BlockState, Chunk, KVRing, KVWindow, LinearState, SleepAdapter, join_readable
from retrofit.engine import SleepEngine
from retrofit.layers.packing import pack_input_projections

# The name under which this transformers passes a cache to `forward`, returns it in a model output and keeps it
# between `generate` steps: `cache` from transformers 5.25 on, `past_key_values` before.
CACHE_NAME = "cache" if "cache" in CausalLMOutputWithPast.__dataclass_fields__ else "past_key_values"


def cached_output(logits: Tensor, cache: Cache) -> CausalLMOutputWithPast:
    """A causal-LM output that hands `cache` back to `generate`, under this transformers' name for it."""
    return CausalLMOutputWithPast(logits=logits, **{CACHE_NAME: cache})


def take_cache(cache: Cache | None, kwargs: dict) -> Cache | None:
    """The cache a `forward` was given: `cache=` (transformers >= 5.25), or `past_key_values=` (the name before)."""
    legacy = kwargs.pop("past_key_values", None)
    return cache if cache is not None else legacy


class _ChunkTokens:
    """The current chunk's tokens, in fixed `[B, L]` buffers (ids, RoPE positions, validity) that a sleep reads."""

    def __init__(self, batch: int, window: int, device: torch.device) -> None:
        self.ids = torch.zeros(batch, window, dtype=torch.long, device=device)
        self.positions = torch.zeros(batch, window, dtype=torch.long, device=device)
        self.valid = torch.zeros(batch, window, dtype=torch.bool, device=device)

    def write(self, slots: Tensor, ids: Tensor, positions: Tensor, valid: Tensor) -> None:
        self.ids.index_copy_(1, slots, ids)
        self.positions.index_copy_(1, slots, positions)
        self.valid.index_copy_(1, slots, valid)

    def first(self, length: int) -> tuple[Tensor, Tensor, Tensor]:
        """Copies of the first `length` tokens' buffers (the next chunk overwrites these)."""
        return self.ids[:, :length].clone(), self.positions[:, :length].clone(), self.valid[:, :length].clone()


class StreamingCache(Cache):
    """What the toolkit's caches share: the stream position, for `generate`, and no rollback or beam search."""

    def __init__(self) -> None:
        super().__init__(layers=[])
        self.seen = 0
        self.num_valid: Tensor | None = None

    def get_seq_length(self, layer_idx: int = 0) -> int:
        """Tokens seen so far; `generate` slices the new tokens off `input_ids` with it."""
        return self.seen

    @property
    def is_compileable(self) -> bool:
        return False

    @property
    def is_croppable(self) -> bool:
        """A sleep cannot be undone, and fast states cannot be rolled back: no cropping."""
        return False

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        raise NotImplementedError("beam search is not supported with this cache: use greedy decoding or sampling")

    @staticmethod
    def positions_after(before: Tensor, valid: Tensor) -> Tensor:
        """RoPE ids of new tokens `[B, T]` that continue a count of `before` `[B]` real tokens (padding does not
        advance them), as `retrofit.engine.sequence_positions` counts on the whole stream."""
        return (before[:, None] + valid.long().cumsum(-1) - 1).clamp(min=0)

    def advance(self, valid: Tensor) -> None:
        """Count the new tokens `valid` `[B, T]` as seen."""
        self.seen += valid.shape[1]
        self.num_valid = self.num_valid + valid.long().sum(-1)


class SleepCache(StreamingCache):
    """The streaming state of a sleeping model, as a transformers `Cache` that `generate` carries between steps.

    `generate` makes one; pass `cache=SleepCache()` (`past_key_values=` before transformers 5.25) to keep it (to
    `model.sleep(cache)` when idle, or to continue the stream with more tokens). It is sized to the model and the
    batch on the first step, and never grows after: each attention block holds a `KVRing` of the L - 1 earlier tokens
    a query can read (its own window - 1 if that is less), each linear block one fast state, and the current chunk's
    tokens sit in `[B, L]` buffers. Every later step updates these in place.

    On CUDA the one-token wake step and the sleep of a full window are each captured once as a CUDA graph and
    replayed after (`capture=False` keeps both eager); where capture fails, that step stays eager and says so once.
    `compile=True` also compiles the wake step with `torch.compile` before it is captured: inductor fuses its
    ~1,300 small kernels per token into far fewer, for some seconds of compiling on the first decoding step (26-39 s
    for a 2B model on an H100); worth it for long generations (benchmarks/README.md, issue 23). It first packs the
    projections that each block applies to one input (`retrofit.layers.packing`), so that the step reads each group
    of weights as one matrix: the parameters become views of the packed tensors, with their names and values.

    Attributes:
        chunk_start_states: each block's fast state at the current chunk's start (what its sleep starts from).
        states: each block's streaming fast state, after the last token seen.
        windows: each attention block's window retained by the last sleep (what the next sleep reads), or None.
        rings: each attention block's KV buffer of the tokens its next query can read, or None.
        chunk: the current chunk's token ids, positions and validity.
        chunk_length: tokens in the current chunk so far.
        chunk_start: index of the current chunk's first token in the stream.
        seen: tokens seen so far (padding included: it is the stream index of the next token).
        num_valid: `[B]` real (non-padding) tokens seen so far per row; global RoPE positions count these.
    """

    def __init__(self, capture: bool = True, compile: bool = False) -> None:
        super().__init__()
        self.capture = capture
        self.compile = compile
        self.chunk_start_states: list[BlockState] = []
        self.states: list[BlockState] = []
        self.windows: list[KVWindow | None] = []
        self.rings: list[KVRing | None] = []
        self.chunk: _ChunkTokens | None = None
        self.chunk_length = 0
        self.chunk_start = 0
        self._next_index: Tensor | None = None  # [1] on the device: `seen`, for steps that replay
        self._chunk_start_index: Tensor | None = None  # [1]: `chunk_start`
        self._chunk_valid: Tensor | None = None  # [B]: real tokens of the current chunk (chunk positions)
        self._captured: _CapturedWake | None = None
        self._captured_sleep: _CapturedSleep | None = None
        self._stream: torch.cuda.Stream | None = None
        self._packed_projections: list[Tensor] = []  # held: the compiled step reads them (`retrofit.layers.packing`)

    # ------------------------------------------------------------------ streaming

    def kv_lengths(self) -> list[tuple[int, int]]:
        """Per attention block: (retained window tokens, current chunk tokens) held in KV memory."""
        return [ring.held(self.chunk_start) for ring in self.rings if ring is not None]

    def step(self, engine: SleepEngine, input_ids: Tensor, valid: Tensor, padded: bool | None = None) -> Tensor:
        """Wake logits `[B, T, V]` of the new tokens `input_ids` `[B, T]`, sleeping at every chunk boundary.

        `padded` (whether `valid` holds a False) is read from `valid` unless given: a caller that knows it (no
        attention mask) saves the host a wait for the device on every token."""
        if engine.config.wake_passes != 1:
            raise ValueError(
                f"streaming inference needs sleep_config.wake_passes = 1, not {engine.config.wake_passes} (a streamed "
                "token runs one pass); generate with use_cache=False (the engine recomputes every step), or apply "
                "a sleep config with wake_passes=1"
            )
        if self.num_valid is None:
            self._allocate(engine, valid)
        window, logits, offset = engine.config.window, [], 0
        while offset < input_ids.shape[1]:
            if self.chunk_length >= window:
                self.consolidate(engine)
            stop = min(offset + window - self.chunk_length, input_ids.shape[1])
            segment = valid[:, offset:stop]
            segment_padded = not bool(segment.all()) if padded is None else padded
            logits.append(self._wake_segment(engine, input_ids[:, offset:stop], segment, segment_padded))
            self.seen += stop - offset
            self.chunk_length += stop - offset
            offset = stop
        return torch.cat(logits, dim=1)

    def consolidate(self, engine: SleepEngine) -> int:
        """Sleep on the current chunk now (from its starting state), evict, and start a new chunk here.

        Returns the number of tokens consolidated (0 when the current chunk is empty).
        """
        length = self.chunk_length
        if length == 0:
            return 0
        ids, positions, valid = self.chunk.first(length)
        padded = not bool(valid.all())
        captured = self._captured_sleep
        replay = captured is not None and self._may_capture(ids) and captured.fits(self, padded)
        slept = captured.run(self, engine) if replay else None
        if slept is None:
            slept = engine.sleep(ids, self.chunk_start, positions, self.chunk_start_states, self.windows, valid, padded)
            self._prepare_sleep_capture(engine, length, padded)
        states, windows = slept
        self.chunk_start_states, self.windows = states, windows
        for i, state in enumerate(states):
            if state is not None:
                self._keep_state(i, state)
        for ring, retained in zip(self.rings, windows, strict=True):
            if ring is not None:
                ring.clear()
                if retained is not None:
                    ring.write(retained)
        self.chunk_length, self.chunk_start = 0, self.seen
        self._chunk_start_index.copy_(self._next_index)
        self._chunk_valid.zero_()
        return length

    def _prepare_sleep_capture(self, engine: SleepEngine, length: int, padded: bool) -> None:
        """After an eager sleep of a full window that started from a state (so kernels are tuned for that shape),
        get the next such sleep captured as a CUDA graph."""
        full_window = length == engine.config.window and not padded
        started = all(s is not None for s, b in zip(self.chunk_start_states, engine.adapter.blocks, strict=True)
                      if b.kind == "linear")  # fmt: skip
        current = self._captured_sleep  # not captured yet: follow the shapes of this latest warm-up
        unused = current is None or (current.graph is None and not current.failed)
        if self._may_capture(self.chunk.ids) and full_window and started and unused:
            self._captured_sleep = _CapturedSleep(
                self._capture_stream(self.chunk.ids.device), _shapes(self.chunk_start_states, self.windows)
            )

    def _may_capture(self, tensor: Tensor) -> bool:
        """Whether steps on `tensor` may replay CUDA graphs: asked for, on CUDA, and without autograd (a replayed
        step records no graph for a backward)."""
        return self.capture and tensor.is_cuda and not torch.is_grad_enabled()

    def _capture_stream(self, device: torch.device) -> torch.cuda.Stream:
        """The side stream, on the buffers' device, on which this cache's CUDA graphs are warmed up and captured."""
        if self._stream is None:
            self._stream = torch.cuda.Stream(device=device)
        return self._stream

    def _allocate(self, engine: SleepEngine, valid: Tensor) -> None:
        """Size every buffer to the model and the batch (KV storage is allocated on its first write)."""
        with torch.inference_mode(False):  # buffers that later steps update in place, in or out of inference mode
            self._allocate_buffers(engine, valid)

    def _allocate_buffers(self, engine: SleepEngine, valid: Tensor) -> None:
        blocks, window = engine.adapter.blocks, engine.config.window
        self.chunk_start_states, self.states = [None] * len(blocks), [None] * len(blocks)
        self.windows = [None] * len(blocks)
        self.rings = []
        for block in blocks:
            reads = min(window, block.kv_window or window) - 1  # earlier tokens one query can read
            self.rings.append(KVRing(reads) if block.kind != "linear" and reads > 0 else None)
        batch, device = valid.shape[0], valid.device
        self.chunk = _ChunkTokens(batch, window, device)
        self.num_valid = torch.zeros(batch, dtype=torch.long, device=device)
        self._chunk_valid = torch.zeros(batch, dtype=torch.long, device=device)
        self._next_index = torch.zeros(1, dtype=torch.long, device=device)
        self._chunk_start_index = torch.zeros(1, dtype=torch.long, device=device)

    def _wake_segment(self, engine: SleepEngine, input_ids: Tensor, valid: Tensor, padded: bool) -> Tensor:
        """The wake logits of tokens that all belong to the current chunk: a replayed CUDA graph for one real token
        on CUDA once a step has run eagerly, else the eager pass."""
        replayable = self._may_capture(input_ids) and input_ids.shape[1] == 1 and not padded
        if not replayable:
            return self._wake(engine, input_ids, valid, padded)
        if self._captured is None:
            self._captured = _CapturedWake.first_step(self, engine, input_ids, self._capture_stream(input_ids.device))
            return self._captured.warm_logits
        return self._captured.replay(self, engine, input_ids)

    def _wake(self, engine: SleepEngine, input_ids: Tensor, valid: Tensor, padded: bool) -> Tensor:
        """One wake pass over tokens of the current chunk. Only tensors change (in place), so it can be captured."""
        index = self._next_index + torch.arange(input_ids.shape[1], device=input_ids.device)
        before = self.num_valid if engine.config.positions == "global" else self._chunk_valid
        positions = self.positions_after(before, valid)
        # The stream indices come from `index` (on the device), not from `start`: the step is the same computation
        # at every position, so a captured or compiled step serves them all.
        chunk = engine.chunk_for_tokens(0, positions, valid, padded, index)
        adapter = engine.adapter
        h = adapter.embed(input_ids)
        for i, block in enumerate(adapter.blocks):
            h, state, _ = block(h, self.states[i], self.rings[i], chunk)
            if state is not None:
                self._keep_state(i, state)
        self.chunk.write(index - self._chunk_start_index, input_ids, positions, valid)
        counted = valid.long().sum(-1)
        self.num_valid.add_(counted)
        self._chunk_valid.add_(counted)
        self._next_index.add_(input_ids.shape[1])
        return adapter.head(h)

    def _keep_state(self, i: int, state: LinearState) -> None:
        """Store block `i`'s new fast state in its own storage (copied in place after the first)."""
        if self.states[i] is None:
            self.states[i] = _clone_state(state)
        else:
            _copy_state(self.states[i], state)


# Inductor settings of the compiled wake step. Combo kernels launch independent small kernels of a step (a layer's
# gates, norms and state copies) as one: Jet-Nemotron-2B's shape decoded at 3.05 rather than 3.21 ms/token at batch 1
# on an H100 (benchmarks/README.md).
WAKE_COMPILE_OPTIONS = {"combo_kernels": True}


class _CapturedWake:
    """The one-token wake step of a `SleepCache` as a CUDA graph: captured on the second decoding step (the first
    runs eagerly on the capture stream, so that kernels are compiled and tuned) and replayed on every later one.
    Every input lives in the cache's own buffers, so sleeps in between keep it valid. Under `compile` the step is
    `torch.compile`d first: the first step compiles it, the second captures the compiled kernels."""

    def __init__(self, input_ids: Tensor, stream: torch.cuda.Stream, wake: Callable[..., Tensor]) -> None:
        self.stream, self.wake = stream, wake
        with torch.inference_mode(False):  # inputs that every replay overwrites in place
            self.input_ids = input_ids.clone()
            self.valid = torch.ones_like(input_ids, dtype=torch.bool)
        self.graph: torch.cuda.CUDAGraph | None = None
        self.logits: Tensor | None = None
        self.warm_logits: Tensor | None = None
        self.failed = False

    @classmethod
    def first_step(
        cls, cache: SleepCache, engine: SleepEngine, input_ids: Tensor, stream: torch.cuda.Stream
    ) -> _CapturedWake:
        wake = cache._wake
        if cache.compile:
            cache._packed_projections = pack_input_projections(engine.adapter.blocks)
            wake = torch.compile(wake, dynamic=False, options=WAKE_COMPILE_OPTIONS)
        captured = cls(input_ids, stream, wake)
        stream.wait_stream(torch.cuda.current_stream(stream.device))
        with torch.cuda.stream(stream):
            try:
                captured.warm_logits = captured.wake(engine, captured.input_ids, captured.valid, False)
            except RuntimeError as error:  # dynamo and inductor errors; a compile fails before the step changes state
                if not cache.compile:
                    raise
                _say_once("compiling", f"the wake step runs uncompiled: torch.compile failed ({error})")
                captured.wake = cache._wake
                captured.warm_logits = captured.wake(engine, captured.input_ids, captured.valid, False)
        torch.cuda.current_stream(stream.device).wait_stream(stream)
        return captured

    def replay(self, cache: SleepCache, engine: SleepEngine, input_ids: Tensor) -> Tensor:
        if self.failed:
            return cache._wake(engine, input_ids, self.valid, False)
        self.input_ids.copy_(input_ids)
        if self.graph is None:
            graph = torch.cuda.CUDAGraph()
            try:
                with torch.cuda.graph(graph, stream=self.stream):
                    self.logits = self.wake(engine, self.input_ids, self.valid, False)
            except RuntimeError as error:
                self.failed = True
                _capture_failed("decoding", "the wake step", error)
                return cache._wake(engine, input_ids, self.valid, False)
            self.graph = graph
        self.graph.replay()
        return self.logits.clone()


class _CapturedSleep:
    """The sleep of a full window (N passes, then eviction) as a CUDA graph, captured on its first use and replayed
    for every later full window whose start states and retained windows have the shapes it was warmed up with.

    The graph reads copies of the chunk, its start states and the retained windows, and keeps the stream index of
    the window it was captured on: masks see only distances between indices, so the same graph serves every window,
    and the windows it returns are moved to the true start."""

    def __init__(self, stream: torch.cuda.Stream, shapes: list) -> None:
        self.stream, self.shapes = stream, shapes
        self.graph: torch.cuda.CUDAGraph | None = None
        self.failed = False

    def fits(self, cache: SleepCache, padded: bool) -> bool:
        """Whether the current chunk can replay the graph: a full window without padding, inputs shaped as before."""
        full = cache.chunk_length == cache.chunk.ids.shape[1]
        return (
            not self.failed and full and not padded and _shapes(cache.chunk_start_states, cache.windows) == self.shapes
        )

    def run(self, cache: SleepCache, engine: SleepEngine) -> tuple[list[BlockState], list[KVWindow | None]] | None:
        """The new states and windows of the current chunk's sleep, or None where capture failed (sleep eagerly)."""
        if self.graph is None and not self._capture(cache, engine):
            return None
        self.ids.copy_(cache.chunk.ids)
        self.positions.copy_(cache.chunk.positions)
        self.valid.copy_(cache.chunk.valid)
        for into, state in zip(self.states, cache.chunk_start_states, strict=True):
            if into is not None:
                _copy_state(into, state)
        for into, window in zip(self.windows, cache.windows, strict=True):
            if into is not None:
                into.keys.copy_(window.keys)
                into.values.copy_(window.values)
                into.valid.copy_(window.valid)
        self.graph.replay()
        shift = cache.chunk_start - self.start
        return list(self.out_states), [
            None if w is None else w._replace(start=w.start + shift) for w in self.out_windows
        ]

    def _capture(self, cache: SleepCache, engine: SleepEngine) -> bool:
        with torch.inference_mode(False):  # inputs that every replay overwrites in place
            self.ids, self.positions, self.valid = cache.chunk.first(cache.chunk_length)
            self.states = [None if s is None else _clone_state(s) for s in cache.chunk_start_states]
            self.windows = [
                None if w is None else w._replace(keys=w.keys.clone(), values=w.values.clone(), valid=w.valid.clone())
                for w in cache.windows
            ]
        self.start = cache.chunk_start
        graph = torch.cuda.CUDAGraph()
        self.stream.wait_stream(torch.cuda.current_stream(self.stream.device))
        try:
            with torch.cuda.graph(graph, stream=self.stream):
                self.out_states, self.out_windows = engine.sleep(
                    self.ids, self.start, self.positions, self.states, self.windows, self.valid, False
                )
        except RuntimeError as error:
            self.failed = True
            _capture_failed("sleeping", "a window's sleep", error)
            return False
        self.graph = graph
        return True


def _clone_state(state: LinearState) -> LinearState:
    """A copy that later steps may update in place, also when it was made in inference mode."""
    with torch.inference_mode(False):
        return LinearState(state.recurrent.clone(), tuple(c.clone() for c in state.conv))


def _copy_state(into: LinearState, state: LinearState) -> None:
    into.recurrent.copy_(state.recurrent)
    for a, b in zip(into.conv, state.conv, strict=True):
        a.copy_(b)


def _shapes(states: list[BlockState], windows: list[KVWindow | None]) -> list:
    """What a captured sleep's inputs look like: each state's and window's tensor shapes (None where absent), and
    whether a window may hold padding (a window without it is attended without a mask)."""
    return [
        (None if s is None else s.recurrent.shape, None if w is None else (w.keys.shape, w.padded))
        for s, w in zip(states, windows, strict=True)
    ]


_SAID: set[str] = set()


def _capture_failed(step: str, what: str, error: Exception) -> None:
    """Say once per process that `step` stays eager because capturing `what` failed."""
    _say_once(step, f"{step} runs eagerly: capturing {what} as a CUDA graph failed ({error})")


def _say_once(key: str, message: str) -> None:
    if key not in _SAID:
        _SAID.add(key)
        warnings.warn(message, stacklevel=5)


class StreamCache(StreamingCache):
    """The keys, values and fast states of a model without sleep, so that `generate` feeds only the new tokens.

    Nothing is evicted: each attention block keeps every key it can still read (a sliding-window block its window),
    as a plain transformer's cache does. A model that runs its stack several times per token (Ouro's UT steps) keeps
    one set per pass, as Ouro's published cache keeps one KV slot per (step, layer).

    Attributes:
        states: `[pass][block]` fast state after the last token seen.
        windows: `[pass][block]` keys and values of the tokens seen (attention blocks), or None.
        seen: tokens seen so far (padding included).
        num_valid: `[B]` real tokens seen so far per row; RoPE positions count these.
    """

    def __init__(self) -> None:
        super().__init__()
        self.states: list[list[BlockState]] = []
        self.windows: list[list[KVWindow | None]] = []

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        """Beam search: keep the rows `beam_idx` of every state, window and count (nothing is evicted to undo)."""

        def rows(x: Tensor) -> Tensor:
            return x.index_select(0, beam_idx.to(x.device))

        self.states = [
            [None if s is None else LinearState(rows(s.recurrent), tuple(rows(c) for c in s.conv)) for s in states]
            for states in self.states
        ]
        self.windows = [
            [
                None if w is None else w._replace(keys=rows(w.keys), values=rows(w.values), valid=rows(w.valid))
                for w in ws
            ]
            for ws in self.windows
        ]
        if self.num_valid is not None:
            self.num_valid = rows(self.num_valid)

    def run(
        self, adapter: SleepAdapter, input_ids: Tensor, valid: Tensor, passes: int, positions: Tensor | None = None
    ) -> list[Tensor]:
        """Run `passes` passes of every block over the new tokens; return h after each pass, each `[B, T, D]`.

        `positions` (RoPE ids of the new tokens) default to counting the real tokens of the stream.
        """
        blocks = adapter.blocks
        if self.num_valid is None:
            self.states = [[None] * len(blocks) for _ in range(passes)]
            self.windows = [[None] * len(blocks) for _ in range(passes)]
            self.num_valid = valid.new_zeros(valid.shape[0], dtype=torch.long)
        elif len(self.states) != passes:
            raise ValueError(
                f"this cache holds {len(self.states)} pass(es) per token, and this call runs {passes}: keep the "
                "number of passes (ut_steps) fixed while streaming, or start a new cache"
            )
        if positions is None:
            positions = self.positions_after(self.num_valid, valid)
        chunk = Chunk(self.seen, positions, valid, adapter.rope(positions), None, not bool(valid.all()))
        h, outputs = adapter.embed(input_ids), []
        for states, windows in zip(self.states, self.windows, strict=True):
            for i, block in enumerate(blocks):
                h, states[i], own = block(h, states[i], windows[i], chunk)
                if own is not None:
                    windows[i] = join_readable(windows[i], own, block.kv_window)
            outputs.append(h)
        self.advance(valid)
        return outputs
