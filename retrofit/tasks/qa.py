"""`qa`: a context, a question and an answer, with the loss on the answer only.

An example reads `Question: {question}\n\n{context}\n\nAnswer: {answer}<EOS>` with `question_position: before` (the
paper's setting: under sleep the question is evicted long before the answer is due), or the context first with
`after`. The labels are the answer's tokens and the EOS. A record whose example is longer than `seq_len` is an error.
"""

from __future__ import annotations

from typing import Any, ClassVar, Literal

from .base import IGNORE_INDEX, Example
from .data import DataTask

QUESTION = "Question: {question}"
ANSWER_PROMPT = "\n\nAnswer:"


class QATask(DataTask):
    """Question answering over a long context; evaluation reports exact match of the answer."""

    name: ClassVar[str] = "qa"

    def __init__(
        self,
        *,
        context_field: str = "context",
        question_field: str = "question",
        answer_field: str = "answer",
        question_position: Literal["before", "after"] = "before",
        **options: Any,
    ) -> None:
        """The three fields name the record's strings; `question_position` puts the question before or after the
        context. The other options are `DataTask`'s."""
        if question_position not in ("before", "after"):
            raise ValueError(f"question_position must be 'before' or 'after', got {question_position!r}")
        self.fields = {"context_field": context_field, "question_field": question_field, "answer_field": answer_field}
        self.question_position = question_position
        super().__init__(**options)

    def encode_record(self, record: dict[str, Any]) -> list[Example]:
        context, question, answer = (self.text_field(record, field, option) for option, field in self.fields.items())
        parts = [QUESTION.format(question=question), context]
        prompt = "\n\n".join(parts if self.question_position == "before" else parts[::-1]) + ANSWER_PROMPT
        prompt_ids = self.tokens(prompt)
        answer_ids = self.tokens(" " + answer.strip()) + self.end_ids
        length = len(prompt_ids) + len(answer_ids)
        if length > self.seq_len:
            raise ValueError(
                f"the example is {length} tokens, longer than seq_len {self.seq_len}; raise task.options.seq_len "
                "or shorten the record"
            )
        labels = [IGNORE_INDEX] * len(prompt_ids) + answer_ids
        return [self.make_example(prompt_ids + answer_ids, labels, self.difficulty(record))]
