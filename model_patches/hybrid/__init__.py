"""From-scratch GDN–attention hybrids (`model_type: sleep_hybrid`)."""

from model_patches.hybrid.configuration import SleepHybridConfig
from model_patches.hybrid.modeling import SleepHybridForCausalLM, SleepHybridModel
from retrofit.registry import register_family

__all__ = ["SleepHybridConfig", "SleepHybridForCausalLM", "SleepHybridModel"]

register_family("sleep_hybrid", SleepHybridConfig, SleepHybridForCausalLM)
