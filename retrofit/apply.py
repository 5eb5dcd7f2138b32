"""`apply_sleep`: the one explicit call that makes a loaded model sleep."""

from __future__ import annotations

import os
from typing import Any

from torch import nn

from retrofit.config import SleepConfig
from retrofit.engine import SleepEngine
from retrofit.native import make_sleeping
from retrofit.registry import NATIVE_FAMILIES, supported_model_types


def transformers_model(model: nn.Module) -> nn.Module:
    """The transformers model under a PEFT wrapper, or the model itself."""
    get_base = getattr(model, "get_base_model", None)
    return get_base() if callable(get_base) else model


def apply_sleep(model: nn.Module, config: SleepConfig | dict[str, Any]) -> nn.Module:
    """Retrofit sleep onto `model` in place and return it.

    The config is validated against the model (loop range within its blocks), family hooks run (e.g. Ouro
    inserts its Jet mixers), and the config is stored as `model.config.sleep_config`, so that
    `save_pretrained` / `from_pretrained` restore the same sleeping model. Calling it again with the same
    config changes nothing; with another config it replaces the schedule.
    """
    if isinstance(config, dict):
        config = SleepConfig.from_dict(config)
    base = transformers_model(model)
    family = NATIVE_FAMILIES.get(getattr(getattr(base, "config", None), "model_type", None))
    if family is not None:
        make_sleeping(base, family)
    if not hasattr(base, "get_sleep_adapter"):
        model_type = getattr(getattr(base, "config", None), "model_type", type(base).__name__)
        raise TypeError(
            f"{type(base).__name__} (model_type {model_type!r}) has no sleep adapter. Load it through "
            "AutoModelForCausalLM after `import retrofit`; supported model types: "
            f"{', '.join(supported_model_types())}"
        )
    prepare = getattr(base, "prepare_for_sleep", None)
    if callable(prepare):
        prepare(config)
    SleepEngine(base.get_sleep_adapter(), config)  # validates the config against the model
    base.config.sleep_config = config.to_dict()
    return model


def restore_sleep(model: nn.Module) -> nn.Module:
    """Make a model loaded from a saved sleeping folder sleep again, when its class did not already.

    The toolkit's own families, and the native ones where transformers lets `AutoModelForCausalLM` build the sleeping
    class (5.25 does; 5.17 keeps transformers' configs mapped to its own classes), restore on `from_pretrained`; a
    native model loaded as transformers' plain class gets its hooks here from `config.sleep_config`.
    """
    base = transformers_model(model)
    saved = getattr(getattr(base, "config", None), "sleep_config", None)
    if saved and not hasattr(base, "get_sleep_adapter"):
        apply_sleep(model, saved)
    return model


def load_model(path: str | os.PathLike, **kwargs: Any) -> nn.Module:
    """`AutoModelForCausalLM.from_pretrained(path, **kwargs)`, sleeping again if it was saved sleeping, on every
    supported transformers version."""
    from transformers import AutoModelForCausalLM

    return restore_sleep(AutoModelForCausalLM.from_pretrained(path, **kwargs))
