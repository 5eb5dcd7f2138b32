"""Tiny pretrained checkpoints and recipes for trainer tests that need a `model.pretrained` (stages, adapters)."""

from __future__ import annotations

from pathlib import Path

import yaml

from tests.ouro_checkpoint import tiny_config, write_official_checkpoint

RULE110_VOCAB = 132  # the Rule 110 task's local tokenizer
TINY_MIXERS = {"num_heads": 2, "head_dim": 8, "expand_v": 2, "conv_size": 4, "dconv_generator_reduction": 4}


def tiny_ouro_checkpoint(directory: Path) -> Path:
    """A published-layout Ouro checkpoint (4 layers, d=32, no mixers) whose vocabulary covers the Rule 110 task."""
    write_official_checkpoint(directory, tiny_config(num_layers=4, total_ut_steps=2) | {"vocab_size": RULE110_VOCAB})
    return directory


def ouro_recipe(tmp_path: Path, name: str, checkpoint: Path, **sections: dict) -> Path:
    """A Rule 110 recipe on the tiny Ouro with 2 Jet mixers (after layers 1 and 3), seconds per run on CPU.

    `sections` replace or extend the recipe's top-level sections (`stages` and `adapter` are set as given).
    """
    data: dict = {
        "output_dir": str(tmp_path / name),
        "seed": 0,
        "task": {"name": "rule110", "options": {"steps_choices": [1, 2]}},
        "model": {
            "pretrained": str(checkpoint),
            "config_overrides": {"jet_mixer_layers": [1, 3], "jet_mixer_config": TINY_MIXERS},
        },
        "sleep": {"window": 24, "passes": 2, "eviction": "sliding", "sleep_on": "context_only"},
        "optimizer": {"schedule": "constant", "muon": {"lr": 2e-3}, "adamw": {"lr": 1e-3}},
        "train": {"max_steps": 5, "batch_size": 4, "checkpoint_every": 1, "keep_checkpoints": 5, "log_every": 1},
        "eval": {"source": "generated", "num_per_difficulty": 4, "batch_size": 16},
    }
    for key, value in sections.items():
        data[key] = {**data[key], **value} if isinstance(data.get(key), dict) else value
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path
