"""Sleep on the hybrids that transformers implements itself: patch the loaded instance, reuse its modules.

`apply_sleep` on a model of a registered native family (`retrofit.registry.register_native`) changes that one
instance's class to a subclass of its own class, named the same (so `save_pretrained` writes the same
`architectures`), that adds the sleep hooks of `SleepCausalLMMixin`. No parameter is added, renamed or copied: the
engine's blocks are views of the loaded decoder layers, built by the family, which call the layers' own projections,
norms, MLP or MoE modules and convolution weights. Without a `sleep_config` the instance runs transformers' own
forward and `generate`, so a saved folder is an ordinary checkpoint for plain transformers. The same subclass is what
`AutoModelForCausalLM` builds for a native model type after `import retrofit`, which is how `from_pretrained`
restores a saved sleeping model.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from torch import Tensor, nn

from retrofit.modeling import DecoderAdapter, SleepCausalLMMixin

_VIEWS = "_retrofit_sleep_views"


@dataclass(frozen=True)
class NativeFamily:
    """How the toolkit sleeps one family that transformers implements.

    Attributes:
        blocks: the engine's blocks (`retrofit.blocks.SleepBlock`) as views of a loaded model's decoder layers.
        default_loop_range: a loaded model's default loop range.
        lora_targets: module-name suffixes that LoRA adapts by default: every linear projection the blocks call.
    """

    blocks: Callable[[nn.Module], list[nn.Module]]
    default_loop_range: Callable[[nn.Module], tuple[int, int]]
    lora_targets: tuple[str, ...]


def sleep_views(causal_lm: nn.Module, family: NativeFamily) -> nn.ModuleList:
    """The family's block views of `causal_lm`'s decoder layers, made once per model and kept on it.

    They live in the instance's `__dict__`, outside the module tree: the model's parameter names stay transformers'
    own, and every sleep of the model calls the same view modules (FSDP2 shards them, `retrofit.training.fsdp`).
    """
    views = causal_lm.__dict__.get(_VIEWS)
    if views is None:
        views = causal_lm.__dict__[_VIEWS] = nn.ModuleList(family.blocks(causal_lm))
    return views


class NativeAdapter(DecoderAdapter):
    """The engine's view of a native decoder LM: its embedding, the family's block views, norm, head and RoPE."""

    def __init__(self, causal_lm: nn.Module, family: NativeFamily) -> None:
        super().__init__(causal_lm, family.default_loop_range(causal_lm))
        self.blocks = sleep_views(causal_lm, family)

    def rope(self, positions: Tensor) -> tuple[Tensor, Tensor] | None:
        """transformers' own rotary embedding of the model, at `positions` `[B, C]`: cos and sin `[B, C, rot]`; None
        for a model without one (NoPE)."""
        rotary = self.model.rotary_emb
        if rotary is None:
            return None
        if getattr(rotary, "mrope_section", None) is not None:  # multimodal RoPE: text positions on all three axes
            positions = positions[None].expand(3, *positions.shape)
        return rotary(self.model.embed_tokens.weight, positions)


class NativeSleepMixin(SleepCausalLMMixin):
    """The sleep hooks on a native model; without a `sleep_config`, transformers' own forward and cache."""

    native_family: NativeFamily  # set on each sleeping class

    def get_sleep_adapter(self) -> NativeAdapter:
        return NativeAdapter(self, self.native_family)

    def default_loop_range(self) -> tuple[int, int]:
        return self.native_family.default_loop_range(self)

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        if self.sleep_config is None:
            return super(SleepCausalLMMixin, self).forward(*args, **kwargs)
        return super().forward(*args, **kwargs)

    def _prepare_cache_for_generation(self, generation_config: Any, model_kwargs: dict, *args: Any) -> Any:
        if self.sleep_config is None:
            return super(SleepCausalLMMixin, self)._prepare_cache_for_generation(generation_config, model_kwargs, *args)
        return super()._prepare_cache_for_generation(generation_config, model_kwargs, *args)

    @property
    def default_lora_targets(self) -> tuple[str, ...]:
        return self.native_family.lora_targets


def middle_periods(causal_lm: nn.Module) -> tuple[int, int]:
    """A default loop range for a periodic hybrid (`config.layer_types`, e.g. three linear layers then one attention
    layer): whole periods around the middle half of the stack, `[s, n - s)` with `s` the multiple of the period at or
    below `n / 4` (`[4, 20)` for 24 layers of period 4, `[8, 24)` for 32, `[16, 48)` for 64). Every loop pass then
    holds linear layers that write the fast state and the attention layer that reads the window, as every pass of the
    paper's loop over Jet-Nemotron's middle half does."""
    layer_types = list(causal_lm.config.layer_types)
    n = len(layer_types)
    period = next((i + 1 for i, kind in enumerate(layer_types) if kind == "full_attention"), n)
    start = (n // 4) // period * period
    return (start, n - start)


_SLEEPING_CLASSES: dict[type, type] = {}


def sleeping_class(model_class: type, family: NativeFamily) -> type:
    """The subclass of `model_class` with the sleep hooks, under the same name (one per class)."""
    if issubclass(model_class, NativeSleepMixin):
        return model_class
    if model_class not in _SLEEPING_CLASSES:
        namespace = {"native_family": family, "__module__": model_class.__module__, "__doc__": model_class.__doc__}
        _SLEEPING_CLASSES[model_class] = type(model_class.__name__, (NativeSleepMixin, model_class), namespace)
    return _SLEEPING_CLASSES[model_class]


def make_sleeping(model: nn.Module, family: NativeFamily) -> nn.Module:
    """Give this instance (only) the sleep hooks; its modules, parameters and names stay as they are."""
    model.__class__ = sleeping_class(type(model), family)
    return model
