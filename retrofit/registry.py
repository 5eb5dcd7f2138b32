"""The one registry of model families: the core looks families up here and never imports one.

A family registers itself when its package is imported: `register_family` for the families this toolkit implements,
`register_native` for those transformers implements (`retrofit.native`). Packages that hold
families announce themselves as entry points of the group `sleep_retrofit.families` (this distribution's
`model_patches`, or a third-party package's), and `load_families` imports them: that is what `import retrofit` does,
so `AutoModelForCausalLM` knows every family afterwards.
"""

from __future__ import annotations

import warnings
from importlib.metadata import entry_points

from transformers import AutoConfig, AutoModelForCausalLM, PreTrainedConfig, PreTrainedModel

from retrofit.native import NativeFamily, sleeping_class

ENTRY_POINT_GROUP = "sleep_retrofit.families"
MODEL_FAMILIES: dict[str, tuple[type[PreTrainedConfig], type[PreTrainedModel]]] = {}
NATIVE_FAMILIES: dict[str, NativeFamily] = {}


def register_family(model_type: str, config_class: type[PreTrainedConfig], model_class: type[PreTrainedModel]) -> None:
    """Make `model_type` a sleeping family: known here, and to `AutoConfig` and `AutoModelForCausalLM` (idempotent)."""
    MODEL_FAMILIES[model_type] = (config_class, model_class)
    AutoConfig.register(model_type, config_class, exist_ok=True)
    AutoModelForCausalLM.register(config_class, model_class, exist_ok=True)


def register_native(
    model_type: str, config_class: type[PreTrainedConfig], model_class: type[PreTrainedModel], family: NativeFamily
) -> None:
    """Make a model type that transformers implements sleep: `apply_sleep` patches its loaded instances.

    Where transformers accepts it (5.25 does; 5.17 keeps its own configs mapped to its own classes),
    `AutoModelForCausalLM` also builds the class with the sleep hooks, which runs transformers' own forward until a
    `sleep_config` is set, so that `from_pretrained` restores a saved sleeping model; `retrofit.load_model` does on
    every version."""
    NATIVE_FAMILIES[model_type] = family
    AutoModelForCausalLM.register(config_class, sleeping_class(model_class, family), exist_ok=True)


def load_families() -> None:
    """Import every package that announces families (entry points of `ENTRY_POINT_GROUP`); each registers its own."""
    found = list(entry_points(group=ENTRY_POINT_GROUP))
    for entry_point in found:
        entry_point.load()
    if not found:
        warnings.warn(
            f"no model families found (no '{ENTRY_POINT_GROUP}' entry point): reinstall the toolkit "
            "(pip install -e .) so that its package metadata names them",
            stacklevel=2,
        )


def supported_model_types() -> list[str]:
    """The model types `apply_sleep` knows, sorted."""
    return sorted([*MODEL_FAMILIES, *NATIVE_FAMILIES])
