"""Jet-Nemotron (`model_type: jet_nemotron`): loads the published checkpoints on transformers 5 and sleeps."""

from model_patches.jet_nemotron.configuration import JetBlockSettings, JetNemotronConfig
from model_patches.jet_nemotron.jet_block import JetBlock
from model_patches.jet_nemotron.modeling import JetNemotronForCausalLM, JetNemotronModel
from retrofit.registry import register_family

__all__ = ["JetBlock", "JetBlockSettings", "JetNemotronConfig", "JetNemotronForCausalLM", "JetNemotronModel"]

register_family("jet_nemotron", JetNemotronConfig, JetNemotronForCausalLM)
