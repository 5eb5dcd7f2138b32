"""Turn a validated recipe into the objects a run needs: task, sleep config, model config.

These are the checks that need more than the schema: task options (the task's own constructor checks them),
the sleep fields (`SleepConfig` checks them), the model config's keys and types, the vocabulary against the
task's tokenizer, and the loop range against the model's block count. Every failure is a `RecipeError` that
names the recipe key to fix. Nothing here builds weights.
"""

from __future__ import annotations

import typing
from dataclasses import dataclass, fields, is_dataclass
from pathlib import Path
from typing import Any

import torch
from pydantic import TypeAdapter, ValidationError
from transformers import AutoConfig, PreTrainedConfig

import retrofit  # noqa: F401  (registers the model families with AutoConfig)
from retrofit.config import SleepConfig, SleepConfigError
from retrofit.recipes.loader import RecipeError
from retrofit.recipes.schema import Recipe
from retrofit.tasks import DATA_DIR, Task, get_task

DEFAULT_MODEL_TYPE = "sleep_hybrid"


@dataclass(frozen=True)
class ResolvedRecipe:
    """A recipe with its task, eval task, sleep config and model config built and cross-checked."""

    recipe: Recipe
    task: Task
    eval_task: Task
    sleep: SleepConfig
    model_config: PreTrainedConfig


def resolve(recipe: Recipe) -> ResolvedRecipe:
    """Build and cross-check everything but the weights; raise `RecipeError` naming the key to fix."""
    if recipe.adapter is not None:
        raise RecipeError("adapter", "adapters (LoRA) are not supported by this version yet; remove the section")
    if recipe.stages is not None:
        raise RecipeError("stages", "staged training is not supported by this version yet; remove the section")
    task = _task(recipe.task.name, recipe.task.options, "task.options")
    eval_task = _task(recipe.task.name, {**recipe.task.options, **recipe.eval.task_options}, "eval.task_options")
    sleep = sleep_config(recipe.sleep, task.window)
    if recipe.eval.source == "frozen":
        frozen = Path(recipe.eval.path) if recipe.eval.path else DATA_DIR / task.name / "eval.jsonl"
        if not frozen.is_file():
            raise RecipeError(
                "eval.path", f"no frozen eval set at {frozen}; fix the path or use eval.source: generated"
            )
    model_config = _model_config(recipe, len(task.tokenizer))
    num_blocks = getattr(model_config, "num_hidden_layers", None)
    if isinstance(num_blocks, int):
        try:
            sleep.check_blocks(num_blocks)
        except SleepConfigError as exc:
            raise _sleep_error(exc) from None
    return ResolvedRecipe(recipe, task, eval_task, sleep, model_config)


def sleep_config(section: dict[str, Any], default_window: int) -> SleepConfig:
    """The `sleep:` section as a `SleepConfig`; `window` defaults to the task's window."""
    try:
        return SleepConfig.from_dict({"window": default_window, **section})
    except SleepConfigError as exc:
        raise _sleep_error(exc) from None
    except TypeError as exc:
        raise RecipeError("sleep", f"{exc}") from None


def _sleep_error(exc: SleepConfigError) -> RecipeError:
    """`SleepConfigError` messages start with `sleep_config.FIELD`; report them under `sleep.FIELD`."""
    message = str(exc)
    head, _, rest = message.partition(" ")
    if head.startswith("sleep_config."):
        return RecipeError("sleep." + head.removeprefix("sleep_config."), rest.removeprefix("= "))
    return RecipeError("sleep", message.removeprefix("sleep_config "))


def _task(name: str, options: dict[str, Any], key: str) -> Task:
    try:
        return get_task(name, **options)
    except TypeError as exc:
        raise RecipeError(key, f"{exc} (see the task's constructor in retrofit/tasks/{name}.py)") from None
    except (ValueError, OSError) as exc:
        raise RecipeError(key, str(exc)) from None


def _model_config(recipe: Recipe, vocab: int) -> PreTrainedConfig:
    section = recipe.model
    if section.pretrained is not None:
        try:
            config = AutoConfig.from_pretrained(section.pretrained, revision=section.revision)
        except (OSError, ValueError) as exc:
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise RecipeError(
                "model.pretrained", f"cannot load the config of {section.pretrained!r}: {first}"
            ) from None
        if config.vocab_size < vocab:
            raise RecipeError(
                "model.pretrained",
                f"its vocabulary ({config.vocab_size}) is smaller than the task tokenizer ({vocab} tokens); "
                "give the task the model's tokenizer (task.options.tokenizer)",
            )
        return config
    values = dict(section.config or {})
    model_type = values.pop("model_type", DEFAULT_MODEL_TYPE)
    try:
        config_class = AutoConfig.for_model(model_type).__class__
    except ValueError:
        raise RecipeError("model.config.model_type", f"unknown model type {model_type!r}") from None
    values = _typed_config_values(config_class, values)
    values.setdefault("vocab_size", vocab)
    try:
        config = config_class(**values)
        validate = getattr(config, "validate_architecture", None)
        if callable(validate):
            validate()
    except (TypeError, ValueError) as exc:
        raise RecipeError("model.config", str(exc).strip().splitlines()[-1]) from None
    if config.vocab_size < vocab:
        raise RecipeError(
            "model.config.vocab_size",
            f"{config.vocab_size} is smaller than the task tokenizer ({vocab} tokens); raise it or leave it out",
        )
    return config


def _typed_config_values(config_class: type[PreTrainedConfig], values: dict[str, Any]) -> dict[str, Any]:
    """Check the keys and value types of a config dict against the config class's fields."""
    if not is_dataclass(config_class):
        return values
    try:
        hints = typing.get_type_hints(config_class, localns={"torch": torch})
    except NameError:  # a forward reference we cannot resolve: check the keys only
        hints = {}
    known = {f.name for f in fields(config_class)}
    out = {}
    for key, value in values.items():
        if key not in known:
            raise RecipeError(f"model.config.{key}", f"unknown key for {config_class.__name__}")
        try:
            out[key] = TypeAdapter(hints[key]).validate_python(value) if key in hints else value
        except ValidationError as exc:
            message = exc.errors()[0]["msg"]
            raise RecipeError(f"model.config.{key}", f"{message} (got {value!r})") from None
    return out
