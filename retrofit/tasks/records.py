"""A user's records as a `datasets.Dataset`: local JSONL/JSON/CSV/Parquet files, folders of them, or a Hub dataset.

Every row keeps where it came from (`SOURCE_COLUMN`: "file, row N", 1-based; a JSONL row is its line when the file
has no blank lines), so that an error about a record names the file, the row and the field.
"""

from __future__ import annotations

import json
from pathlib import Path

import datasets

SOURCE_COLUMN = "_source"
BUILDERS = {".jsonl": "json", ".json": "json", ".csv": "csv", ".parquet": "parquet"}


class RecordError(ValueError):
    """A record (or a file of them) that a data task cannot use; the message names the file, the row and the field."""


def load_records(path: str, *, split: str | None = None) -> datasets.Dataset:
    """The records at `path`: a file, a folder of files (sorted by name), or else a Hub dataset name (`split`,
    default "train"), each row with its source in `SOURCE_COLUMN`."""
    local = Path(path)
    if local.is_file() or local.is_dir():
        files = [local] if local.is_file() else sorted(f for f in local.rglob("*") if f.suffix in BUILDERS)
        if not files:
            raise RecordError(f"{path}: no {', '.join(BUILDERS)} files in this folder")
        return _concatenate([_load_file(f) for f in files], files)
    if path.startswith((".", "/", "~")) or local.suffix in BUILDERS:
        raise RecordError(f"{path}: no such file or folder")
    try:
        dataset = datasets.load_dataset(path, split=split or "train")
    except Exception as exc:  # datasets raises many kinds (network, missing split, missing config)
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise RecordError(f"{path}: cannot load it as a file, a folder or a Hub dataset: {first}") from None
    return dataset.map(lambda _, i: {SOURCE_COLUMN: f"{path}[{split or 'train'}], row {i + 1}"}, with_indices=True)


def _load_file(file: Path) -> datasets.Dataset:
    if file.suffix not in BUILDERS:
        raise RecordError(f"{file}: not a data file; use one of {', '.join(BUILDERS)}")
    try:
        dataset = datasets.load_dataset(BUILDERS[file.suffix], data_files=str(file), split="train")
    except Exception as exc:  # the builders' parse errors carry no line; find it for the message
        raise RecordError(_parse_error(file, exc)) from None
    return dataset.map(lambda _, i: {SOURCE_COLUMN: f"{file}, row {i + 1}"}, with_indices=True)


def _concatenate(parts: list[datasets.Dataset], files: list[Path]) -> datasets.Dataset:
    """The files' records as one dataset; every file must have the first one's fields (JSON's and CSV's strings are
    the same kind)."""
    parts = [_plain_strings(part) for part in parts]
    for part, file in zip(parts[1:], files[1:], strict=True):
        if set(part.column_names) != set(parts[0].column_names):
            fields = sorted(set(parts[0].column_names) - {SOURCE_COLUMN})
            raise RecordError(f"{file}: its fields differ from those of {files[0]} ({', '.join(fields)})")
    try:
        return datasets.concatenate_datasets([p.cast(parts[0].features) for p in parts])
    except (ValueError, TypeError) as exc:
        raise RecordError(f"{files[0].parent}: the files' fields have different types ({exc})") from None


def _plain_strings(dataset: datasets.Dataset) -> datasets.Dataset:
    large = [k for k, v in dataset.features.items() if getattr(v, "dtype", None) == "large_string"]
    return (
        dataset.cast(datasets.Features({**dataset.features, **{k: datasets.Value("string") for k in large}}))
        if large
        else dataset
    )


def _parse_error(file: Path, exc: Exception) -> str:
    """One line saying where `file` stops parsing: for JSON Lines, the first line that is not a JSON object."""
    if file.suffix == ".jsonl":
        kinds: dict[str, str] = {}  # a field's JSON type in the first record that has it (null fits any)
        with file.open(encoding="utf-8", errors="replace") as f:
            for number, line in enumerate(f, start=1):
                if not line.strip():
                    continue
                try:
                    record = json.loads(line)
                except json.JSONDecodeError as error:
                    return f"{file}, line {number}: not valid JSON ({error.msg}); fix or remove the line"
                if not isinstance(record, dict):
                    return f"{file}, line {number}: a record is a JSON object, got {type(record).__name__}"
                for key, value in record.items():
                    kind = type(value).__name__
                    if value is not None and kinds.setdefault(key, kind) != kind:
                        return (
                            f"{file}, line {number}: field {key!r} is a {kind}, but a {kinds[key]} in earlier "
                            "records; give every record the same type"
                        )
    first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    return f"{file}: cannot be read as {BUILDERS[file.suffix]} ({first})"
