"""Atomic checkpoints: written to a temporary folder, then renamed; the last K are kept.

A checkpoint `OUTPUT_DIR/checkpoints/step_000100/` holds:
- `model/`: the model in Hugging Face format (`from_pretrained` loads it, sleep config included);
- Accelerate's state: optimizer, LR scheduler and the RNG states of every process;
- `trainer_state.json` (the step; the data position is a function of it) and `recipe.yaml`.

A run killed at any moment leaves either a complete checkpoint or a `.tmp-*` folder, which is ignored and removed
by the next save.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path

from accelerate import Accelerator
from torch import nn
from transformers import AutoModelForCausalLM, PreTrainedModel
from transformers.utils import logging as hf_logging

CHECKPOINTS = "checkpoints"
MODEL_DIR = "model"
STATE_FILE = "trainer_state.json"
RECIPE_FILE = "recipe.yaml"
_PREFIX, _TMP = "step_", ".tmp-"


@dataclass(frozen=True)
class TrainerState:
    """What a resumed run needs besides Accelerate's state: the next step and the tokens seen so far."""

    step: int
    tokens_seen: int


def checkpoint_dir(output_dir: Path, step: int) -> Path:
    return output_dir / CHECKPOINTS / f"{_PREFIX}{step:06d}"


def list_checkpoints(output_dir: Path) -> list[Path]:
    """Complete checkpoints of a run, oldest first."""
    root = output_dir / CHECKPOINTS
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.name.startswith(_PREFIX) and (p / STATE_FILE).is_file()]
    return sorted(found, key=lambda p: int(p.name.removeprefix(_PREFIX)))


def register_model_hooks(accelerator: Accelerator) -> None:
    """Make `save_state`/`load_state` store the model with `save_pretrained` in `model/` (loadable by users)."""

    def save_model(models: list[nn.Module], weights: list[dict], output_dir: str) -> None:
        if accelerator.is_main_process:
            save_pretrained_quietly(accelerator.unwrap_model(models[0]), Path(output_dir) / MODEL_DIR)
        weights.clear()

    def load_model(models: list[nn.Module], input_dir: str) -> None:
        model = accelerator.unwrap_model(models.pop())
        saved = AutoModelForCausalLM.from_pretrained(Path(input_dir) / MODEL_DIR, dtype=model.dtype)
        model.load_state_dict(saved.state_dict())

    accelerator.register_save_state_pre_hook(save_model)
    accelerator.register_load_state_pre_hook(load_model)


def save_pretrained_quietly(model: PreTrainedModel, directory: Path) -> None:
    """`save_pretrained` without transformers' per-shard progress bar, which would break the training bar."""
    enabled = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        model.save_pretrained(directory)
    finally:
        if enabled:
            hf_logging.enable_progress_bar()


def save_checkpoint(
    accelerator: Accelerator, output_dir: Path, state: TrainerState, recipe_yaml: str, keep: int
) -> Path:
    """Save the full training state atomically as `checkpoints/step_NNNNNN`, keeping the newest `keep`."""
    final = checkpoint_dir(output_dir, state.step)
    tmp = final.with_name(_TMP + final.name)
    if accelerator.is_main_process:
        for stale in (output_dir / CHECKPOINTS).glob(_TMP + "*"):
            shutil.rmtree(stale)
        tmp.mkdir(parents=True)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(tmp))
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        (tmp / STATE_FILE).write_text(json.dumps(asdict(state), indent=2) + "\n")
        (tmp / RECIPE_FILE).write_text(recipe_yaml)
        _fsync_tree(tmp)
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
        for old in list_checkpoints(output_dir)[:-keep]:
            shutil.rmtree(old)
    accelerator.wait_for_everyone()
    return final


def load_checkpoint(accelerator: Accelerator, path: Path) -> TrainerState:
    """Restore model, optimizer, scheduler and RNG states from `path`; return the trainer state."""
    accelerator.load_state(str(path))
    return TrainerState(**json.loads((path / STATE_FILE).read_text()))


def is_checkpoint(path: Path) -> bool:
    return (path / STATE_FILE).is_file() and (path / MODEL_DIR).is_dir()


@dataclass(frozen=True)
class SavedModel:
    """Where `retrofit eval` finds a model, the recipe it was trained with, and its training step."""

    model: Path
    recipe: Path
    step: int


def locate_saved_model(path: Path) -> SavedModel:
    """Resolve a run directory (its final `model/`, else its latest checkpoint), a checkpoint or a model folder.

    The recipe is the `recipe.yaml` in `path` or up to two folders above it; the step is the checkpoint's, or the
    run's latest checkpoint's for a final model. Raises `FileNotFoundError` saying what is missing.
    """
    if not path.exists():
        raise FileNotFoundError(f"{path} does not exist; give a run directory, a checkpoint or a model folder")
    model = path / MODEL_DIR if (path / MODEL_DIR / "config.json").is_file() else path
    if not (model / "config.json").is_file():
        checkpoints = list_checkpoints(path)
        if not checkpoints:
            raise FileNotFoundError(f"{path} holds no model: no config.json, {MODEL_DIR}/ folder or checkpoint")
        model = checkpoints[-1]
    recipe = next((p / RECIPE_FILE for p in (path, *path.parents[:2]) if (p / RECIPE_FILE).is_file()), None)
    if recipe is None:
        raise FileNotFoundError(f"no {RECIPE_FILE} in {path} or the two folders above: the eval set comes from it")
    candidates = [path, model, *list_checkpoints(recipe.parent)[-1:]]
    state = next((p / STATE_FILE for p in candidates if (p / STATE_FILE).is_file()), None)
    step = json.loads(state.read_text())["step"] if state else 0
    return SavedModel(model, recipe, step)


def load_model(path: Path) -> PreTrainedModel:
    """The model of a checkpoint or a final `model/` folder (anything `from_pretrained` reads)."""
    return AutoModelForCausalLM.from_pretrained(path / MODEL_DIR if is_checkpoint(path) else path)


def _fsync_tree(root: Path) -> None:
    """Flush the files of a checkpoint to disk before it is renamed into place."""
    for path in root.rglob("*"):
        if path.is_file():
            with path.open("rb") as f:
                os.fsync(f.fileno())
