"""Writes a tiny Ouro checkpoint in the published layout, independently of this package's model classes.

Key names and shapes come from the published checkpoint's spec (`reference/models.md` §2.2: sandwich-norm layers,
bias-free MHA, `model.early_exit_gate` with a bias, untied `lm_head`), not from our modules, so a naming or shape
mistake in `model_patches.ouro` shows up as a missing or unexpected key. The config.json is modelled on the published
1.4B file (Qwen2 fields, `total_ut_steps`, `early_exit_threshold`, `auto_map` to remote code, `rope_scaling: null`,
`torch_dtype`), and the directory gets remote-code stand-ins that fail when imported.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from tests.helpers import write_published_layout

REMOTE_CODE_FILES = ("configuration_ouro.py", "modeling_ouro.py")
LAYER_NORMS = ("input_layernorm", "input_layernorm_2", "post_attention_layernorm", "post_attention_layernorm_2")


def tiny_config(num_layers: int = 4, total_ut_steps: int = 3) -> dict[str, Any]:
    """A config.json dict shaped like the published 1.4B file, with tiny sizes (4 heads of 8, MHA)."""
    return {
        "architectures": ["OuroForCausalLM"],
        "attention_dropout": 0.0,
        "auto_map": {
            "AutoConfig": "configuration_ouro.OuroConfig",
            "AutoModel": "modeling_ouro.OuroModel",
            "AutoModelForCausalLM": "modeling_ouro.OuroForCausalLM",
        },
        "bos_token_id": 0,
        "early_exit_threshold": 1.0,
        "eos_token_id": 0,
        "hidden_act": "silu",
        "hidden_size": 32,
        "initializer_range": 0.02,
        "intermediate_size": 48,
        "layer_types": ["full_attention"] * num_layers,
        "max_position_embeddings": 256,
        "max_window_layers": num_layers,
        "model_type": "ouro",
        "num_attention_heads": 4,
        "num_hidden_layers": num_layers,
        "num_key_value_heads": 4,
        "rms_norm_eps": 1e-06,
        "rope_scaling": None,
        "rope_theta": 10000.0,
        "sliding_window": None,
        "tie_word_embeddings": False,
        "torch_dtype": "bfloat16",
        "total_ut_steps": total_ut_steps,
        "transformers_version": "4.55.0",
        "use_cache": True,
        "use_sliding_window": False,
        "vocab_size": 37,
    }


def official_shapes(config: dict[str, Any]) -> dict[str, tuple[int, ...]]:
    """Every tensor of the published layout for `config`, by name."""
    hidden, inter, vocab = config["hidden_size"], config["intermediate_size"], config["vocab_size"]
    heads, kv_heads = config["num_attention_heads"], config["num_key_value_heads"]
    head_dim = config.get("head_dim") or hidden // heads
    shapes: dict[str, tuple[int, ...]] = {
        "model.embed_tokens.weight": (vocab, hidden),
        "model.norm.weight": (hidden,),
        "model.early_exit_gate.weight": (1, hidden),
        "model.early_exit_gate.bias": (1,),
        "lm_head.weight": (vocab, hidden),
    }
    for i in range(config["num_hidden_layers"]):
        p = f"model.layers.{i}."
        shapes |= {p + f"{norm}.weight": (hidden,) for norm in LAYER_NORMS}
        shapes |= {
            p + "self_attn.q_proj.weight": (heads * head_dim, hidden),
            p + "self_attn.k_proj.weight": (kv_heads * head_dim, hidden),
            p + "self_attn.v_proj.weight": (kv_heads * head_dim, hidden),
            p + "self_attn.o_proj.weight": (hidden, heads * head_dim),
            p + "mlp.gate_proj.weight": (inter, hidden),
            p + "mlp.up_proj.weight": (inter, hidden),
            p + "mlp.down_proj.weight": (hidden, inter),
        }
    return shapes


def random_tensor(name: str, shape: tuple[int, ...], generator: torch.Generator) -> torch.Tensor:
    """Unit-ish norms and scaled matrices; the exit gate's bias spreads the exit distribution over the steps."""
    if name.endswith("norm.weight"):
        return 1.0 + 0.2 * torch.randn(shape, generator=generator)
    if name == "model.early_exit_gate.bias":
        return torch.full(shape, -1.0)
    return torch.randn(shape, generator=generator) / shape[-1] ** 0.5


def write_official_checkpoint(
    directory: Path, config: dict[str, Any] | None = None, *, seed: int = 0
) -> dict[str, torch.Tensor]:
    """Write config.json, model.safetensors (bf16, as published) and failing remote-code stand-ins to `directory`.

    Returns the tensors written, by name.
    """
    config = tiny_config() if config is None else config
    return write_published_layout(directory, config, official_shapes(config), random_tensor, REMOTE_CODE_FILES, seed)
