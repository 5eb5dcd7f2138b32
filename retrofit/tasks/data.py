"""Tasks over a user's data (`text`, `qa`, `chat`): records in, examples of at most `seq_len` tokens out.

Records come from files or the Hub (`records.load_records`) and are tokenized once through `datasets.map`, whose
cache makes a second run start in seconds. A fixed seed holds out `eval_fraction` of them (or the Hub split
`eval_split`) for evaluation, the same for every run.

Training order is a pure function of (seed, step), as for the generated tasks, so a resumed run sees exactly the
batches of an uninterrupted one. Each epoch is a seeded permutation; with `group_by_length` the permutation is cut
into groups of 64 batches, each group sorted by length and cut into batches, and the batches shuffled: examples of
similar length share a batch, so little of it is padding. An epoch drops the examples that do not fill a last batch.
"""

from __future__ import annotations

import abc
import random
from typing import Any, ClassVar

import datasets
from transformers import PreTrainedTokenizerBase

from .base import FEATURES, Example, FrozenEval, Task, check_int
from .records import SOURCE_COLUMN, RecordError, load_records
from .tokenizer import TokenizerLike, load_tokenizer

GROUP_BATCHES = 64  # batches per length-sorted group
HELD_OUT_SEED = 0  # the held-out split does not move with the run's seed, so runs evaluate on the same records


class DataTask(Task):
    """A task over records of a user's dataset; subclasses turn one record into examples (`encode_record`)."""

    frozen_eval: ClassVar[FrozenEval] = FrozenEval()
    difficulty_meaning: ClassVar[str] = "the records' `difficulty_field` (0 for all without one)"
    has_held_out: ClassVar[bool] = True

    def __init__(
        self,
        *,
        path: str,
        tokenizer: TokenizerLike,
        seq_len: int = 2048,
        split: str | None = None,
        eval_fraction: float = 0.1,
        eval_split: str | None = None,
        max_eval_examples: int | None = None,
        difficulty_field: str | None = None,
        group_by_length: bool = True,
    ) -> None:
        """`path`: a file, a folder or a Hub dataset (its `split`, default "train"); `eval_fraction` of the records
        (or the Hub split `eval_split`) are held out, at most `max_eval_examples` of them (a seeded choice);
        `difficulty_field`: an integer field that buckets evaluation."""
        check_int(seq_len, 2, None, "seq_len")
        if not 0 < eval_fraction < 1:
            raise ValueError(f"eval_fraction must be in (0, 1), got {eval_fraction!r}")
        self._tokenizer = load_tokenizer(tokenizer)
        self.check_tokenizer()
        self._seq_len, self.window = seq_len, seq_len
        self.difficulty_field, self.group_by_length = difficulty_field, group_by_length
        records = load_records(path, split=split)
        if eval_split is not None:
            train_records, eval_records = records, load_records(path, split=eval_split)
        else:
            held = records.train_test_split(test_size=eval_fraction, seed=HELD_OUT_SEED)
            train_records, eval_records = held["train"], held["test"]
        if max_eval_examples is not None and len(eval_records) > check_int(
            max_eval_examples, 1, None, "max_eval_examples"
        ):
            eval_records = eval_records.shuffle(seed=HELD_OUT_SEED).select(range(max_eval_examples))
        self.train_set, self.eval_set = self._tokenize(train_records), self._tokenize(eval_records)
        if len(self.train_set) == 0 or len(self.eval_set) == 0:
            raise ValueError(f"{path}: too few records for a training and an evaluation split")
        self._lengths = [len(ids) for ids in self.train_set["input_ids"]]
        self._orders: dict[tuple[int, int, int], list[int]] = {}

    # ------------------------------------------------------------------ what a subclass defines

    @abc.abstractmethod
    def encode_record(self, record: dict[str, Any]) -> list[Example]:
        """The examples of one record (a long `text` document gives several); `ValueError` naming the field when
        the record cannot be used."""

    def check_tokenizer(self) -> None:
        """`ValueError` when the tokenizer cannot encode this task's records (checked before any is read)."""

    # ------------------------------------------------------------------ the Task interface

    @property
    def tokenizer(self) -> PreTrainedTokenizerBase:
        return self._tokenizer

    @property
    def seq_len(self) -> int:
        return self._seq_len

    @property
    def eval_difficulties(self) -> list[int]:
        return sorted(set(self.eval_set["difficulty"]))

    def sample(self, rng: random.Random, difficulty: int | None = None) -> dict[str, Any]:
        """A random encoded training example (of bucket `difficulty` when given); training uses `train_example`."""
        rows = [i for i, d in enumerate(self.train_set["difficulty"]) if difficulty in (None, d)]
        return self.train_set[rows[rng.randrange(len(rows))]]

    def encode(self, record: dict[str, Any]) -> Example:
        return {key: record[key] for key in FEATURES}  # type: ignore[return-value]

    def check_record(self, record: dict[str, Any]) -> None:
        self.encode_record(record)

    def train_example(self, seed: int, step: int, index: int, batch_size: int) -> Example:
        """Example `index` of the global batch of `step`: position step x batch_size + index of the run's order."""
        position = step * batch_size + index
        epoch_length = self.epoch_length(batch_size)
        order = self.epoch_order(seed, position // epoch_length, batch_size)
        return self.encode(self.train_set[order[position % epoch_length]])

    def held_out(self) -> datasets.Dataset:
        """The held-out split, encoded: the evaluation set of a run on this task."""
        return self.eval_set

    # ------------------------------------------------------------------ order and padding

    def epoch_order(self, seed: int, epoch: int, batch_size: int) -> list[int]:
        """The training rows of `epoch`, in order, whole batches only (see the module docstring)."""
        key = (seed, epoch, batch_size)
        if key not in self._orders:
            count = self.epoch_length(batch_size)
            rng = random.Random(f"{self.name}/{seed}/epoch{epoch}")
            rows = list(range(len(self._lengths)))
            rng.shuffle(rows)
            if self.group_by_length:
                group = batch_size * GROUP_BATCHES
                rows = [r for i in range(0, len(rows), group) for r in sorted(rows[i : i + group], key=self._length)]
            batches = [rows[i : i + batch_size] for i in range(0, count, batch_size)]
            if self.group_by_length:
                rng.shuffle(batches)
            self._orders = {key: [r for batch in batches for r in batch]}  # keep one epoch
        return self._orders[key]

    def epoch_length(self, batch_size: int) -> int:
        """Training examples per epoch: whole batches of `batch_size`."""
        count = len(self._lengths) // batch_size * batch_size
        if count == 0:
            raise ValueError(
                f"{len(self._lengths)} training example(s) do not fill one batch of {batch_size}; "
                "lower train.batch_size or bring more data"
            )
        return count

    def _length(self, row: int) -> int:
        return -self._lengths[row]

    def padding_fraction(self, seed: int, batch_size: int, micro_batch_size: int) -> float:
        """The share of padding tokens in the micro-batches of the first epoch."""
        order = self.epoch_order(seed, 0, batch_size)
        padded = real = 0
        for start in range(0, len(order), micro_batch_size):
            lengths = [self._lengths[r] for r in order[start : start + micro_batch_size]]
            real += sum(lengths)
            padded += max(lengths) * len(lengths)
        return 1 - real / padded

    # ------------------------------------------------------------------ tokenization

    def _tokenize(self, records: datasets.Dataset) -> datasets.Dataset:
        """`records` encoded through `datasets.map` (cached): each row becomes its examples."""
        return records.map(
            self._encode_rows,
            batched=True,
            batch_size=256,
            remove_columns=records.column_names,
            features=FEATURES,
            desc=f"tokenizing {self.name} records",
        )

    def _encode_rows(self, rows: dict[str, list]) -> dict[str, list]:
        out: dict[str, list] = {key: [] for key in FEATURES}
        for i in range(len(rows[SOURCE_COLUMN])):
            record = {key: values[i] for key, values in rows.items()}
            try:
                examples = self.encode_record(record)
            except ValueError as exc:
                raise RecordError(f"{record[SOURCE_COLUMN]}: {exc}") from None
            for example in examples:
                for key in FEATURES:
                    out[key].append(example[key])
        return out

    # ------------------------------------------------------------------ helpers for subclasses

    def difficulty(self, record: dict[str, Any]) -> int:
        """The record's difficulty bucket: `difficulty_field` (an integer >= 0), or 0."""
        if self.difficulty_field is None:
            return 0
        if record.get(self.difficulty_field) is None:
            raise ValueError(f"no field {self.difficulty_field!r} (task.options.difficulty_field)")
        return check_int(record[self.difficulty_field], 0, None, self.difficulty_field)

    def text_field(self, record: dict[str, Any], field: str, option: str) -> str:
        """`record[field]`, a non-empty string; `ValueError` naming the field and the option that chose it.

        A dotted field reads a nested one ("answers.text"); a list of strings gives its first (SQuAD's answers)."""
        value: Any = record
        for part in field.split("."):
            value = value.get(part) if isinstance(value, dict) else None
        if isinstance(value, list) and value and all(isinstance(v, str) for v in value):
            value = value[0]
        if value is None:
            raise ValueError(f"no field {field!r} (task.options.{option})")
        if not isinstance(value, str):
            raise ValueError(f"field {field!r} must be a string, got {type(value).__name__}")
        if not value.strip():
            raise ValueError(f"field {field!r} is empty")
        return value

    def tokens(self, text: str) -> list[int]:
        return self._tokenizer(text, add_special_tokens=False)["input_ids"]

    @property
    def end_ids(self) -> list[int]:
        """What closes a document or an answer: the tokenizer's EOS."""
        return [self._tokenizer.eos_token_id] if self._tokenizer.eos_token_id is not None else []

    @staticmethod
    def make_example(input_ids: list[int], labels: list[int], difficulty: int) -> Example:
        return {
            "input_ids": input_ids,
            "labels": labels,
            "attention_mask": [1] * len(input_ids),
            "difficulty": difficulty,
        }
