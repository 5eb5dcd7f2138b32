"""Build a run's model (from scratch or from a checkpoint), retrofit sleep onto it, and describe it."""

from __future__ import annotations

import math
from dataclasses import dataclass

from transformers import AutoModelForCausalLM, PreTrainedModel

from retrofit.apply import apply_sleep
from retrofit.config import SleepConfig, SleepConfigError
from retrofit.optim import split_parameters
from retrofit.recipes import RecipeError, ResolvedRecipe


def build_model(resolved: ResolvedRecipe) -> PreTrainedModel:
    """The recipe's model in float32 with sleep applied. Seed the RNGs first: from-scratch weights are random."""
    section = resolved.recipe.model
    if section.pretrained is not None:
        model = AutoModelForCausalLM.from_pretrained(section.pretrained, revision=section.revision)
    else:
        model = AutoModelForCausalLM.from_config(resolved.model_config)
    try:
        apply_sleep(model, resolved.sleep)
    except SleepConfigError as exc:
        raise RecipeError("sleep", str(exc).removeprefix("sleep_config")) from None
    except TypeError as exc:
        raise RecipeError("model", str(exc)) from None
    return model


@dataclass(frozen=True)
class ModelSummary:
    """Sizes a user checks before a long run."""

    parameters: int
    trainable: int
    muon_parameters: int
    blocks: int

    @classmethod
    def of(cls, model: PreTrainedModel) -> ModelSummary:
        matrices, _ = split_parameters(model)
        return cls(
            parameters=sum(p.numel() for p in model.parameters()),
            trainable=sum(p.numel() for p in model.parameters() if p.requires_grad),
            muon_parameters=sum(p.numel() for p in matrices),
            blocks=len(model.get_sleep_adapter().blocks),
        )


def describe_passes(sleep: SleepConfig, seq_len: int) -> str:
    """How many block passes each chunk gets under `sleep`, in words."""
    chunks = math.ceil(seq_len / sleep.window)
    head = f"{chunks} chunks of L={sleep.window} per sequence of T={seq_len}; "
    if sleep.sleep_on == "context_only":
        return head + (
            f"chunks without loss tokens sleep with N={sleep.passes} passes (no wake), "
            f"chunks with loss tokens wake with {sleep.wake_passes} pass(es) (Algorithm 1)"
        )
    return head + (
        f"every chunk wakes with {sleep.wake_passes} pass(es); every chunk but the last then sleeps with "
        f"N={sleep.passes} passes in all (the wake pass counts as the first)"
    )
