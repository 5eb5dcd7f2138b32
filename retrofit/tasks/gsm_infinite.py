"""GSM-Infinite-style arithmetic word problems (paper §6.3; Zhou et al. 2025), question first, no chain of thought.

A problem asks for one quantity ("Question: What is the number of owls in Maple Zoo?") and then gives a context of
sentences, each defining one quantity: a number ("The number of X equals 7."), or one operation on earlier quantities
("... equals 3 more than / 3 less than / 3 times the number of Y", "... equals the sum / the difference of the number
of Y and the number of Z"). The asked quantity is reached by a chain of `difficulty` operations (1..8); distractor
sentences about other quantities pad the problem to a target length drawn from [min_tokens, max_tokens] (2000-3300
tokens by default, counted with the task's tokenizer). All values stay in 0..99. Then come the separator " Answer:",
the answer (" 42") and the end token (EOS), with the loss on the answer and the end token.

Relevant sentences keep their dependency order; distractors are interleaved at random positions. Sequences have
variable length (at most `max_tokens`). Alignment: if " Answer:", the answer and the end token would straddle a chunk
boundary, the example is left-padded (attention_mask 0) so the separator opens the chunk; the answer's context then
lies in its own chunk.
"""

from __future__ import annotations

import itertools
import random
import re
from collections.abc import Callable, Iterator, Sequence
from typing import Any, ClassVar

from transformers import PreTrainedTokenizerBase

from .base import IGNORE_INDEX, Example, FrozenEval, Task, int_field, record_field
from .tokenizer import TokenizerLike, build_word_tokenizer, load_tokenizer

# fmt: off
ANIMALS = (
    "owls", "foxes", "wolves", "bears", "deer", "rabbits", "ducks", "geese", "otters", "beavers", "lions", "tigers",
    "zebras", "giraffes", "camels", "horses", "goats", "sheep", "cows", "pigs", "eagles", "hawks", "parrots",
    "penguins", "seals", "frogs", "turtles", "snakes", "lizards", "bats",
)
PLACE_NAMES = (
    "Maple", "Cedar", "Willow", "Oak", "Pine", "Birch", "Aspen", "Elm", "Juniper", "Spruce", "Hazel", "Laurel",
    "Poplar", "Alder", "Cypress",
)
# fmt: on
PLACE_KINDS = ("Zoo", "Park", "Farm", "Forest", "Ranch", "Reserve")
QUANTITIES = tuple(f"{a} in {p} {k}" for p in PLACE_NAMES for k in PLACE_KINDS for a in ANIMALS)

MAX_VALUE = 99
MAX_LEAF = 20
MAX_ADDEND = 20
MAX_FACTOR = 5
REDRAWS = 100  # draws of a relevant chain before a too-short max_tokens is an error
PROBES = 64  # chains of the most operations drawn when the task is built, to refuse a max_tokens too tight

QUESTION = "Question: What is the number of {x}?"
LEAF = "The number of {x} equals {n}."
ADD_CONST = "The number of {x} equals {n} more than the number of {y}."
SUB_CONST = "The number of {x} equals {n} less than the number of {y}."
MUL_CONST = "The number of {x} equals {n} times the number of {y}."
ADD_VAR = "The number of {x} equals the sum of the number of {y} and the number of {z}."
SUB_VAR = "The number of {x} equals the difference of the number of {y} and the number of {z}."
TEMPLATES = (QUESTION, LEAF, ADD_CONST, SUB_CONST, MUL_CONST, ADD_VAR, SUB_VAR)
SEPARATOR = " Answer:"

Quantity = tuple[str, int]  # (name, value)


def default_tokenizer() -> PreTrainedTokenizerBase:
    """The local word-level tokenizer: template words, quantity names and the numbers 0..99, lowercased."""
    texts = [*TEMPLATES, SEPARATOR, "in", *ANIMALS, *PLACE_NAMES, *PLACE_KINDS]
    words = [w.lower() for t in texts for w in re.findall(r"\w+|[^\w\s{}]+", t.replace("{", " {").replace("}", "} "))]
    words = [w for w in words if w not in ("x", "y", "z", "n")]
    numbers = [str(v) for v in range(MAX_VALUE + 1)]
    return build_word_tokenizer([*words, *numbers], lowercase=True, split_punctuation=True, eos=True)


class GSMInfiniteTask(Task):
    """GSM-Infinite-style problems; difficulty = number of operations to reach the asked quantity."""

    name: ClassVar[str] = "gsm_infinite"
    difficulty_meaning: ClassVar[str] = "the number of operations from the given numbers to the asked quantity"
    frozen_eval: ClassVar[FrozenEval] = FrozenEval(options={"min_tokens": 300, "max_tokens": 500}, num_per_difficulty=8)

    def __init__(
        self,
        *,
        tokenizer: TokenizerLike | None = None,
        min_tokens: int = 2000,
        max_tokens: int = 3300,
        ops_choices: Sequence[int] = tuple(range(1, 9)),
        window: int = 2000,
        distractor_leaf_prob: float = 0.25,
    ) -> None:
        """`tokenizer`: a path, Hub name or object (the model's tokenizer); default: the local word-level one.

        Problems are padded with distractors to a length in [min_tokens, max_tokens] tokens; operation counts are drawn
        uniformly from `ops_choices`; `window` is the L the answer is aligned to; `distractor_leaf_prob` is the share
        of distractors that are plain numbers rather than operations.
        """
        self._tokenizer = load_tokenizer(tokenizer) if tokenizer is not None else default_tokenizer()
        self.window = window
        self.min_tokens, self.max_tokens = min_tokens, max_tokens
        self.ops_choices = sorted(set(ops_choices))
        self.distractor_leaf_prob = distractor_leaf_prob
        tok = self._tokenizer
        self._answer_ids = tok([f" {v}" for v in range(MAX_VALUE + 1)], add_special_tokens=False)["input_ids"]
        eos = tok.eos_token_id
        self._end_ids = [eos] if eos is not None else tok("\n", add_special_tokens=False)["input_ids"]
        answer_segment = len(tok(SEPARATOR, add_special_tokens=False)["input_ids"]) + len(self._end_ids)
        answer_segment += max(len(ids) for ids in self._answer_ids)
        if answer_segment > window:
            raise ValueError(f"gsm_infinite window {window} is shorter than the answer segment ({answer_segment})")
        # Alignment may left-pad by up to answer_segment - 1 tokens; problems leave that room below max_tokens.
        # Distractors are added until the target length is reached, so the last one may overshoot it by up to
        # `_max_group` tokens (a sum of three long names plus the definition of a new number).
        self._length_budget = max_tokens - answer_segment + 1
        name_lengths = self._num_tokens(QUANTITIES)
        longest = QUANTITIES[name_lengths.index(max(name_lengths))]
        group = [LEAF.format(x=longest, n=MAX_LEAF), SUB_VAR.format(x=longest, y=longest, z=longest)]
        self._max_group = sum(self._num_tokens(group))
        if not 1 <= min_tokens <= self._length_budget - self._max_group:
            raise ValueError(
                f"gsm_infinite needs 1 <= min_tokens <= max_tokens - {answer_segment - 1 + self._max_group} "
                f"with this tokenizer, got min_tokens={min_tokens}, max_tokens={max_tokens}"
            )
        if not self.ops_choices or min(self.ops_choices) < 1:
            raise ValueError(f"gsm_infinite ops_choices must be positive integers, got {list(ops_choices)}")
        # Chains too long for max_tokens are drawn again (`sample`); refuse a max_tokens that most would not fit.
        ops, probe = max(self.ops_choices), random.Random("gsm_infinite/max_tokens")
        lengths = sorted(self._fixed_tokens(*self._relevant_chain(probe, ops)[1:]) for _ in range(PROBES))
        least = -(-PROBES // 4)  # a quarter of them must fit: then REDRAWS draws all failing is never seen
        if lengths[least - 1] > self._length_budget:
            raise ValueError(
                f"gsm_infinite max_tokens={max_tokens} is too short for {ops}-operation problems: fewer than a "
                f"quarter of {PROBES} drawn fit; raise it to {lengths[least - 1] + answer_segment - 1} or more "
                f"(with this tokenizer), or lower ops_choices"
            )

    @property
    def tokenizer(self) -> PreTrainedTokenizerBase:
        return self._tokenizer

    @property
    def seq_len(self) -> int:
        return self.max_tokens

    @property
    def eval_difficulties(self) -> list[int]:
        return list(self.ops_choices)

    def _fixed_tokens(self, question: str, relevant: Sequence[str], answer: int) -> int:
        """A problem's tokens before its distractors: question, relevant sentences, separator, answer, end."""
        fixed = len(self._tokenizer(question, add_special_tokens=False)["input_ids"]) + sum(self._num_tokens(relevant))
        fixed += len(self._tokenizer(SEPARATOR, add_special_tokens=False)["input_ids"])
        return fixed + len(self._answer_ids[answer]) + len(self._end_ids)

    def _num_tokens(self, sentences: Sequence[str]) -> list[int]:
        ids = self._tokenizer([" " + s for s in sentences], add_special_tokens=False)["input_ids"]
        return [len(x) for x in ids]

    def _relevant_chain(self, rng: random.Random, ops: int) -> tuple[Iterator[str], str, list[str], int]:
        """A number, then `ops` operations, each on the previous quantity: the names left over (for distractors),
        the question, the relevant sentences in dependency order, and the answer."""
        names = iter(rng.sample(QUANTITIES, len(QUANTITIES)))
        chain: list[Quantity] = [(next(names), rng.randint(0, MAX_LEAF))]
        relevant = [LEAF.format(x=chain[0][0], n=chain[0][1])]
        for _ in range(ops):
            sentences, quantity = _operation(rng, next(names), chain[-1], chain[:-1], names.__next__)
            relevant += sentences
            chain.append(quantity)
        target, answer = chain[-1]
        return names, QUESTION.format(x=target), relevant, answer

    def sample(self, rng: random.Random, difficulty: int | None = None) -> dict[str, Any]:
        ops = rng.choice(self.ops_choices) if difficulty is None else difficulty
        if ops < 1:
            raise ValueError(f"gsm_infinite needs at least one operation, got {ops}")
        # A chain too long for max_tokens (long names, many operations, a short max_tokens) is drawn again.
        for _ in range(REDRAWS):
            names, question, relevant, answer = self._relevant_chain(rng, ops)
            fixed = self._fixed_tokens(question, relevant, answer)
            if fixed <= self._length_budget:
                break
        else:
            raise ValueError(
                f"gsm_infinite max_tokens={self.max_tokens} leaves too little room for {ops}-operation problems: "
                f"{REDRAWS} draws found none that fits; raise max_tokens or lower ops_choices"
            )

        # Distractors until the target length: own quantities, never referring to the relevant ones.
        total = fixed
        target = rng.randint(self.min_tokens, self._length_budget - self._max_group)
        distractors: list[str] = []
        for sentences, cost in self._with_lengths(self._distractors(rng, names)):
            if total >= target or total + cost > self._length_budget:
                break
            distractors += sentences
            total += cost

        is_relevant = [True] * len(relevant) + [False] * len(distractors)
        rng.shuffle(is_relevant)
        rel, dis = iter(relevant), iter(distractors)
        context = [next(rel) if r else next(dis) for r in is_relevant]
        return {"difficulty": ops, "question": question, "context": context, "answer": answer}

    def _distractors(self, rng: random.Random, names: Iterator[str]) -> Iterator[list[str]]:
        """Distractor sentence groups (an operation may bring the definition of a new number with it), until the
        quantity names run out."""
        defined: list[Quantity] = []
        try:
            while True:
                if not defined or rng.random() < self.distractor_leaf_prob:
                    quantity = (next(names), rng.randint(0, MAX_LEAF))
                    sentences = [LEAF.format(x=quantity[0], n=quantity[1])]
                else:
                    sentences, quantity = _operation(
                        rng, next(names), rng.choice(defined), defined, lambda: next(names)
                    )
                defined.append(quantity)
                yield sentences
        except StopIteration:
            return

    def _with_lengths(self, groups: Iterator[list[str]]) -> Iterator[tuple[list[str], int]]:
        """Pair each sentence group with its token count, tokenizing groups in batches of 32."""
        while batch := list(itertools.islice(groups, 32)):
            lengths = self._num_tokens([s for sentences in batch for s in sentences])
            for sentences in batch:
                yield sentences, sum(lengths[: len(sentences)])
                lengths = lengths[len(sentences) :]

    def check_record(self, record: dict[str, Any]) -> None:
        int_field(record, "difficulty", 1, None, "difficulty (operations)")
        record_field(record, "question", str)
        context = record_field(record, "context", list)
        if not all(isinstance(sentence, str) for sentence in context):
            raise ValueError("context must be a list of sentences (strings)")
        int_field(record, "answer", 0, MAX_VALUE)

    def encode(self, record: dict[str, Any]) -> Example:
        tok = self._tokenizer
        pieces = [record["question"], *(" " + s for s in record["context"]), SEPARATOR]
        ids = list(itertools.chain.from_iterable(tok(pieces, add_special_tokens=False)["input_ids"]))
        sep_start = len(ids) - len(tok(SEPARATOR, add_special_tokens=False)["input_ids"])
        answer = [*self._answer_ids[record["answer"]], *self._end_ids]
        end = len(ids) + len(answer)
        num_pad = 0 if sep_start // self.window == (end - 1) // self.window else self.window - sep_start % self.window
        input_ids = [tok.pad_token_id] * num_pad + ids + answer
        return {
            "input_ids": input_ids,
            "labels": [IGNORE_INDEX] * (num_pad + len(ids)) + answer,
            "attention_mask": [0] * num_pad + [1] * (len(ids) + len(answer)),
            "difficulty": record["difficulty"],
        }


def _operation(
    rng: random.Random, name: str, operand: Quantity, others: Sequence[Quantity], fresh: Callable[[], str]
) -> tuple[list[str], Quantity]:
    """Define `name` by one operation on `operand` (and maybe a second quantity), keeping values in 0..MAX_VALUE.

    The second operand of a sum or difference is one of `others` when one fits, else a new number, whose definition
    is returned before the operation's sentence. Returns (sentences, (name, value)).
    """
    y, yv = operand
    kinds = ["add_var", "sub_var"]
    kinds += ["add_const"] if yv < MAX_VALUE else []
    kinds += ["sub_const"] if yv >= 1 else []
    kinds += ["mul_const"] if 1 <= yv <= MAX_VALUE // 2 else []
    kind = rng.choice(kinds)
    if kind == "add_const":
        n = rng.randint(1, min(MAX_ADDEND, MAX_VALUE - yv))
        return [ADD_CONST.format(x=name, n=n, y=y)], (name, yv + n)
    if kind == "sub_const":
        n = rng.randint(1, min(MAX_ADDEND, yv))
        return [SUB_CONST.format(x=name, n=n, y=y)], (name, yv - n)
    if kind == "mul_const":
        n = rng.randint(2, min(MAX_FACTOR, MAX_VALUE // yv))
        return [MUL_CONST.format(x=name, n=n, y=y)], (name, yv * n)
    limit = MAX_VALUE - yv if kind == "add_var" else yv
    fits = [q for q in others if q[0] != y and q[1] <= limit]
    before = []
    if fits and rng.random() < 0.5:
        z, zv = rng.choice(fits)
    else:
        z, zv = fresh(), rng.randint(0, min(MAX_LEAF, limit))
        before = [LEAF.format(x=z, n=zv)]
    if kind == "add_var":
        return [*before, ADD_VAR.format(x=name, y=y, z=z)], (name, yv + zv)
    return [*before, SUB_VAR.format(x=name, y=y, z=z)], (name, yv - zv)
