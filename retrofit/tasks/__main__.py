"""Command line for the task generators.

    python -m retrofit.tasks export [--out data/] [--task NAME ...]      # regenerate the frozen eval sets in data/
    python -m retrofit.tasks export --task gsm_infinite --num-per-difficulty 200 \\
        --set min_tokens=2000 --set max_tokens=3300 --set tokenizer=PATH --out runs/gsm_eval   # the full 1,600 set
    python -m retrofit.tasks show rule110 [--difficulty 8] [--set steps=8]                  # print one example
"""

from __future__ import annotations

import argparse
import json
import random
from typing import Any

from . import DATA_DIR, GENERATED_TASKS, export_frozen_eval, get_task


def _parse_sets(pairs: list[str]) -> dict[str, Any]:
    """`key=value` pairs; values are parsed as JSON when they are JSON ("8", "[1,2]"), else kept as strings."""
    options: dict[str, Any] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep:
            raise SystemExit(f"--set expects key=value, got {pair!r}")
        try:
            options[key] = json.loads(value)
        except json.JSONDecodeError:
            options[key] = value
    return options


def main(argv: list[str] | None = None) -> None:
    """Entry point of `python -m retrofit.tasks`."""
    parser = argparse.ArgumentParser(prog="python -m retrofit.tasks", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    export = sub.add_parser("export", help="write frozen eval sets (JSONL records) and local tokenizers")
    export.add_argument("--out", default=str(DATA_DIR), help="output folder (default: the repository's data/)")
    export.add_argument(
        "--task", action="append", choices=GENERATED_TASKS, help="task to export (repeatable; default: all)"
    )
    export.add_argument("--num-per-difficulty", type=int, help="examples per difficulty (default: the frozen spec)")
    export.add_argument("--seed", type=int, help="seed of the eval streams (default: the frozen spec)")
    export.add_argument("--set", action="append", default=[], help="task option key=value, replacing the frozen ones")
    show = sub.add_parser("show", help="print one example as text")
    show.add_argument("task", choices=GENERATED_TASKS)
    show.add_argument("--difficulty", type=int)
    show.add_argument("--seed", type=int, default=0)
    show.add_argument("--set", action="append", default=[], help="task option key=value")
    args = parser.parse_args(argv)
    try:
        _run(args, parser)
    except ValueError as exc:  # a task option (named)
        parser.error(str(exc))


def _run(args: argparse.Namespace, parser: argparse.ArgumentParser) -> None:
    if args.command == "export":
        options = _parse_sets(args.set) or None
        if options and not args.task:
            parser.error("--set gives the options of one task: name it with --task")
        for name in args.task or GENERATED_TASKS:
            path = export_frozen_eval(
                name, args.out, options=options, num_per_difficulty=args.num_per_difficulty, seed=args.seed
            )
            print(f"wrote {path}")
    else:
        task = get_task(args.task, **_parse_sets(args.set))
        example = task.example(random.Random(args.seed), args.difficulty)
        supervised = [t for t, label in zip(example["input_ids"], example["labels"], strict=True) if label != -100]
        print(task.tokenizer.decode(example["input_ids"], skip_special_tokens=True))
        print(f"difficulty={example['difficulty']} length={len(example['input_ids'])} window={task.window}")
        print(f"supervised: {task.tokenizer.decode(supervised)!r}")


if __name__ == "__main__":
    main()
