"""Build a run's model (from scratch or from a checkpoint), retrofit sleep onto it, add its adapter, describe it."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn
from transformers import AutoModelForCausalLM, PreTrainedModel

from retrofit.apply import apply_sleep
from retrofit.config import SleepConfig, SleepConfigError
from retrofit.lora import LoraTargetError, apply_adapter
from retrofit.optim import split_parameters
from retrofit.recipes import RecipeError, ResolvedRecipe
from retrofit.training.pretrained import load_pretrained


def build_model(resolved: ResolvedRecipe) -> nn.Module:
    """The recipe's model in float32 with sleep applied, wrapped in its adapter if it has one.

    Seed the RNGs first: from-scratch weights (and new modules such as Ouro's mixers) are random.
    """
    section = resolved.recipe.model
    if section.pretrained is not None:
        try:
            model = load_pretrained(
                section.pretrained, revision=section.revision, overrides=resolved.config_overrides, dtype=torch.float32
            )
        except ValueError as exc:  # e.g. an override that changes a weight's shape: the checkpoint no longer fits
            if not section.config_overrides:
                raise
            raise RecipeError(
                "model.config_overrides", f"the checkpoint does not fit the changed config: {exc}"
            ) from None
    else:
        model = AutoModelForCausalLM.from_config(resolved.model_config)
    try:
        apply_sleep(model, resolved.sleep)
    except SleepConfigError as exc:
        raise RecipeError("sleep", str(exc).removeprefix("sleep_config")) from None
    except TypeError as exc:
        raise RecipeError("model", str(exc)) from None
    except ValueError as exc:  # a family's retrofit refused its config, e.g. mixers moved from where they were saved
        if not section.config_overrides:
            raise
        raise RecipeError("model.config_overrides", str(exc)) from None
    # `checkpointing: pass` on one process recomputes a pass in backward only if one of its inputs requires a gradient
    # (the reentrant scheme of `retrofit.checkpoint`): with a frozen embedding (an adapter, or a stage) none would.
    model.enable_input_require_grads()
    return _with_adapter(model, resolved)


def _with_adapter(model: PreTrainedModel, resolved: ResolvedRecipe) -> nn.Module:
    """`model` wrapped in the recipe's adapter (unchanged without one), recording the base's revision for loading."""
    section = resolved.recipe.adapter
    try:
        wrapped = apply_adapter(model, section)
    except LoraTargetError as exc:
        raise RecipeError("adapter.target_modules", str(exc)) from None
    if section is not None:
        wrapped.peft_config["default"].revision = resolved.recipe.model.revision
    return wrapped


def full_numel(parameter: nn.Parameter) -> int:
    """A parameter's size, also under DeepSpeed ZeRO-3, where the tensor itself is an empty shard (`ds_numel`)."""
    return getattr(parameter, "ds_numel", parameter.numel())


@dataclass(frozen=True)
class ModelSummary:
    """Sizes a user checks before a long run."""

    parameters: int
    trainable: int
    muon_parameters: int
    blocks: int

    @classmethod
    def of(cls, model: nn.Module) -> ModelSummary:
        matrices, _ = split_parameters(model)
        return cls(
            parameters=sum(full_numel(p) for p in model.parameters()),
            trainable=sum(full_numel(p) for p in model.parameters() if p.requires_grad),
            muon_parameters=sum(full_numel(p) for p in matrices),
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
