"""Model families that sleep: one package per architecture.

Importing this package (which `import retrofit` does) registers every family with `AutoConfig` and
`AutoModelForCausalLM`. Registration lives here, not in `retrofit`, so that a family can be imported first.
"""

from model_patches.registry import MODEL_FAMILIES, register_families

__all__ = ["MODEL_FAMILIES", "register_families"]

register_families()
