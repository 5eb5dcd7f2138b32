"""`chat`: conversations rendered with the tokenizer's chat template, with the loss on the assistant turns only.

A record's `messages_field` is a list of `{"role", "content"}` messages. The assistant turns are found by rendering
the conversation turn by turn: the text an assistant turn adds after the template's generation prompt is supervised
(its closing tokens too, so the model learns to stop). A template that does not render turns as a growing prefix, a
conversation without an assistant turn, and one longer than `seq_len` are errors.
"""

from __future__ import annotations

from typing import Any, ClassVar

from .base import IGNORE_INDEX, Example
from .data import DataTask


class ChatTask(DataTask):
    """Supervised fine-tuning on conversations."""

    name: ClassVar[str] = "chat"

    def __init__(self, *, messages_field: str = "messages", **options: Any) -> None:
        """`messages_field`: the field holding the list of messages. The other options are `DataTask`'s."""
        self.messages_field = messages_field
        super().__init__(**options)

    def check_tokenizer(self) -> None:
        if not self.tokenizer.chat_template:
            raise ValueError(
                f"tokenizer {self.tokenizer.name_or_path!r} has no chat template; give task.options.tokenizer one "
                "that has (an instruct model's), or use the text task"
            )

    def encode_record(self, record: dict[str, Any]) -> list[Example]:
        messages = self._messages(record)
        text = self._render(messages, generation_prompt=False)
        spans = []
        for i, message in enumerate(messages):
            if message["role"] != "assistant":
                continue
            before = self._render(messages[:i], generation_prompt=True)
            through = self._render(messages[: i + 1], generation_prompt=False)
            if not (through.startswith(before) and text.startswith(through)):
                raise ValueError(
                    "the tokenizer's chat template does not render this conversation turn by turn as a growing "
                    "text, so the assistant turns cannot be found; use a template that does"
                )
            spans.append((len(before), len(through)))
        encoding = self.tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
        ids = encoding["input_ids"]
        if len(ids) > self.seq_len:
            raise ValueError(
                f"the conversation is {len(ids)} tokens, longer than seq_len {self.seq_len}; raise "
                "task.options.seq_len or shorten the record"
            )
        labels = [
            token if any(a <= begin < b for a, b in spans) else IGNORE_INDEX
            for token, (begin, _) in zip(ids, encoding["offset_mapping"], strict=True)
        ]
        return [self.make_example(ids, labels, self.difficulty(record))]

    def _messages(self, record: dict[str, Any]) -> list[dict[str, str]]:
        messages = record.get(self.messages_field)
        if messages is None:
            raise ValueError(f"no field {self.messages_field!r} (task.options.messages_field)")
        if not isinstance(messages, list) or not all(
            isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)
            for m in messages
        ):
            raise ValueError(f"field {self.messages_field!r} must be a list of {{role, content}} messages")
        if not any(m["role"] == "assistant" for m in messages):
            raise ValueError(f"field {self.messages_field!r} has no assistant turn, so nothing to learn")
        return [{"role": m["role"], "content": m["content"]} for m in messages]

    def _render(self, messages: list[dict[str, str]], *, generation_prompt: bool) -> str:
        return self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation_prompt)
