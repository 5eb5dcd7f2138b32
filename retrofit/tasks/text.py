"""`text`: documents with the loss on every token.

A document (its `text_field`, followed by EOS) longer than `seq_len` is cut into sequences of `seq_len` tokens. With
`join_documents` short documents are instead joined, EOS between them, into full-length sequences: one stream whose
recurrent state carries from one document into the next, and no padding. Joining happens within each group of 256
records as they are tokenized; the last sequence of a group may be shorter.
"""

from __future__ import annotations

from typing import Any, ClassVar

from .base import Example
from .data import DataTask


class TextTask(DataTask):
    """Causal language modelling on documents."""

    name: ClassVar[str] = "text"
    scores_exact_match: ClassVar[bool] = False

    def __init__(self, *, text_field: str = "text", join_documents: bool = False, **options: Any) -> None:
        """`text_field`: the field holding a document; `join_documents`: join short documents (see above). The
        other options are `DataTask`'s."""
        self.text_field_name, self.join_documents = text_field, join_documents
        super().__init__(**options)

    def encode_record(self, record: dict[str, Any]) -> list[Example]:
        ids = self.tokens(self.text_field(record, self.text_field_name, "text_field")) + self.end_ids
        difficulty = self.difficulty(record)
        return [self.make_example(ids[i : i + self.seq_len], ids[i : i + self.seq_len], difficulty)
                for i in range(0, len(ids), self.seq_len)]  # fmt: skip

    def _encode_rows(self, rows: dict[str, list]) -> dict[str, list]:
        encoded = super()._encode_rows(rows)
        if not self.join_documents:
            return encoded
        out: dict[str, list] = {key: [] for key in encoded}
        stream: list[int] = []
        difficulty = encoded["difficulty"][0] if encoded["difficulty"] else 0
        for ids in encoded["input_ids"]:
            stream += ids
        for i in range(0, len(stream), self.seq_len):
            example = self.make_example(stream[i : i + self.seq_len], stream[i : i + self.seq_len], difficulty)
            for key in out:
                out[key].append(example[key])
        return out
