"""Shared test helpers: tiny random models and an independent token-by-token streaming reference."""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from torch import Tensor
from transformers import AutoModelForCausalLM

import retrofit
from model_patches.hybrid import SleepHybridConfig
from retrofit.blocks import KVWindow, join_windows
from retrofit.engine import EngineOutput, SleepEngine, sequence_positions

RULE110_PATTERN = ("full_attention", "linear_attention", "full_attention", "linear_attention")


def tiny_hybrid(
    layer_types: tuple[str, ...] = RULE110_PATTERN,
    *,
    vocab_size: int = 19,
    seed: int = 0,
    dtype: torch.dtype = torch.float64,
    mild_decay: bool = False,
    **overrides,
) -> torch.nn.Module:
    """A random hybrid small enough for exact float64 comparisons on CPU.

    It uses GQA attention (2 heads, 1 KV head) and GVA linear attention (2 q/k heads, 4 v heads).
    `mild_decay` makes the gated delta rule forget slowly, so gradients survive several chunks.
    """
    assert retrofit.__version__
    torch.manual_seed(seed)
    config = SleepHybridConfig(
        vocab_size=vocab_size,
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=len(layer_types),
        layer_types=list(layer_types),
        num_attention_heads=2,
        num_key_value_heads=1,
        linear_num_heads=2,
        linear_head_dim=8,
        linear_num_v_heads=4,
        linear_head_v_dim=8,
        sliding_window=overrides.pop("sliding_window", 5),
        **overrides,
    )
    model = AutoModelForCausalLM.from_config(config).to(dtype)
    if mild_decay:
        with torch.no_grad():
            for module in model.modules():
                if hasattr(module, "A_log"):
                    module.A_log.fill_(-4.0)
    return model.eval()


def random_batch(batch: int, length: int, vocab: int, seed: int = 1) -> tuple[Tensor, Tensor]:
    """Token ids and labels on every position."""
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (batch, length), generator=generator)
    return ids, ids.clone()


def stream_wake_logits(engine: SleepEngine, input_ids: Tensor, valid: Tensor | None = None) -> tuple[Tensor, list]:
    """Wake logits computed one token at a time, as streaming inference does, sleeping every L tokens.

    Each token runs every block once with the fast states and the KV of the tokens before it (the retained
    window plus the earlier tokens of its chunk). Returns the logits and, per chunk, the token-by-token
    states and KV windows reached at the chunk's end (before its sleep).
    """
    cfg, adapter = engine.config, engine.adapter
    length = input_ids.shape[1]
    if valid is None:
        valid = torch.ones_like(input_ids, dtype=torch.bool)
    positions = sequence_positions(valid, cfg.positions, cfg.window)
    num_blocks = len(adapter.blocks)
    states, windows = [None] * num_blocks, [None] * num_blocks
    logits, chunk_ends = [], []
    for s in range(0, length, cfg.window):
        e = min(s + cfg.window, length)
        token_states = list(states)
        chunk_kv: list[KVWindow | None] = [None] * num_blocks
        for t in range(s, e):
            chunk = engine.chunk_for_tokens(t, positions[:, t : t + 1], valid[:, t : t + 1])
            h = adapter.embed(input_ids[:, t : t + 1])
            for i, block in enumerate(adapter.blocks):
                kv = join_windows(windows[i], chunk_kv[i])
                h, token_states[i], own = block(h, token_states[i], kv, chunk)
                if own is not None:
                    chunk_kv[i] = join_windows(chunk_kv[i], own)
            logits.append(adapter.head(h))
        chunk_ends.append((token_states, chunk_kv))
        if e < length:
            states, windows = engine.sleep(input_ids[:, s:e], s, positions[:, s:e], states, windows, valid[:, s:e])
    return torch.cat(logits, dim=1), chunk_ends


def write_published_layout(
    directory: Path,
    config: dict[str, Any],
    shapes: dict[str, tuple[int, ...]],
    random_tensor: Callable[[str, tuple[int, ...], torch.Generator], Tensor],
    remote_code_files: tuple[str, ...],
    seed: int = 0,
) -> dict[str, Tensor]:
    """Write a checkpoint as a family publishes it, independently of our classes: config.json, model.safetensors
    (bf16) with the given names and shapes, and remote-code stand-ins that fail if imported. Returns the tensors."""
    directory.mkdir(parents=True, exist_ok=True)
    generator = torch.Generator().manual_seed(seed)
    tensors = {name: random_tensor(name, shape, generator).to(torch.bfloat16) for name, shape in shapes.items()}
    save_file(tensors, str(directory / "model.safetensors"), metadata={"format": "pt"})
    (directory / "config.json").write_text(json.dumps(config, indent=2))
    for filename in remote_code_files:
        (directory / filename).write_text('raise RuntimeError("the Hub remote code must not run")\n')
    return tensors


def timed_gpu_training_step(model: torch.nn.Module, ids: Tensor, labels: Tensor) -> tuple[Tensor, float, float]:
    """(loss, seconds, peak GiB) of a forward+backward on CUDA, measured on the second of two steps (the first
    compiles kernels and warms up the allocator). Gradients are left in place for the caller to check."""
    for _ in range(2):
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        start = time.perf_counter()
        model.zero_grad(set_to_none=True)
        loss = model(ids, labels=labels).loss
        loss.backward()
        torch.cuda.synchronize()
        elapsed = time.perf_counter() - start
    return loss.detach(), elapsed, torch.cuda.max_memory_allocated() / 2**30


def minimal_recipe(**changes) -> dict:
    """A small valid recipe as a dict, with top-level sections replaced or merged by `changes`."""
    data = {
        "output_dir": "runs/test",
        "task": {"name": "rule110", "options": {"steps_choices": [1, 2]}},
        "model": {
            "config": {
                "hidden_size": 16,
                "intermediate_size": 32,
                "num_attention_heads": 2,
                "linear_num_heads": 2,
                "linear_head_dim": 8,
            }
        },
        "sleep": {"window": 24, "passes": 2},
        "train": {"max_steps": 2, "batch_size": 4},
    }
    for key, value in changes.items():
        if isinstance(value, dict) and isinstance(data.get(key), dict):
            data[key] = {**data[key], **value}
        else:
            data[key] = value
    return data


def left_padding_runs(engine: SleepEngine, vocab_size: int, windows: int = 2) -> tuple[EngineOutput, EngineOutput]:
    """The engine's output on one random row with labels, and on the same row left-padded by `windows` whole
    windows (pad id 3, masked, unsupervised): what the families' padding-invariance tests compare."""
    ids, labels = random_batch(1, 10, vocab_size)
    left = windows * engine.config.window
    mask = torch.cat([torch.zeros(1, left, dtype=torch.long), torch.ones_like(ids)], dim=1)
    with torch.no_grad():
        reference = engine.forward(ids, labels=labels)
        padded = engine.forward(
            torch.cat([torch.full((1, left), 3), ids], dim=1),
            attention_mask=mask,
            labels=torch.cat([torch.full((1, left), -100), labels], dim=1),
        )
    return reference, padded
