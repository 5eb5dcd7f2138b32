"""Writes a tiny Jet-Nemotron checkpoint in the published layout, independently of this package's model classes.

The key names and shapes below are written from the published checkpoint's spec (`reference/models.md` §1.4 and the
Qwen2 layout), not read off our modules, so a naming or shape mistake in `model_patches.jet_nemotron` shows up as a
missing or unexpected key when the directory is loaded. The config.json is modelled on the real 2B file: `auto_map`
pointing at remote code, `efficient_attention_config` with `norm_eps` as a string and a rounded `expand_v`,
`rope_scaling: null`, `torch_dtype`. The directory also gets stand-ins for the Hub's remote-code files that fail when
imported, so a test can prove they never run.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from tests.helpers import write_published_layout

# Layer i's type; with 8 layers the default loop range is [2, 6), so the prelude (jet, attn), the loop
# (jet, swa, jet, jet) and the coda (attn, jet) are all non-empty and every layer type appears.
TINY_LAYER_TYPES = ("jet", "attn", "jet", "swa", "jet", "jet", "attn", "jet")

REMOTE_CODE_FILES = ("configuration_jet_nemotron.py", "modeling_jet_nemotron.py")


def tiny_config(layer_types: tuple[str, ...] = TINY_LAYER_TYPES, swa_window: int = 5) -> dict[str, Any]:
    """A config.json dict shaped like the published 2B file, with tiny sizes (GQA 4 heads / 2 KV heads)."""
    return {
        "architectures": ["JetNemotronForCausalLM"],
        "attention_dropout": 0.0,
        "auto_map": {
            "AutoConfig": "configuration_jet_nemotron.JetNemotronConfig",
            "AutoModelForCausalLM": "modeling_jet_nemotron.JetNemotronForCausalLM",
        },
        "bos_token_id": 0,
        "efficient_attention_config": {
            "jet": {
                "conv_size": 4,
                "dconv_generator_reduction": 4,
                "dconv_implementation": "triton",
                "expand_v": 2.6666666667,  # head_dim 6 -> head_v_dim 16, like 96 -> 256 in the 2B
                "head_dim": 6,
                "mode": "chunk",
                "norm_eps": "1e-5",
                "num_heads": 2,
            },
            "swa": {"window_size": swa_window},
        },
        "eos_token_id": 0,
        "hidden_act": "silu",
        "hidden_size": 32,
        "initializer_range": 0.02,
        "intermediate_size": 48,
        "layer_types": list(layer_types),
        "max_position_embeddings": 256,
        "max_window_layers": len(layer_types),
        "model_type": "jet_nemotron",
        "num_attention_heads": 4,
        "num_hidden_layers": len(layer_types),
        "num_key_value_heads": 2,
        "rms_norm_eps": 1e-06,
        "rope_scaling": None,
        "rope_theta": 10000.0,
        "tie_word_embeddings": True,
        "torch_dtype": "bfloat16",
        "transformers_version": "4.51.3",
        "use_cache": True,
        "use_mrope": False,
        "vocab_size": 37,
    }


def official_shapes(config: dict[str, Any]) -> dict[str, tuple[int, ...]]:
    """Every tensor of the published layout for `config`, by name (lm_head is tied, so absent)."""
    hidden, inter = config["hidden_size"], config["intermediate_size"]
    heads, kv_heads = config["num_attention_heads"], config["num_key_value_heads"]
    head_dim = hidden // heads
    jet = config["efficient_attention_config"]["jet"]
    jet_heads, key_head = jet["num_heads"], jet["head_dim"]
    value_head = round(key_head * jet["expand_v"])
    key_dim, value_dim = jet_heads * key_head, jet_heads * value_head
    generator = value_dim // jet["dconv_generator_reduction"]
    shapes: dict[str, tuple[int, ...]] = {
        "model.embed_tokens.weight": (config["vocab_size"], hidden),
        "model.norm.weight": (hidden,),
    }
    for i, layer_type in enumerate(config["layer_types"]):
        p = f"model.layers.{i}."
        shapes |= {
            p + "input_layernorm.weight": (hidden,),
            p + "post_attention_layernorm.weight": (hidden,),
            p + "mlp.gate_proj.weight": (inter, hidden),
            p + "mlp.up_proj.weight": (inter, hidden),
            p + "mlp.down_proj.weight": (hidden, inter),
        }
        a = p + "self_attn."
        if layer_type == "jet":
            shapes |= {
                a + "q_proj.weight": (key_dim, hidden),
                a + "k_proj.weight": (key_dim, hidden),
                a + "v_proj.weight": (value_dim, hidden),
                a + "a_proj.weight": (jet_heads, hidden),
                a + "b_proj.weight": (jet_heads, hidden),
                a + "g_proj.weight": (value_dim, hidden),
                a + "o_proj.weight": (hidden, value_dim),
                a + "A_log": (jet_heads,),
                a + "dt_bias": (jet_heads,),
                a + "o_norm.weight": (value_head,),
                a + "dynamic_conv1d.kernel_generator.w1.weight": (generator, hidden),
                a + "dynamic_conv1d.kernel_generator.w2.weight": (value_dim * jet["conv_size"], generator),
                a + "dynamic_conv1d.kernel_generator.w2.bias": (value_dim * jet["conv_size"],),
            }
        else:
            shapes |= {
                a + "q_proj.weight": (heads * head_dim, hidden),
                a + "q_proj.bias": (heads * head_dim,),
                a + "k_proj.weight": (kv_heads * head_dim, hidden),
                a + "k_proj.bias": (kv_heads * head_dim,),
                a + "v_proj.weight": (kv_heads * head_dim, hidden),
                a + "v_proj.bias": (kv_heads * head_dim,),
                a + "o_proj.weight": (hidden, heads * head_dim),
            }
    return shapes


def random_tensor(name: str, shape: tuple[int, ...], generator: torch.Generator) -> torch.Tensor:
    """Values that make every part of the model matter: unit-ish norms, mild decay, a clear static conv kernel."""
    if name.endswith(("layernorm.weight", "norm.weight")):
        return 1.0 + 0.2 * torch.randn(shape, generator=generator)
    if name.endswith("A_log"):
        return torch.empty(shape).uniform_(-3.0, 0.5, generator=generator)
    if name.endswith(("dt_bias", "w2.bias")):
        return 0.5 * torch.randn(shape, generator=generator)
    return torch.randn(shape, generator=generator) / shape[-1] ** 0.5


def write_official_checkpoint(
    directory: Path, config: dict[str, Any] | None = None, *, seed: int = 0
) -> dict[str, torch.Tensor]:
    """Write config.json, model.safetensors (bf16, as published) and failing remote-code stand-ins to `directory`.

    Returns the tensors written, by name.
    """
    config = tiny_config() if config is None else config
    return write_published_layout(directory, config, official_shapes(config), random_tensor, REMOTE_CODE_FILES, seed)
