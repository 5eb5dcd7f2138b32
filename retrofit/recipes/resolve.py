"""Turn a validated recipe into the objects a run needs: task, sleep config, model config, stages.

These are the checks that need more than the schema: task options (the task's own constructor checks them),
the sleep fields (`SleepConfig` checks them, for the top-level `sleep` and for each stage's), the model config's
keys and types (and a checkpoint's `model.config_overrides`), the vocabulary against the task's tokenizer, the
loop range against the model's block count, and the stage lengths against `train.max_steps`. Every failure is a
`RecipeError` that names the recipe key to fix. Nothing here builds weights: the stages' `trainable` patterns are
checked against the built model (`retrofit.training.stages.check_trainable`).
"""

from __future__ import annotations

import copy
import difflib
import importlib.util
import re
import typing
from dataclasses import dataclass, fields, is_dataclass
from typing import Any

import torch
from huggingface_hub.errors import StrictDataclassError
from pydantic import TypeAdapter, ValidationError
from transformers import AutoConfig, PreTrainedConfig

import retrofit  # noqa: F401  (registers the model families with AutoConfig)
from retrofit.config import SleepConfig, SleepConfigError
from retrofit.recipes.loader import RecipeError
from retrofit.recipes.schema import Recipe
from retrofit.tasks import DATA_TASKS, DataTask, Task, get_task

DEFAULT_MODEL_TYPE = "sleep_hybrid"


@dataclass(frozen=True)
class ResolvedStage:
    """One stage of a run: optimizer steps `[start, stop)`, the patterns of what trains, and its sleep config.

    A recipe without `stages:` runs as one stage, `train`, over every step, training every parameter.
    """

    name: str
    start: int
    stop: int
    trainable: tuple[str, ...]
    sleep: SleepConfig


@dataclass(frozen=True)
class ResolvedRecipe:
    """A recipe with its task, eval task, sleep config, model config and stages built and cross-checked.

    `sleep` is the top-level `sleep:` section; each stage's `sleep` is that section with the stage's changes.
    """

    recipe: Recipe
    task: Task
    eval_task: Task
    sleep: SleepConfig
    model_config: PreTrainedConfig
    stages: tuple[ResolvedStage, ...]

    @property
    def config_overrides(self) -> dict[str, Any]:
        """`model.config_overrides` with the values as checked and typed for the config class (`model_config`)."""
        return {key: getattr(self.model_config, key) for key in self.recipe.model.config_overrides}


def resolve(recipe: Recipe) -> ResolvedRecipe:
    """Build and cross-check everything but the weights; raise `RecipeError` naming the key to fix."""
    if recipe.adapter is not None and recipe.model.pretrained is None:
        raise RecipeError(
            "adapter",
            "LoRA adapts pretrained weights, and model.config builds a random model: load a checkpoint with "
            "model.pretrained, or remove adapter to train every parameter",
        )
    _check_trackers(recipe)
    options = _task_options(recipe)
    task = _task(recipe.task.name, options, "task.options")
    eval_options = {**options, **recipe.eval.task_options}
    eval_task = task if eval_options == options else _task(recipe.task.name, eval_options, "eval.task_options")
    if isinstance(task, DataTask):
        try:
            task.epoch_length(recipe.train.batch_size)
        except ValueError as exc:
            raise RecipeError("train.batch_size", str(exc)) from None
    sleep = sleep_config(recipe.sleep, task.window)
    if recipe.eval.source == "frozen" and not eval_task.has_held_out:
        _check_frozen_eval(recipe, eval_task)
    model_config = _model_config(recipe, len(task.tokenizer))
    # the blocks the engine sees: the layers, plus what a family inserts when it retrofits (Ouro's Jet mixers)
    num_blocks = getattr(model_config, "num_sleep_blocks", getattr(model_config, "num_hidden_layers", None))
    num_blocks = num_blocks if isinstance(num_blocks, int) else None
    _check_blocks(sleep, num_blocks, "sleep")
    stages = _stages(recipe, sleep, task.window, num_blocks)
    return ResolvedRecipe(recipe, task, eval_task, sleep, model_config, stages)


def _check_frozen_eval(recipe: Recipe, eval_task: Task) -> None:
    """The frozen eval set exists, was made by a task like the eval task (`Task.frozen_eval_mismatch`), encodes
    record by record, and holds every difficulty bucket of the eval task (checked here, before any model is built,
    and again when it is loaded)."""
    frozen = eval_task.frozen_eval_path(recipe.eval.path)
    if not frozen.is_file():
        raise RecipeError("eval.path", f"no frozen eval set at {frozen}; fix the path or use eval.source: generated")
    try:
        differing = eval_task.frozen_eval_mismatch(recipe.eval.path)
    except ValueError as exc:
        problem = f"the spec.json beside {frozen} does not describe a {eval_task.name} task: {exc}"
        raise RecipeError("eval.path", problem) from None
    if differing:
        raise RecipeError(
            "eval.source",
            f"the frozen eval set was made by another {eval_task.name} task ({', '.join(differing)}), so it would not "
            "measure this one; use eval.source: generated",
        )
    try:
        present = set(eval_task.load_frozen_eval(recipe.eval.path)["difficulty"])
    except ValueError as exc:
        raise RecipeError("eval.path", str(exc)) from None
    missing = sorted(set(eval_task.eval_difficulties) - present)
    if missing:
        raise RecipeError(
            "eval.source",
            f"the frozen eval set has no examples at difficulties {missing} of {eval_task.eval_difficulties}; "
            "use eval.source: generated, or eval.task_options whose difficulties the frozen set covers",
        )


def sleep_config(section: dict[str, Any], default_window: int, key: str = "sleep") -> SleepConfig:
    """A sleep section (the recipe's `sleep:`, or a stage's merged over it, under `key`) as a `SleepConfig`.

    `window` defaults to the task's window. Unknown and invalid fields are errors naming `KEY.FIELD`.
    """
    known = [f.name for f in fields(SleepConfig)]
    for field in section:
        if field not in known:
            close = difflib.get_close_matches(field, known, n=1)
            hint = f"did you mean {close[0]!r}? " if close else ""
            raise RecipeError(f"{key}.{field}", f"unknown key; {hint}known keys here: {', '.join(sorted(known))}")
    try:
        return SleepConfig.from_dict({"window": default_window, **section})
    except SleepConfigError as exc:
        raise _sleep_error(exc, key) from None
    except TypeError as exc:
        raise RecipeError(key, f"{exc}") from None


def _check_blocks(sleep: SleepConfig, num_blocks: int | None, key: str) -> None:
    """The loop range against the model's block count, where the config gives one."""
    if num_blocks is None:
        return
    try:
        sleep.check_blocks(num_blocks)
    except SleepConfigError as exc:
        raise _sleep_error(exc, key) from None


def _sleep_error(exc: SleepConfigError, key: str) -> RecipeError:
    """`SleepConfigError` messages start with `sleep_config.FIELD`; report them under `KEY.FIELD`."""
    message = str(exc)
    head, _, rest = message.partition(" ")
    if head.startswith("sleep_config."):
        return RecipeError(f"{key}.{head.removeprefix('sleep_config.')}", rest.removeprefix("= "))
    return RecipeError(key, message.removeprefix("sleep_config "))


def _stages(
    recipe: Recipe, sleep: SleepConfig, default_window: int, num_blocks: int | None
) -> tuple[ResolvedStage, ...]:
    """The run's stages, one after another; without `stages:`, one stage over every step that trains everything.

    Rule: `train.max_steps` must equal the sum of the stages' `max_steps` (the LR schedule, the progress bar and
    the checkpoints count steps over the whole run).
    """
    if recipe.stages is None:
        return (ResolvedStage("train", 0, recipe.train.max_steps, ("*",), sleep),)
    if not recipe.stages:
        raise RecipeError("stages", "is empty; list at least one stage, or remove the key to train in one stage")
    stages: list[ResolvedStage] = []
    for i, section in enumerate(recipe.stages):
        key = f"stages[{i}]"
        if section.name in {s.name for s in stages}:
            raise RecipeError(f"{key}.name", f"{section.name!r} is taken by an earlier stage; rename one of them")
        if not section.trainable:
            raise RecipeError(
                f"{key}.trainable", "is empty; list glob patterns of the parameters to train, e.g. ['*'] for all"
            )
        stage_sleep = sleep_config({**recipe.sleep, **section.sleep}, default_window, f"{key}.sleep")
        _check_blocks(stage_sleep, num_blocks, f"{key}.sleep")
        start = stages[-1].stop if stages else 0
        stop = start + section.max_steps
        stages.append(ResolvedStage(section.name, start, stop, tuple(section.trainable), stage_sleep))
    total = stages[-1].stop
    if recipe.train.max_steps != total:
        lengths = " + ".join(str(s.stop - s.start) for s in stages)
        raise RecipeError(
            "train.max_steps",
            f"is {recipe.train.max_steps}, but the stages take {lengths} = {total} steps; set train.max_steps: {total} "
            "(or change the stages' max_steps)",
        )
    return tuple(stages)


# The module each tracker of `train.log_with` needs.
TRACKER_MODULES = {
    "tensorboard": ("tensorboard", "tensorboardX"),
    "wandb": ("wandb",),
    "mlflow": ("mlflow",),
    "comet_ml": ("comet_ml",),
    "aim": ("aim",),
    "clearml": ("clearml",),
    "dvclive": ("dvclive",),
}


def _check_trackers(recipe: Recipe) -> None:
    """Every tracker of `train.log_with` is installed (accelerate would otherwise drop it and log nothing)."""
    for tracker in recipe.train.log_with:
        if not any(importlib.util.find_spec(module) for module in TRACKER_MODULES[tracker]):
            raise RecipeError(
                "train.log_with",
                f"{tracker} is not installed; pip install {TRACKER_MODULES[tracker][0]}, or remove it from the list",
            )


def _task_options(recipe: Recipe) -> dict[str, Any]:
    """The task's options; a task over a user's data reads them with the model's tokenizer unless it names one."""
    options = dict(recipe.task.options)
    if recipe.task.name in DATA_TASKS and "tokenizer" not in options:
        if recipe.model.pretrained is None:
            raise RecipeError(
                "task.options.tokenizer",
                "is required when the model is built from scratch (model.config); name a tokenizer folder or Hub id",
            )
        options["tokenizer"] = recipe.model.pretrained
    return options


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
            # An image-text checkpoint (Qwen3.5's) is trained and overridden through its text stack's config.
            config = AutoConfig.from_pretrained(section.pretrained, revision=section.revision).get_text_config()
        except (OSError, ValueError) as exc:
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise RecipeError(
                "model.pretrained", f"cannot load the config of {section.pretrained!r}: {first}"
            ) from None
        config = _with_overrides(config, section.config_overrides)
        if config.vocab_size < vocab:
            raise RecipeError(
                "model.pretrained",
                f"its vocabulary ({config.vocab_size}) is smaller than the task tokenizer ({vocab} tokens); "
                "give the task the model's tokenizer (task.options.tokenizer)",
            )
        return config
    if section.config_overrides:
        raise RecipeError(
            "model.config_overrides",
            "only changes a checkpoint's config (model.pretrained); with model.config, put these keys in model.config",
        )
    values = dict(section.config or {})
    model_type = values.pop("model_type", DEFAULT_MODEL_TYPE)
    try:
        config_class = AutoConfig.for_model(model_type).__class__
    except ValueError:
        raise RecipeError("model.config.model_type", f"unknown model type {model_type!r}") from None
    values = _typed_config_values(config_class, values, "model.config")
    values.setdefault("vocab_size", vocab)
    try:
        config = config_class(**values)
        validate = getattr(config, "validate_architecture", None)
        if callable(validate):
            validate()
    except (TypeError, ValueError, StrictDataclassError) as exc:
        message = _last_line(exc)
        raise RecipeError("model.config", message) from None
    if config.vocab_size < vocab:
        raise RecipeError(
            "model.config.vocab_size",
            f"{config.vocab_size} is smaller than the task tokenizer ({vocab} tokens); raise it or leave it out",
        )
    return config


def _with_overrides(config: PreTrainedConfig, overrides: dict[str, Any]) -> PreTrainedConfig:
    """A copy of a checkpoint's config with `model.config_overrides` set and the result validated."""
    if "sleep_config" in overrides:
        raise RecipeError(
            "model.config_overrides.sleep_config", "the sleep schedule is the recipe's sleep: section; set it there"
        )
    values = _typed_config_values(type(config), overrides, "model.config_overrides")
    config = copy.deepcopy(config)
    for key, value in values.items():
        setattr(config, key, value)
    validate = getattr(config, "validate", None)
    try:
        if callable(validate):
            validate()
    except (TypeError, ValueError, StrictDataclassError) as exc:
        message = _last_line(exc)
        named = [key for key in values if key in message]
        key = f"model.config_overrides.{named[0]}" if len(named) == 1 else "model.config_overrides"
        raise RecipeError(key, message) from None
    return config


def _typed_config_values(config_class: type[PreTrainedConfig], values: dict[str, Any], key: str) -> dict[str, Any]:
    """Check the keys and value types of a config dict (the recipe's `key` section) against the config class."""
    if not is_dataclass(config_class):
        return values
    try:
        hints = typing.get_type_hints(config_class, localns={"torch": torch})
    except NameError:  # a forward reference we cannot resolve: check the keys only
        hints = {}
    known = {f.name for f in fields(config_class)}
    out = {}
    for name, value in values.items():
        if name not in known:
            raise RecipeError(f"{key}.{name}", f"unknown key for {config_class.__name__}")
        try:
            out[name] = TypeAdapter(hints[name]).validate_python(value) if name in hints else value
        except ValidationError as exc:
            message = exc.errors()[0]["msg"]
            raise RecipeError(f"{key}.{name}", f"{message} (got {value!r})") from None
    return out


def _last_line(exc: BaseException) -> str:
    """The last line of an exception's message without its `SomethingError: ` prefix (config validators nest
    the cause in a longer report)."""
    return re.sub(r"^\w+Error: ", "", str(exc).strip().splitlines()[-1].strip())
