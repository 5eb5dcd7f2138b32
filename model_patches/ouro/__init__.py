"""Ouro (`model_type: ouro`): loads the published checkpoints on transformers 5, inserts Jet mixers, and sleeps."""

from model_patches.ouro.configuration import OuroConfig, evenly_spaced_layers
from model_patches.ouro.modeling import OuroForCausalLM, OuroModel
from retrofit.registry import register_family

__all__ = ["OuroConfig", "OuroForCausalLM", "OuroModel", "evenly_spaced_layers"]

register_family("ouro", OuroConfig, OuroForCausalLM)
