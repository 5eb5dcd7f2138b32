"""sleep-retrofit: retrofit sleep (arXiv 2605.26099) onto SSM/linear-attention hybrid language models.

`import retrofit` registers every model family with `AutoConfig` and `AutoModelForCausalLM` (`retrofit.registry`).
"""

from retrofit.apply import apply_sleep, load_model, restore_sleep
from retrofit.config import SleepConfig, SleepConfigError
from retrofit.engine import EngineOutput, SleepEngine
from retrofit.registry import load_families

__version__ = "0.1.0"
load_families()
__all__ = [
    "EngineOutput",
    "SleepConfig",
    "SleepConfigError",
    "SleepEngine",
    "__version__",
    "apply_sleep",
    "load_model",
    "restore_sleep",
]
