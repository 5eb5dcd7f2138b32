"""Read a recipe: YAML, `base:` inheritance, `--set` overrides, schema validation, one-line errors.

Inheritance: `base:` (a path relative to the file, or a list of them) is loaded first and the file's own keys are
deep-merged over it (mappings merge key by key; lists and scalars replace). Cycles are errors. Overrides
`--set a.b=c` apply last; `c` is parsed as YAML (`3`, `1.0e-3`, `[1, 2]`, `null`), and a list item is named by
its index (`--set stages.1.max_steps=50`, or `stages[1]` quoted against the shell). The loader remembers which
file (or which `--set`) gave each key, so an error names where to fix it; errors name list items as
`stages[1].trainable`.
"""

from __future__ import annotations

import difflib
import json
import os
import re
import shlex
from collections.abc import Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Union, get_args, get_origin

import yaml
from pydantic import BaseModel, ValidationError

from retrofit.recipes.schema import Recipe
from retrofit.shipped import shipped_recipes

KeyPath = tuple[str, ...]


class RecipeError(ValueError):
    """A recipe problem, told in one line: where (file or `--set`), which key, what is wrong and how to fix it."""

    def __init__(self, key: str, message: str, source: str | None = None) -> None:
        self.key, self.message, self.source = key, message, source
        super().__init__(self.line())

    def line(self) -> str:
        """The one-line message: `SOURCE: KEY: MESSAGE`."""
        parts = [p for p in (self.source, self.key) if p]
        return ": ".join([*parts, self.message])

    def with_source(self, source: str) -> RecipeError:
        """The same error, attributed to `source` (a file or a `--set` item)."""
        return RecipeError(self.key, self.message, source)


@dataclass(frozen=True)
class LoadedRecipe:
    """A validated recipe plus where each key came from (for error messages)."""

    recipe: Recipe
    path: Path
    sources: dict[KeyPath, str] = field(default_factory=dict)

    def error(self, error: RecipeError) -> RecipeError:
        """`error` attributed to the file (or `--set` item) that set its key."""
        return _attribute(error, self.sources, self.path)

    @contextmanager
    def attributing_errors(self) -> Iterator[None]:
        """Re-raise a `RecipeError` from building or running this recipe with the file that set its key."""
        try:
            yield
        except RecipeError as exc:
            raise self.error(exc) from None


def _recipe_path(name: str | os.PathLike) -> Path:
    """The recipe file `name`: a path, else the name of a shipped recipe (`rule110-tiny`, `replicate/depo`)."""
    path = Path(name)
    if path.is_file():
        return path
    shipped = shipped_recipes()
    if str(name) in shipped:
        return shipped[str(name)]
    close = difflib.get_close_matches(str(name), list(shipped), n=3)
    hint = f"did you mean {' or '.join(close)}?" if close else f"shipped recipes: {', '.join(shipped)}"
    raise RecipeError("", f"recipe file not found: {_display(path)} (check the path, or name a shipped recipe; {hint})")


def load_recipe(path: str | os.PathLike, overrides: Iterable[str] = ()) -> LoadedRecipe:
    """Load, merge, override and validate the recipe at `path` (or the shipped recipe of that name); raise
    `RecipeError` on any problem."""
    path = _recipe_path(path)
    sources: dict[KeyPath, str] = {}
    data = _load_with_bases(path.resolve(), [], sources)
    for item in overrides:
        _apply_override(data, item, sources)
    try:
        recipe = Recipe.model_validate(data)
    except ValidationError as exc:
        raise _attribute(_first_error(exc), sources, path) from None
    return LoadedRecipe(recipe, path, sources)


def short_key_names(keys: Sequence[str]) -> list[str]:
    """What to call each dotted recipe key where several are listed (sweep folders, report columns): its last part,
    or the whole key where two of `keys` share a last part (`optimizer.muon.lr`, `optimizer.adamw.lr`)."""
    last = [key.rsplit(".", 1)[-1] for key in keys]
    return [part if last.count(part) == 1 else key for key, part in zip(keys, last, strict=True)]


def dump_recipe(recipe: Recipe) -> str:
    """The full recipe (defaults filled in) as YAML, as saved in a run directory."""
    return yaml.safe_dump(recipe.model_dump(mode="json"), sort_keys=False)


# ---------------------------------------------------------------------------------------------- files


def _load_with_bases(path: Path, stack: list[Path], sources: dict[KeyPath, str]) -> dict[str, Any]:
    if path in stack:
        cycle = " -> ".join(_display(p) for p in [*stack[stack.index(path) :], path])
        raise RecipeError("base", f"inheritance cycle {cycle}; remove one of these base: links", _display(stack[-1]))
    data = _read_yaml(path)
    bases = data.pop("base", None)
    if bases is None:
        bases = []
    elif isinstance(bases, str):
        bases = [bases]
    elif not (isinstance(bases, list) and all(isinstance(b, str) for b in bases)):
        raise RecipeError("base", f"must be a path or a list of paths, got {bases!r}", _display(path))
    merged: dict[str, Any] = {}
    for base in bases:
        base_path = (path.parent / base).resolve()
        if not base_path.is_file():
            raise RecipeError(
                "base", f"file not found: {_display(base_path)} (paths are relative to this file)", _display(path)
            )
        merged = _deep_merge(merged, _load_with_bases(base_path, [*stack, path], sources))
    for key_path in _leaf_paths(data):
        sources[key_path] = _display(path)
    return _deep_merge(merged, data)


class _UniqueKeyLoader(yaml.SafeLoader):
    """YAML's safe loader, refusing a key repeated in one mapping (plain YAML keeps the last one silently, so a
    second `sleep:` section would drop the first one's settings)."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: set[Any] = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if key in seen:
                raise yaml.constructor.ConstructorError(
                    None, None, f"key {key!r} appears twice in one mapping; merge the two", key_node.start_mark
                )
            seen.add(key)
        return super().construct_mapping(node, deep=deep)


def _read_yaml(path: Path) -> dict[str, Any]:
    try:
        data = yaml.load(path.read_text(), Loader=_UniqueKeyLoader)  # a SafeLoader subclass
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise RecipeError("", f"invalid YAML{where}: {problem}", _display(path)) from None
    except OSError as exc:
        raise RecipeError("", f"cannot read the file: {exc.strerror}", _display(path)) from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise RecipeError("", f"a recipe must be a mapping of sections, got {type(data).__name__}", _display(path))
    return data


def _deep_merge(base: Mapping[str, Any], over: Mapping[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in over.items():
        if isinstance(value, Mapping) and isinstance(out.get(key), Mapping):
            out[key] = _deep_merge(out[key], value)
        else:
            out[key] = value
    return out


def _leaf_paths(data: Mapping[str, Any], prefix: KeyPath = ()) -> Iterable[KeyPath]:
    for key, value in data.items():
        path = (*prefix, str(key))
        if isinstance(value, Mapping) and value:
            yield from _leaf_paths(value, path)
        else:
            yield path


# ---------------------------------------------------------------------------------------------- overrides


def _apply_override(data: dict[str, Any], item: str, sources: dict[KeyPath, str]) -> None:
    source = f"--set {item}"
    key, sep, raw = item.partition("=")
    parts = key.strip().replace("[", ".").replace("]", "").split(".")
    if not sep or not all(parts):
        raise RecipeError("", "expected --set KEY.PATH=VALUE, e.g. --set train.max_steps=100", source)
    try:
        value = yaml.safe_load(raw)
    except yaml.YAMLError:
        if raw.lstrip().startswith(("[", "{")):
            hint = """quote each string in it, inside the shell's quotes: e.g. '["*"]', '{a: "*b"}'"""
        else:
            hint = f"write it as a quoted YAML string: --set {shlex.quote(f'{key}={json.dumps(raw)}')}"
        problem = f"cannot parse the value {raw!r} as YAML; {hint}"
        raise RecipeError(key, problem, source) from None
    node: dict[str, Any] | list[Any] = data
    for i, part in enumerate(parts[:-1]):
        if isinstance(node, list):
            child = node[_list_index(node, part, key, source)]
        else:
            child = node.get(part)
            if child is None:
                child = node[part] = {}
        if not isinstance(child, dict | list):
            where = ".".join(parts[: i + 1])
            raise RecipeError(
                key, f"{where} is a value ({child!r}), not a section; it has no key {parts[i + 1]!r}", source
            )
        node = child
    if isinstance(node, list):
        node[_list_index(node, parts[-1], key, source)] = value
    else:
        node[parts[-1]] = value
    sources[tuple(parts)] = source


def _list_index(items: list[Any], part: str, key: str, source: str) -> int:
    """`part` as an index into `items` (a list in the recipe), or a `RecipeError` saying which indices exist."""
    if not part.isdigit() or int(part) >= len(items):
        raise RecipeError(key, f"{part!r} is not an item of this list of {len(items)}, indexed from 0", source)
    return int(part)


# ---------------------------------------------------------------------------------------------- errors


def _attribute(error: RecipeError, sources: dict[KeyPath, str], path: Path) -> RecipeError:
    """Name the file or `--set` item that set the error's key (or its nearest parent); else the recipe file."""
    if error.source:
        return error
    parts = tuple(re.findall(r"[^.\[\]]+", error.key))
    while parts and parts not in sources:
        parts = parts[:-1]
    return error.with_source(sources[parts] if parts else _display(path))


def _first_error(exc: ValidationError) -> RecipeError:
    errors = exc.errors()
    err = errors[0]
    loc = tuple(str(p) for p in err["loc"])
    key = "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in err["loc"]).removeprefix(".")
    more = f" (and {len(errors) - 1} more problem(s))" if len(errors) > 1 else ""
    if err["type"] == "extra_forbidden":
        known = _known_keys(loc[:-1])
        close = difflib.get_close_matches(loc[-1], known, n=1)
        hint = f"did you mean {close[0]!r}? " if close else ""
        return RecipeError(key, f"unknown key; {hint}known keys here: {', '.join(known)}{more}")
    if err["type"] == "missing":
        return RecipeError(key, f"required key is missing; add it to the recipe{more}")
    message = err["msg"].removeprefix("Value error, ")
    if loc and "input" in err and not isinstance(err["input"], dict):
        message = f"{message} (got {_short(err['input'])})"
    return RecipeError(key, message + more)


def _known_keys(loc: KeyPath) -> list[str]:
    model: type[BaseModel] | None = Recipe
    for part in loc:
        if model is None:
            return []
        if part.isdigit():
            continue
        info = model.model_fields.get(part)
        model = _model_in(info.annotation) if info else None
    return sorted(model.model_fields) if model else []


def _model_in(annotation: Any) -> type[BaseModel] | None:
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    if get_origin(annotation) in (Union, list) or type(annotation).__name__ == "UnionType":
        for arg in get_args(annotation):
            found = _model_in(arg)
            if found:
                return found
    return None


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _display(path: Path) -> str:
    """`path` relative to the working directory when it lies under it, else absolute."""
    absolute = Path(path).absolute()
    try:
        return str(absolute.relative_to(Path.cwd()))
    except ValueError:
        return str(absolute)
