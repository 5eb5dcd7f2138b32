"""`SleepConfig`: how a model sleeps. Saved in `config.json` as `sleep_config`."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Literal

Eviction = Literal["hard", "sliding"]
SleepOn = Literal["every_chunk", "context_only"]
Positions = Literal["global", "chunk"]
Checkpointing = Literal["none", "pass", "chunk"]

_CHOICES: dict[str, tuple[str, ...]] = {
    "eviction": ("hard", "sliding"),
    "sleep_on": ("every_chunk", "context_only"),
    "positions": ("global", "chunk"),
    "checkpointing": ("none", "pass", "chunk"),
}


class SleepConfigError(ValueError):
    """A `SleepConfig` field has a bad value; the message names the field and how to fix it."""


@dataclass(frozen=True)
class SleepConfig:
    """The sleep schedule of a retrofitted model (DESIGN.md, "Semantics").

    Attributes:
        window: L, the attention window in tokens. The sequence is cut into chunks of L tokens.
        passes: N, the recurrent passes of the loop range during sleep (N=1 is the plain hybrid).
        loop_range: `[start, stop)` block indices looped during sleep; `None` takes the model's default.
            Blocks before `start` (prelude) and from `stop` on (coda) run once.
        eviction: `hard` clears all KV at each chunk boundary; `sliding` keeps the wake-pass KV of the
            last L-1 tokens, so attention is a sliding window of L tokens.
        sleep_on: `every_chunk` gives every chunk that another follows a wake pass and a sleep (what
            inference does); `context_only` is the paper's Algorithm 1: chunks without loss tokens only
            sleep, chunks with loss tokens only wake.
        positions: `global` counts RoPE positions from the start of the sequence, `chunk` restarts them.
        checkpointing: `none`; `chunk` recomputes each chunk in backward (memory O(N passes of one chunk));
            `pass` recomputes each (chunk, pass) and keeps its inputs in host memory on CUDA, so GPU
            activation memory is O(one pass), whatever N and the sequence length.
        truncate_chunks: detach the fast state every k chunks (truncated BPTT); `None` is full BPTT.
        grad_passes: backprop only through the last m loop passes of a sleep; `None` is all passes.
        wake_passes: loop passes of the wake (prediction) pass; 1 as in the paper. The wake passes are
            reused as the first passes of the sleep that follows.
    """

    window: int = 2000
    passes: int = 1
    loop_range: tuple[int, int] | None = None
    eviction: Eviction = "hard"
    sleep_on: SleepOn = "every_chunk"
    positions: Positions = "global"
    checkpointing: Checkpointing = "none"
    truncate_chunks: int | None = None
    grad_passes: int | None = None
    wake_passes: int = 1

    def __post_init__(self) -> None:
        if isinstance(self.loop_range, list | tuple):
            object.__setattr__(self, "loop_range", tuple(self.loop_range))
        self._validate()

    def _validate(self) -> None:
        def fail(name: str, fix: str) -> None:
            raise SleepConfigError(f"sleep_config.{name} = {getattr(self, name)!r} is invalid: {fix}")

        for name in ("window", "passes", "wake_passes"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                fail(name, "it must be an integer >= 1")
        for name in ("truncate_chunks", "grad_passes"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 1):
                fail(name, "it must be an integer >= 1, or null to disable")
        for name, choices in _CHOICES.items():
            if getattr(self, name) not in choices:
                fail(name, f"choose one of {', '.join(choices)}")
        if self.wake_passes > self.passes:
            fail("wake_passes", f"it cannot exceed passes ({self.passes})")
        sleep_only = self.passes - self.wake_passes  # the passes after the wake's, where a truncation can start
        if self.grad_passes is not None and sleep_only < self.grad_passes < self.passes:
            fail(
                "grad_passes",
                f"the first {self.wake_passes} of the {self.passes} passes are the wake's (wake_passes), which keep "
                f"their gradients, so the last m passes can be the only ones with gradients for m <= {sleep_only}; "
                f"use grad_passes <= {sleep_only}, or null (or >= {self.passes}) for all passes",
            )
        if self.loop_range is not None:
            lr = self.loop_range
            if (
                not isinstance(lr, tuple)
                or len(lr) != 2
                or not all(isinstance(i, int) for i in lr)
                or not 0 <= lr[0] < lr[1]
            ):
                fail("loop_range", "it must be [start, stop) with 0 <= start < stop")

    def check_blocks(self, num_blocks: int) -> None:
        """Raise if `loop_range` does not fit a model of `num_blocks` blocks."""
        if self.loop_range is not None and self.loop_range[1] > num_blocks:
            raise SleepConfigError(
                f"sleep_config.loop_range = {list(self.loop_range)} is out of bounds: the model has "
                f"{num_blocks} blocks, so stop must be <= {num_blocks}"
            )

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict, as stored in `config.json`."""
        out = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        if out["loop_range"] is not None:
            out["loop_range"] = list(out["loop_range"])
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> SleepConfig:
        """Build from a dict, refusing unknown keys by name."""
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise SleepConfigError(f"sleep_config has unknown key(s) {unknown}; the known keys are {sorted(known)}")
        return cls(**data)

    def replace(self, **changes: Any) -> SleepConfig:
        """A copy with some fields changed (validated)."""
        return dataclasses.replace(self, **changes)
