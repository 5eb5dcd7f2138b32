"""Tasks: the generators (Rule 110 rollout, Depo k-hop traversal, GSM-Infinite-style word problems) and the tasks
over a user's data (`text`, `qa`, `chat`).

`get_task(name, **options)` builds a task; see `Task` for the API and data/README.md for the token layouts.
`export_frozen_eval` writes the frozen eval sets and tokenizers that live in data/ (`python -m retrofit.tasks export`).
"""

from __future__ import annotations

import inspect
import json
from pathlib import Path
from typing import Any

from .base import DATA_DIR, EVAL_SPLIT, IGNORE_INDEX, Example, FrozenEval, Task
from .chat import ChatTask
from .data import DataTask
from .depo import DepoTask
from .gsm_infinite import GSMInfiniteTask
from .qa import QATask
from .records import RecordError
from .rule110 import Rule110Task
from .text import TextTask
from .tokenizer import build_word_tokenizer, load_tokenizer

_GENERATORS = (Rule110Task, DepoTask, GSMInfiniteTask)
_REGISTRY: dict[str, type[Task]] = {cls.name: cls for cls in (*_GENERATORS, TextTask, QATask, ChatTask)}
TASKS: tuple[str, ...] = tuple(_REGISTRY)
GENERATED_TASKS: tuple[str, ...] = tuple(cls.name for cls in _GENERATORS)
DATA_TASKS: tuple[str, ...] = ("text", "qa", "chat")


def task_class(name: str) -> type[Task]:
    """The class of the task `name` (one of `TASKS`)."""
    return _REGISTRY[name]


def task_options(name: str) -> list[str]:
    """The keyword options of the task `name` (a data task's include `DataTask`'s)."""
    cls = _REGISTRY[name]
    owners = [cls, DataTask] if issubclass(cls, DataTask) else [cls]
    names = [p.name for c in owners for p in inspect.signature(c.__init__).parameters.values()
             if p.name != "self" and p.kind is p.KEYWORD_ONLY]  # fmt: skip
    return list(dict.fromkeys(names))


def get_task(name: str, **options: Any) -> Task:
    """Build the task `name` (one of `TASKS`) with its keyword options."""
    if name not in _REGISTRY:
        raise ValueError(f"unknown task {name!r}; known tasks: {', '.join(TASKS)}")
    known = task_options(name)
    unknown = sorted(set(options) - set(known))
    if unknown:
        raise ValueError(f"{name} has no option {', '.join(unknown)}; its options are {', '.join(known)}")
    return _REGISTRY[name](**options)


def export_frozen_eval(
    name: str,
    out_dir: str | Path = DATA_DIR,
    *,
    options: dict[str, Any] | None = None,
    num_per_difficulty: int | None = None,
    seed: int | None = None,
) -> Path:
    """Write `<out_dir>/<name>/eval.jsonl` (one record per line) and `spec.json` (how it was generated).

    Defaults come from the task's `frozen_eval` (the files in data/); the arguments override them, e.g. the full
    1,600-problem GSM-Infinite set with the model's tokenizer. Tasks that use a local tokenizer also save it to
    `<out_dir>/tokenizers/<name>/`. Returns the JSONL path.
    """
    if name not in GENERATED_TASKS:
        raise ValueError(f"no frozen eval set for task {name!r}; tasks with one: {', '.join(GENERATED_TASKS)}")
    spec = _REGISTRY[name].frozen_eval
    options = dict(spec.options if options is None else options)
    num = spec.num_per_difficulty if num_per_difficulty is None else num_per_difficulty
    seed = spec.seed if seed is None else seed
    task = get_task(name, **options)
    records = task.eval_records(num, seed)
    out = Path(out_dir) / name
    out.mkdir(parents=True, exist_ok=True)
    path = out / "eval.jsonl"
    with path.open("w") as f:
        f.writelines(json.dumps(r, separators=(",", ":")) + "\n" for r in records)
    manifest = {
        "task": name,
        "options": options,
        "seed": seed,
        "split": EVAL_SPLIT,
        "num_per_difficulty": num,
        "difficulties": task.eval_difficulties,
        "num_examples": len(records),
        "seq_len": task.seq_len,
        "window": task.window,
    }
    (out / "spec.json").write_text(json.dumps(manifest, indent=2) + "\n")
    if "tokenizer" not in options:
        task.tokenizer.save_pretrained(Path(out_dir) / "tokenizers" / name)
    return path


__all__ = [
    "DATA_DIR",
    "DATA_TASKS",
    "GENERATED_TASKS",
    "IGNORE_INDEX",
    "TASKS",
    "ChatTask",
    "DataTask",
    "DepoTask",
    "Example",
    "FrozenEval",
    "GSMInfiniteTask",
    "QATask",
    "RecordError",
    "Rule110Task",
    "Task",
    "TextTask",
    "build_word_tokenizer",
    "export_frozen_eval",
    "get_task",
    "load_tokenizer",
    "task_class",
    "task_options",
]
