"""Rule 110 rollout (paper §4, §6.1): predict the first cell of 4 automata after t steps, one state per window.

Layout (T = 101, L = 24): positions 0..95 are 4 independent random 24-bit states ('0'/'1', one per chunk), position 96
is the query token `<t{t}>` that opens the 5th chunk, positions 97..100 are the labels: bit i is the first cell of state
i after t Rule-110 steps on a ring (periodic boundary). The query sits at the chunk start so the first label is
predicted from it and not from the previous chunk. The query token names t, so mixed-depth training is well posed;
with one t (the paper) it is a constant token.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from typing import Any, ClassVar

from transformers import PreTrainedTokenizerFast

from .base import IGNORE_INDEX, Example, FrozenEval, Task, int_field, record_field
from .tokenizer import build_word_tokenizer

NUM_STATES = 4
WIDTH = 24
MAX_STEPS = 128
_MASK = (1 << WIDTH) - 1


def rule110_step(cells: int) -> int:
    """One Rule-110 step of a ring of `WIDTH` cells packed in an int (string index j = bit j).

    Rule 110 as a formula: new = (center | right) & ~(left & center & right).
    """
    left = ((cells << 1) | (cells >> (WIDTH - 1))) & _MASK  # bit j <- cell j-1
    right = (cells >> 1) | ((cells & 1) << (WIDTH - 1))  # bit j <- cell j+1
    return (cells | right) & ~(left & cells & right) & _MASK


def first_cell_after(state: str, steps: int) -> int:
    """The first cell (string index 0) of a '0'/'1' state after `steps` Rule-110 steps."""
    cells = sum(1 << j for j, ch in enumerate(state) if ch == "1")
    for _ in range(steps):
        cells = rule110_step(cells)
    return cells & 1


class Rule110Task(Task):
    """Rule 110 rollout; difficulty = t (rollout steps)."""

    name: ClassVar[str] = "rule110"
    difficulty_meaning: ClassVar[str] = "the number of Rule 110 steps rolled out (t)"
    frozen_eval: ClassVar[FrozenEval] = FrozenEval(
        options={"steps_choices": [1, 2, 4, 8, 16, 32]}, num_per_difficulty=256
    )
    window = WIDTH

    def __init__(self, *, steps: int = 32, steps_choices: Sequence[int] | None = None) -> None:
        """`steps` is t for every example; `steps_choices` instead samples t uniformly from a list per example."""
        choices = sorted(set(steps_choices)) if steps_choices is not None else [steps]
        if not choices or not all(isinstance(t, int) and 1 <= t <= MAX_STEPS for t in choices):
            raise ValueError(f"rule110 steps must be integers in [1, {MAX_STEPS}], got {choices}")
        self.steps_choices = choices
        self._tokenizer = build_word_tokenizer(
            ["0", "1", *(self.query_token(t) for t in range(1, MAX_STEPS + 1))], char_level=True
        )
        self._vocab = self._tokenizer.get_vocab()

    @staticmethod
    def query_token(steps: int) -> str:
        """The query token that asks for the state after `steps` steps."""
        return f"<t{steps}>"

    @property
    def tokenizer(self) -> PreTrainedTokenizerFast:
        return self._tokenizer

    @property
    def seq_len(self) -> int:
        return NUM_STATES * WIDTH + 1 + NUM_STATES

    @property
    def eval_difficulties(self) -> list[int]:
        return list(self.steps_choices)

    def sample(self, rng: random.Random, difficulty: int | None = None) -> dict[str, Any]:
        steps = rng.choice(self.steps_choices) if difficulty is None else difficulty
        if not 1 <= steps <= MAX_STEPS:
            raise ValueError(f"rule110 steps must be in [1, {MAX_STEPS}], got {steps}")
        states = [format(rng.getrandbits(WIDTH), f"0{WIDTH}b") for _ in range(NUM_STATES)]
        answer = "".join(str(first_cell_after(s, steps)) for s in states)
        return {"difficulty": steps, "states": states, "answer": answer}

    def check_record(self, record: dict[str, Any]) -> None:
        steps = int_field(record, "difficulty", 1, MAX_STEPS, "difficulty (steps t)")
        states = record_field(record, "states", list)
        if len(states) != NUM_STATES or not all(_is_bits(s, WIDTH) for s in states):
            raise ValueError(f"states must be {NUM_STATES} strings of {WIDTH} '0'/'1' characters, got {states!r}")
        answer = record_field(record, "answer", str)
        expected = "".join(str(first_cell_after(s, steps)) for s in states)
        if answer != expected:
            raise ValueError(f"answer must be the first cells after {steps} steps, {expected!r}; got {answer!r}")

    def encode(self, record: dict[str, Any]) -> Example:
        vocab = self._vocab
        states = [vocab[ch] for state in record["states"] for ch in state]
        query = vocab[self.query_token(record["difficulty"])]
        answer = [vocab[ch] for ch in record["answer"]]
        input_ids = [*states, query, *answer]
        labels = [IGNORE_INDEX] * (len(states) + 1) + answer
        return {
            "input_ids": input_ids,
            "labels": labels,
            "attention_mask": [1] * len(input_ids),
            "difficulty": record["difficulty"],
        }


def _is_bits(value: Any, length: int) -> bool:
    """Whether `value` is a string of `length` '0'/'1' characters."""
    return isinstance(value, str) and len(value) == length and set(value) <= {"0", "1"}
