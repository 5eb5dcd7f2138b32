"""LoRA (PEFT) on sleeping models: targets that really apply, adapters that save, load and merge.

A LoRA adapter on a module only takes effect if the model calls that module and uses its output. Our blocks call
their projections (`q_proj, k_proj, v_proj, a_proj, b_proj, g_proj, o_proj`, the MLP projections, and Jet's
`dynamic_conv1d.kernel_generator.{w1,w2}`, whose output is the per-token conv kernel) as modules, so adapters there
work. Some weights are read raw by an op instead: `ShortConvolution` passes `self.weight` to `short_conv` (an
adapter on it would be bypassed), and `A_log`, `dt_bias` and the norms' weights are plain parameters. Those targets
are refused by name, never silently ignored.

Modules that the retrofit inserted (Ouro's Jet mixers, `model.jet_mixers.*`) have no pretrained weights to adapt:
they go to `modules_to_save` and train in full.

The trainer calls `apply_adapter(model, recipe.adapter)` after `apply_sleep`; `save_adapter` writes the PEFT files
plus what rebuilds the sleeping base from the checkpoint named in `adapter_config.json` (the sleep config, and the
recipe's `model.config_overrides` if any); `load_adapter` reads them back (`retrofit eval` of an adapter folder uses
it), and `retrofit merge ADAPTER_DIR -o OUT` folds the adapter into its base.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path
from typing import Any

import torch
from peft import LoraConfig, PeftModel, get_peft_model
from torch import nn
from transformers import PreTrainedModel

from retrofit.apply import apply_sleep
from retrofit.recipes.schema import AdapterSection
from retrofit.training.pretrained import load_pretrained

DEFAULT_TARGETS = ("q_proj", "k_proj", "v_proj", "a_proj", "b_proj", "g_proj", "o_proj")
ADAPTER_CONFIG_FILE = "adapter_config.json"
ADAPTER_WEIGHTS_FILE = "adapter_model.safetensors"
SLEEP_CONFIG_FILE = "sleep_config.json"
CONFIG_OVERRIDES_FILE = "config_overrides.json"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja")


class LoraTargetError(ValueError):
    """A LoRA target would be ignored by the model's ops, or matches nothing; the message names it."""


def inserted_modules(model: nn.Module) -> list[str]:
    """Names of modules the sleep retrofit inserted (no pretrained weights): Ouro's Jet mixers."""
    mixers = getattr(getattr(model, "model", None), "jet_mixers", None)
    return [f"model.jet_mixers.{key}" for key in mixers] if mixers is not None else []


def _matches(name: str, target: str) -> bool:
    return name == target or name.endswith("." + target)


def resolve_targets(model: nn.Module, targets: list[str] | None, modules_to_save: list[str]) -> list[str]:
    """Full names of the modules that get a LoRA adapter, refusing targets the model's ops would bypass.

    A target is a module name or name suffix (PEFT's rule); without `targets`, the model's `default_lora_targets`
    (a native family's projections) or `DEFAULT_TARGETS`. Each given target must match at least one module
    outside `modules_to_save` (the defaults, used when `targets` is unset, need not all match), and every matched
    module must be an `nn.Linear`, which the blocks call as a module; anything else (a conv whose weight an op reads
    raw, a parameter) is refused.
    """
    names = dict(model.named_modules())
    parameters = dict(model.named_parameters())
    saved = tuple(modules_to_save)
    chosen: list[str] = []
    for target in targets or getattr(model, "default_lora_targets", DEFAULT_TARGETS):
        if any(_matches(p, target) for p in parameters) and not any(_matches(n, target) for n in names):
            raise LoraTargetError(
                f"LoRA target {target!r} is a parameter, not a module: our ops read it directly, so an adapter "
                "cannot apply; train it in full (modules_to_save on its module) or drop the target"
            )
        matched = [
            n for n in names if _matches(n, target) and not any(_matches(n, s) or n.startswith(s + ".") for s in saved)
        ]
        if not matched and targets is not None:
            raise LoraTargetError(f"LoRA target {target!r} matches no module of {type(model).__name__}")
        for name in matched:
            if not isinstance(names[name], nn.Linear):
                raise LoraTargetError(
                    f"LoRA target {target!r} matches {name} ({type(names[name]).__name__}), whose weight an op reads "
                    "directly instead of calling the module: an adapter there would be silently bypassed. Target "
                    "nn.Linear projections only (e.g. q_proj, k_proj, v_proj, a_proj, b_proj, g_proj, o_proj, "
                    "kernel_generator.w1)"
                )
        chosen += matched
    if not chosen:
        raise LoraTargetError(f"no LoRA target matches a module of {type(model).__name__}; set adapter.target_modules")
    return sorted(set(chosen))


def apply_lora(model: PreTrainedModel, settings: AdapterSection | None = None) -> PeftModel:
    """Wrap a (sleeping) model in a PEFT LoRA model; inserted modules train in full (`modules_to_save`)."""
    settings = settings or AdapterSection()
    modules_to_save = settings.modules_to_save if settings.modules_to_save is not None else inserted_modules(model)
    config = LoraConfig(
        task_type="CAUSAL_LM",
        r=settings.r,
        lora_alpha=settings.alpha,
        lora_dropout=settings.dropout,
        target_modules=resolve_targets(model, settings.target_modules, modules_to_save),
        modules_to_save=modules_to_save or None,
    )
    return get_peft_model(model, config)


def apply_adapter(model: PreTrainedModel, section: AdapterSection | None) -> nn.Module:
    """The trainer's hook: `model` wrapped as the recipe's `adapter` section says, or unchanged without one."""
    return model if section is None else apply_lora(model, section)


def save_adapter(
    model: PeftModel,
    directory: Path,
    config_overrides: dict[str, Any] | None = None,
    state_dict: dict[str, torch.Tensor] | None = None,
) -> None:
    """PEFT's adapter files (safetensors) plus the sleep config, so the adapter loads onto a non-sleeping base, and
    the `model.config_overrides` its base was loaded with (`retrofit.training.pretrained.load_pretrained`).
    `state_dict`: the model's full weights where its own are shards (DeepSpeed ZeRO-3)."""
    directory = Path(directory)
    model.save_pretrained(directory, safe_serialization=True, state_dict=state_dict)
    sleep = model.get_base_model().config.sleep_config
    (directory / SLEEP_CONFIG_FILE).write_text(json.dumps(sleep, indent=2) + "\n")
    if config_overrides:
        (directory / CONFIG_OVERRIDES_FILE).write_text(json.dumps(config_overrides, indent=2) + "\n")


def is_adapter_dir(directory: Path) -> bool:
    """Whether `directory` holds a PEFT adapter (an `adapter_config.json`)."""
    return (Path(directory) / ADAPTER_CONFIG_FILE).is_file()


def load_adapter(
    directory: Path, base: PreTrainedModel | str | Path | None = None, dtype: torch.dtype | None = None
) -> PeftModel:
    """An adapter folder on its base, made to sleep as when trained.

    The base defaults to the checkpoint (and revision) in `adapter_config.json`, loaded in `dtype` with the saved
    config overrides; a base given as a model is used as it is.
    """
    directory = Path(directory)
    if not isinstance(base, PreTrainedModel):
        adapter_config = json.loads((directory / ADAPTER_CONFIG_FILE).read_text())
        overrides_file = directory / CONFIG_OVERRIDES_FILE
        base = load_pretrained(
            str(base or adapter_config["base_model_name_or_path"]),
            revision=None if base else adapter_config.get("revision"),
            overrides=json.loads(overrides_file.read_text()) if overrides_file.is_file() else None,
            dtype=dtype,
        )
    sleep_file = directory / SLEEP_CONFIG_FILE
    if sleep_file.is_file():
        apply_sleep(base, json.loads(sleep_file.read_text()))
    return PeftModel.from_pretrained(base, directory)


def merge(directory: Path, output_dir: Path, base: str | Path | None = None) -> PreTrainedModel:
    """Fold the adapter into its base and save a plain sleeping model (safetensors) with the adapter's tokenizer.

    The merge runs and saves in float32: adding a low-rank update to bfloat16 weights would round most of it away.
    """
    merged = load_adapter(directory, base, dtype=torch.float32).merge_and_unload()
    merged.save_pretrained(output_dir)
    for name in TOKENIZER_FILES:
        if (Path(directory) / name).is_file():
            shutil.copy2(Path(directory) / name, Path(output_dir) / name)
    return merged


# ---------------------------------------------------------------------- command line


def add_merge_parser(subparsers: argparse._SubParsersAction) -> None:
    """Register `retrofit merge ADAPTER_DIR -o OUTPUT_DIR [--base MODEL]`."""
    parser = subparsers.add_parser("merge", help="merge a LoRA adapter into its base model")
    parser.add_argument("adapter_dir", type=Path, help="folder written by save_adapter / PeftModel.save_pretrained")
    parser.add_argument("-o", "--output-dir", type=Path, required=True, help="where to save the merged model")
    parser.add_argument("--base", help="base model path or Hub id (default: adapter_config.json's)")
    parser.set_defaults(run=run_merge)


def run_merge(args: argparse.Namespace) -> int:
    """Handler of `retrofit merge`; a folder that is not an adapter exits 2 with one line."""
    if not is_adapter_dir(args.adapter_dir):
        print(f"error: {args.adapter_dir} holds no adapter_config.json (not a LoRA adapter folder)", file=sys.stderr)
        return 2
    merge(args.adapter_dir, args.output_dir, args.base)
    print(f"wrote {args.output_dir}")
    return 0
