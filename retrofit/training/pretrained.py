"""Load a pretrained checkpoint with a recipe's `model.config_overrides` applied.

An override changes a field of the checkpoint's config. Most fields shape the model as it is built (RoPE, window
sizes, loop counts), so they are set before the model is built, and the checkpoint must still hold every weight the
changed config describes. A family's *retrofit fields* (`config_class.retrofit_fields`, e.g. Ouro's
`jet_mixer_layers` and `jet_mixer_config`) describe modules that `apply_sleep` inserts and a base checkpoint does not
have: they are set on the loaded model's config, so that `apply_sleep` inserts what they describe.

The trainer, `retrofit merge` and `retrofit eval` of an adapter all load their base through `load_pretrained`, so the
base an adapter was trained on is rebuilt the same way everywhere.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from transformers import AutoConfig, AutoModelForCausalLM, PreTrainedModel

from retrofit.apply import restore_sleep


def load_pretrained(
    name: str,
    *,
    revision: str | None = None,
    overrides: Mapping[str, Any] | None = None,
    dtype: torch.dtype | None = None,
) -> PreTrainedModel:
    """The checkpoint `name` (a path or Hub id) with `overrides` applied to its config, as explained above."""
    overrides = dict(overrides or {})
    config = AutoConfig.from_pretrained(name, revision=revision).get_text_config()  # an image-text checkpoint's LM
    after_loading = {k: v for k, v in overrides.items() if k in getattr(config, "retrofit_fields", ())}
    for key, value in overrides.items():
        if key not in after_loading:
            setattr(config, key, value)
    model = restore_sleep(AutoModelForCausalLM.from_pretrained(name, revision=revision, config=config, dtype=dtype))
    for key, value in after_loading.items():
        setattr(model.config, key, value)
    return model
