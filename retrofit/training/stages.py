"""Staged training: which stage a step is in, and what a stage trains.

A stage (`retrofit.recipes.ResolvedStage`) covers optimizer steps `[start, stop)`. Entering it sets
`requires_grad` exactly for the parameters its `trainable` patterns name and applies its sleep config. The stage of a
step is a function of the step alone, so a run resumed in any stage enters the same stage as the run it continues.

Patterns are shell-style globs (`fnmatch`: `*` matches any characters, dots included) over the parameter names of
the transformers model: `model.jet_mixers.*`, `model.layers.*.self_attn.*`, `*` for all. They choose among the
*candidates*, the parameters that train without stages: every parameter, or with an adapter those the adapter trains
(LoRA weights and `modules_to_save` copies; under PEFT the names gain segments such as `.lora_A.default.`, which
`*` matches). Frozen parameters get no gradient, so the optimizer (built once, over every candidate) skips them: no
update, no weight decay, no momentum step. The LR schedule runs over the whole run.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Collection, Iterable, Sequence

from torch import nn

from retrofit.apply import apply_sleep, transformers_model
from retrofit.recipes import RecipeError, ResolvedStage
from retrofit.training.build import full_numel


def stage_at(stages: Sequence[ResolvedStage], step: int) -> ResolvedStage:
    """The stage that optimizer step `step` (0-based) belongs to; the last stage from its end on."""
    for stage in stages:
        if step < stage.stop:
            return stage
    return stages[-1]


def trainable_names(model: nn.Module) -> list[str]:
    """Names of the parameters that require a gradient now (before any stage: the candidates)."""
    return [n for n, p in transformers_model(model).named_parameters() if p.requires_grad]


def matching(names: Iterable[str], patterns: Sequence[str]) -> list[str]:
    """The names that match at least one glob pattern, in their order."""
    return [name for name in names if any(fnmatch.fnmatchcase(name, p) for p in patterns)]


def apply_trainable(model: nn.Module, patterns: Sequence[str], candidates: Collection[str] | None = None) -> list[str]:
    """Let exactly the candidate parameters that match `patterns` train, freeze all others; return their names.

    `candidates` defaults to every parameter.
    """
    chosen = set(matching(candidates if candidates is not None else _names(model), patterns))
    for name, parameter in transformers_model(model).named_parameters():
        parameter.requires_grad_(name in chosen)
    return [name for name in _names(model) if name in chosen]


def check_trainable(model: nn.Module, stages: Sequence[ResolvedStage], candidates: Collection[str]) -> None:
    """Raise `RecipeError` naming `stages[i].trainable` for a pattern that matches no candidate parameter."""
    everything = _names(model)
    for i, stage in enumerate(stages):
        for pattern in stage.trainable:
            if matching(candidates, [pattern]):
                continue
            if matching(everything, [pattern]):
                reason = "matches only parameters the adapter freezes (a stage trains a subset of the adapter's)"
            else:
                examples = ", ".join(everything[:2] + everything[-1:])
                reason = f"matches no parameter of the model (names look like {examples})"
            raise RecipeError(
                f"stages[{i}].trainable",
                f"pattern {pattern!r} {reason}; fix the glob pattern (`*` matches any characters, dots included)",
            )


def enter_stage(model: nn.Module, stage: ResolvedStage, candidates: Collection[str]) -> list[str]:
    """Apply the stage's sleep config and trainable patterns to `model` (unwrapped); return the trainable names."""
    apply_sleep(model, stage.sleep)
    return apply_trainable(model, stage.trainable, candidates)


def describe_stage(stages: Sequence[ResolvedStage], stage: ResolvedStage, model: nn.Module) -> str:
    """One line a user reads at a stage boundary: which stage, its steps, what trains now, how it sleeps."""
    sleep = stage.sleep
    trainable = sum(full_numel(p) for p in model.parameters() if p.requires_grad)
    return (
        f"stage {stages.index(stage) + 1}/{len(stages)} {stage.name}: steps {stage.start + 1}-{stage.stop}, "
        f"{trainable:,} trainable parameters ({', '.join(stage.trainable)}), L={sleep.window}, N={sleep.passes}, "
        f"{sleep.eviction} eviction"
    )


def _names(model: nn.Module) -> list[str]:
    return [name for name, _ in transformers_model(model).named_parameters()]
