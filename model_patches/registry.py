"""Model families known to the toolkit, registered with transformers' Auto classes."""

from __future__ import annotations

from transformers import AutoConfig, AutoModelForCausalLM, PreTrainedConfig, PreTrainedModel

from model_patches.hybrid import SleepHybridConfig, SleepHybridForCausalLM
from model_patches.jet_nemotron import JetNemotronConfig, JetNemotronForCausalLM
from model_patches.ouro import OuroConfig, OuroForCausalLM

MODEL_FAMILIES: dict[str, tuple[type[PreTrainedConfig], type[PreTrainedModel]]] = {
    "sleep_hybrid": (SleepHybridConfig, SleepHybridForCausalLM),
    "jet_nemotron": (JetNemotronConfig, JetNemotronForCausalLM),
    "ouro": (OuroConfig, OuroForCausalLM),
}


def register_families() -> None:
    """Register every family with `AutoConfig` and `AutoModelForCausalLM` (idempotent)."""
    for model_type, (config_class, model_class) in MODEL_FAMILIES.items():
        AutoConfig.register(model_type, config_class, exist_ok=True)
        AutoModelForCausalLM.register(config_class, model_class, exist_ok=True)
