"""From-scratch GDN–attention hybrids (`model_type: sleep_hybrid`)."""

from model_patches.hybrid.configuration import SleepHybridConfig
from model_patches.hybrid.modeling import SleepHybridForCausalLM, SleepHybridModel

__all__ = ["SleepHybridConfig", "SleepHybridForCausalLM", "SleepHybridModel"]
