"""The task interface shared by the generators: seeded streams, `datasets` conversion, frozen eval sets and scoring.

A task generates an example in two steps. `sample` draws a *record*: the problem in a small JSON-able form (the frozen
eval files store records). `encode` turns a record into the training example: `input_ids`, `labels` (HF causal-LM
labels, -100 except on supervised tokens, whose label is the token itself; the trainer shifts), `attention_mask`
(0 on padding) and `difficulty`. Keeping the two apart lets a frozen record be re-encoded with another tokenizer
(gsm_infinite with the model's tokenizer) and keeps the files small.

Chunk alignment: the model cuts a sequence into chunks of `window` tokens and only the recurrent state crosses a chunk
boundary. The token at a chunk's first position is predicted from the previous chunk, so every format places a
query/separator token before its supervised tokens inside the same chunk (see data/README.md).
"""

from __future__ import annotations

import abc
import json
import random
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, TypedDict

import datasets
from transformers import PreTrainedTokenizerBase

from retrofit.shipped import shipped_dir

IGNORE_INDEX = -100
# The repository's data/ folder, which holds the frozen eval sets (data/<task>/eval.jsonl) and the tokenizers.
DATA_DIR = shipped_dir("data")
EVAL_SPLIT = "eval"


class Example(TypedDict):
    """One training/eval example; all lists have the same length."""

    input_ids: list[int]
    labels: list[int]
    attention_mask: list[int]
    difficulty: int


@dataclass(frozen=True)
class FrozenEval:
    """How a task's frozen eval set in data/ is generated: task options, examples per difficulty and seed."""

    options: dict[str, Any] = field(default_factory=dict)
    num_per_difficulty: int = 128
    seed: int = 0


FEATURES = datasets.Features(
    {
        "input_ids": datasets.Sequence(datasets.Value("int32")),
        "labels": datasets.Sequence(datasets.Value("int32")),
        "attention_mask": datasets.Sequence(datasets.Value("int8")),
        "difficulty": datasets.Value("int32"),
    }
)


def record_field(record: dict[str, Any], key: str, kind: type) -> Any:
    """`record[key]`, which must be a `kind` (list, str); `ValueError` naming the key otherwise."""
    if key not in record:
        raise ValueError(f"no field {key!r}")
    value = record[key]
    if not isinstance(value, kind):
        raise ValueError(f"{key} must be a {kind.__name__}, got {value!r}")
    return value


def check_int(value: Any, low: int, high: int | None, what: str) -> int:
    """`value` if it is an integer in [low, high] (`high=None`: at least `low`); `ValueError` naming `what` otherwise
    (JSON `true` is not an integer here)."""
    if not isinstance(value, int) or isinstance(value, bool) or value < low or (high is not None and value > high):
        bounds = f"in [{low}, {high}]" if high is not None else f">= {low}"
        raise ValueError(f"{what} must be an integer {bounds}, got {value!r}")
    return value


def int_field(record: dict[str, Any], key: str, low: int, high: int | None, what: str | None = None) -> int:
    """`record[key]`, an integer in [low, high] (see `check_int`); `ValueError` naming the key otherwise."""
    if key not in record:
        raise ValueError(f"no field {key!r}")
    return check_int(record[key], low, high, what or key)


class Task(abc.ABC):
    """A seeded, deterministic generator of supervised sequences for one task.

    Subclasses set `name`, `window` and `frozen_eval`, and implement `tokenizer`, `seq_len`, `eval_difficulties`,
    `sample` and `encode`.
    """

    name: ClassVar[str]
    # What an evaluation bucket's `difficulty` counts, in words (model cards and reports say it).
    difficulty_meaning: ClassVar[str] = "the difficulty bucket"
    frozen_eval: ClassVar[FrozenEval]
    # Options that shape every example of a bucket (not only which buckets there are): a frozen set measures this
    # task only where they equal the generating task's. Each is also the name of the attribute holding its value.
    frozen_eval_fixed: ClassVar[tuple[str, ...]] = ()
    # A task over a user's data evaluates on its own held-out split (`held_out`), not on a frozen or generated set.
    has_held_out: ClassVar[bool] = False
    # Whether exact match of all supervised tokens means something (not for `text`, whose every token is supervised).
    scores_exact_match: ClassVar[bool] = True
    window: int

    @property
    @abc.abstractmethod
    def tokenizer(self) -> PreTrainedTokenizerBase:
        """The tokenizer the examples are encoded with (the model's vocabulary must cover it)."""

    @property
    @abc.abstractmethod
    def seq_len(self) -> int:
        """T: the length of every example (gsm_infinite: the maximum length)."""

    @property
    @abc.abstractmethod
    def eval_difficulties(self) -> list[int]:
        """The difficulty buckets that evaluation reports."""

    @abc.abstractmethod
    def sample(self, rng: random.Random, difficulty: int | None = None) -> dict[str, Any]:
        """Draw one problem as a JSON-able record (with a "difficulty" key); `None` samples the training mix."""

    @abc.abstractmethod
    def encode(self, record: dict[str, Any]) -> Example:
        """Turn a record into token ids, labels and attention mask."""

    @abc.abstractmethod
    def check_record(self, record: dict[str, Any]) -> None:
        """Raise `ValueError` naming the field when `record` (a line of a JSONL file, say) is not one this task can
        encode. `encode` trusts its input, since `sample`'s records always pass, so a file is checked here first: a
        bad value would otherwise be an opaque KeyError, or (a negative index) a wrong token."""

    def example(self, rng: random.Random, difficulty: int | None = None) -> Example:
        """Draw one encoded example; `difficulty=None` samples from the training distribution."""
        return self.encode(self.sample(rng, difficulty))

    def train_example(self, seed: int, step: int, index: int, batch_size: int) -> Example:
        """Example `index` of the global batch of optimizer step `step`: drawn by its own generator, seeded with
        (task, seed, step, index), so the data a step sees depends on nothing else."""
        return self.example(random.Random(f"{self.name}/{seed}/train/step{step}/example{index}"))

    def held_out(self) -> datasets.Dataset:
        """The held-out split of a task over a user's data (`has_held_out`)."""
        raise NotImplementedError(f"{self.name} generates its evaluation examples")

    def _rng(self, seed: int, split: str, difficulty: int | None = None) -> random.Random:
        """The random generator of one stream; its seed mixes task, seed, split and difficulty, so streams differ."""
        return random.Random(f"{self.name}/{seed}/{split}/{difficulty}")

    def records(self, seed: int, split: str = "train", difficulty: int | None = None) -> Iterator[dict[str, Any]]:
        """Endless deterministic stream of records (see `stream`)."""
        rng = self._rng(seed, split, difficulty)
        while True:
            yield self.sample(rng, difficulty)

    def stream(self, seed: int, split: str = "train", difficulty: int | None = None) -> Iterator[Example]:
        """Endless deterministic stream of examples: the same (seed, split, difficulty) always gives the same stream."""
        for record in self.records(seed, split, difficulty):
            yield self.encode(record)

    def dataset(
        self, seed: int, num_examples: int, split: str = "train", difficulty: int | None = None
    ) -> datasets.Dataset:
        """The first `num_examples` of `stream(seed, split, difficulty)` as an in-memory `datasets.Dataset`."""
        stream = self.stream(seed, split, difficulty)
        return _to_dataset([next(stream) for _ in range(num_examples)])

    def iterable_dataset(
        self, seed: int, split: str = "train", difficulty: int | None = None
    ) -> datasets.IterableDataset:
        """`stream(seed, split, difficulty)` as an endless `datasets.IterableDataset`."""
        return datasets.IterableDataset.from_generator(
            self._generate, features=FEATURES, gen_kwargs={"seed": seed, "split": split, "difficulty": difficulty}
        )

    def _generate(self, seed: int, split: str, difficulty: int | None) -> Iterator[dict[str, Any]]:
        yield from self.stream(seed, split, difficulty)

    def eval_records(self, num_per_difficulty: int, seed: int = 0) -> list[dict[str, Any]]:
        """`num_per_difficulty` records for each of `eval_difficulties`, from the "eval" split, bucket by bucket."""
        records = []
        for difficulty in self.eval_difficulties:
            stream = self.records(seed, EVAL_SPLIT, difficulty)
            records.extend(next(stream) for _ in range(num_per_difficulty))
        return records

    def eval_dataset(self, num_per_difficulty: int, seed: int = 0) -> datasets.Dataset:
        """A freshly generated eval set: `eval_records` encoded."""
        return _to_dataset([self.encode(r) for r in self.eval_records(num_per_difficulty, seed)])

    def frozen_eval_path(self, path: str | Path | None = None) -> Path:
        """`path`, or this task's frozen eval set in data/ (`data/<task>/eval.jsonl`)."""
        return Path(path) if path is not None else DATA_DIR / self.name / "eval.jsonl"

    def frozen_eval_mismatch(self, path: str | Path | None = None) -> list[str]:
        """`option=value (frozen set: value)` for each option in `frozen_eval_fixed` on which this task differs from
        the task that generated the frozen set at `path` (default: data/), as told by the `spec.json` beside it that
        `export_frozen_eval` writes; a set without one is not checked. Raises `ValueError` when the spec's options do
        not make a task of this type."""
        spec_path = self.frozen_eval_path(path).with_name("spec.json")
        if not self.frozen_eval_fixed or not spec_path.is_file():
            return []
        spec = json.loads(spec_path.read_text())
        generator = type(self)(**spec.get("options", {}))
        return [
            f"{key}={getattr(self, key)!r} (frozen set: {getattr(generator, key)!r})"
            for key in self.frozen_eval_fixed
            if getattr(self, key) != getattr(generator, key)
        ]

    def load_frozen_eval(self, path: str | Path | None = None) -> datasets.Dataset:
        """Load a frozen eval set (JSONL of records; default `data/<task>/eval.jsonl`) and encode it with this task.

        Only the rows whose difficulty is one of this task's `eval_difficulties` are kept (e.g. a rule110 task
        trained at t=32 keeps only the t=32 rows).
        """
        path = self.frozen_eval_path(path)
        keep = set(self.eval_difficulties)
        examples = []
        with path.open() as f:
            for number, line in enumerate(f, start=1):
                if not line.strip():
                    continue
                try:
                    record = json.loads(line)
                    if not isinstance(record, dict):
                        raise ValueError(f"a record is a JSON object, got {type(record).__name__}")
                    self.check_record(record)
                    if record["difficulty"] in keep:
                        examples.append(self.encode(record))
                except ValueError as exc:  # json.JSONDecodeError is one
                    raise ValueError(f"{path}, line {number}: {exc}") from exc
        return _to_dataset(examples)

    def answer_spans(self, example: Example) -> list[tuple[int, int]]:
        """The `[start, end)` runs of supervised positions; each run is one answer (rule110: the 4 bits together)."""
        spans: list[tuple[int, int]] = []
        start = None
        labels = example["labels"]
        for i, label in enumerate([*labels, IGNORE_INDEX]):
            if label != IGNORE_INDEX and start is None:
                start = i
            elif label == IGNORE_INDEX and start is not None:
                spans.append((start, i))
                start = None
        return spans

    def score_answers(
        self, example: Example, predicted_token_ids: Sequence[int], *, logits_argmax: bool = False
    ) -> list[bool]:
        """Exact match of each answer span, in order.

        `predicted_token_ids[i]` is the predicted token at position i (aligned with `labels`). With `logits_argmax`
        the input is instead `logits.argmax(-1)` of one forward pass, whose entry i predicts position i + 1; it is
        shifted here.
        """
        predicted = (
            predicted_token_ids.tolist() if hasattr(predicted_token_ids, "tolist") else list(predicted_token_ids)
        )
        if logits_argmax:
            predicted = [IGNORE_INDEX, *predicted[:-1]]
        labels = example["labels"]
        if len(predicted) != len(labels):
            raise ValueError(f"got {len(predicted)} predictions for an example of length {len(labels)}")
        return [predicted[a:b] == labels[a:b] for a, b in self.answer_spans(example)]

    def score(self, example: Example, predicted_token_ids: Sequence[int], *, logits_argmax: bool = False) -> bool:
        """True when every supervised token is predicted exactly (see `score_answers` for the alignment)."""
        return all(self.score_answers(example, predicted_token_ids, logits_argmax=logits_argmax))


def _to_dataset(examples: list[Example]) -> datasets.Dataset:
    columns = {key: [ex[key] for ex in examples] for key in FEATURES}
    return datasets.Dataset.from_dict(columns, features=FEATURES)
