"""Atomic checkpoints: written to a temporary folder, then renamed; the last K are kept.

A checkpoint `OUTPUT_DIR/checkpoints/step_000100/` holds:
- `model/`: the model in Hugging Face format (`from_pretrained` loads it, sleep config included), or for a run with
  an adapter the adapter folder (`retrofit.lora.save_adapter`; its frozen base is rebuilt from the checkpoint it
  names, so only the trained weights are stored);
- the optimizer, the LR schedule and the random generators of every process, as safetensors and JSON
  (`retrofit.training.safe_state`): resuming never unpickles, so a doctored checkpoint cannot run code. Under
  DeepSpeed, `engine/` holds the engine's own (sharded) optimizer state and weights instead of the optimizer's
  files, which resuming loads tensors-only (`torch.load(weights_only=True)`);
- `trainer_state.json` (the step; the data position is a function of it) and `recipe.yaml`.

A run killed at any moment leaves either a complete checkpoint or a `.tmp-*` folder, which is ignored and removed
by the next save.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import shutil
import socket
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from peft import PeftModel, set_peft_model_state_dict
from safetensors.torch import load_file
from torch import nn
from transformers import PreTrainedModel, PreTrainedTokenizerBase
from transformers.utils import logging as hf_logging

from retrofit.apply import load_model as load_saved_model
from retrofit.lora import ADAPTER_WEIGHTS_FILE, is_adapter_dir, load_adapter, save_adapter
from retrofit.recipes import RecipeError
from retrofit.training.distributed import gather_state_dict, zero_stage
from retrofit.training.fsdp import (
    current_optimizer_state,
    full_optimizer_state,
    is_sharded,
    load_full_adapter_state,
    load_full_model_state,
    load_full_optimizer_state,
)
from retrofit.training.resume import load_schedule, with_current_hyperparameters
from retrofit.training.safe_state import (
    ENGINE_DIR,
    load_tree,
    pickles_in,
    random_states,
    save_tree,
    set_random_states,
    tensors_only_loading,
)

CHECKPOINTS = "checkpoints"
EVAL_DIR = "eval"  # one JSON per evaluation during training, `step_NNNNNN.json`
MODEL_DIR = "model"
ADAPTER_DIR = "adapter"
STATE_FILE = "trainer_state.json"
RECIPE_FILE = "recipe.yaml"
DIVERGED_FILE = "diverged.json"  # in a checkpoint whose weights made a later step's loss non-finite
LOCK_FILE = ".lock"
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


def good_checkpoints(output_dir: Path) -> list[Path]:
    """Complete checkpoints that did not lead to a divergence, oldest first."""
    return [c for c in list_checkpoints(output_dir) if not (c / DIVERGED_FILE).is_file()]


def mark_diverged(output_dir: Path, step: int, loss: float) -> None:
    """Step `step` (1-based) was not finite: the checkpoints from its starting weights (step - 1) on are bad."""
    for checkpoint in list_checkpoints(output_dir):
        if saved_step(checkpoint) >= step - 1:
            write_atomically(checkpoint / DIVERGED_FILE, json.dumps({"diverged_at_step": step, "loss": loss}) + "\n")


@contextlib.contextmanager
def output_dir_lock(output_dir: Path) -> Iterator[None]:
    """Hold `output_dir/.lock` while training into it: a second training into the same folder is refused (a
    `RecipeError` naming the folder) instead of mixing its files with the first one's. The lock goes with the
    process, so a killed run leaves none behind."""
    output_dir.mkdir(parents=True, exist_ok=True)
    with (output_dir / LOCK_FILE).open("a+") as handle:
        try:  # a POSIX record lock: held by this process only, not by the data workers it forks
            fcntl.lockf(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            handle.seek(0)
            holder = handle.read().strip() or "another process"
            raise RecipeError(
                "output_dir",
                f"{output_dir} is in use by a running training ({holder}); wait for it to end, or choose another "
                "output_dir",
            ) from None
        handle.seek(0)
        handle.truncate()
        handle.write(f"pid {os.getpid()} on {socket.gethostname()}\n")
        handle.flush()
        try:
            yield
        finally:
            fcntl.lockf(handle, fcntl.LOCK_UN)


def save_model_folder(
    accelerator: Accelerator,
    model: nn.Module,
    checkpoint: Path,
    config_overrides: dict[str, Any] | None,
    tokenizer: PreTrainedTokenizerBase | None,
) -> None:
    """The checkpoint's `model/` folder, with the tokenizer beside the weights (call on every process)."""
    state_dict = gather_state_dict(accelerator, model)  # on every process: a collective under ZeRO-3
    if accelerator.is_main_process:
        save_model_files(accelerator.unwrap_model(model), checkpoint / MODEL_DIR, config_overrides, state_dict)
        if tokenizer is not None:
            tokenizer.save_pretrained(checkpoint / MODEL_DIR)


def load_model_folder(model: nn.Module, checkpoint: Path) -> None:
    """Load the weights of the checkpoint's `model/` folder into `model` (unwrapped; FSDP2-sharded or whole)."""
    directory = checkpoint / MODEL_DIR
    fix = "resume with the recipe that wrote this checkpoint (its copy is in the checkpoint's recipe.yaml)"
    if isinstance(model, PeftModel):
        weights = load_file(directory / ADAPTER_WEIGHTS_FILE)
        if is_sharded(model):
            unexpected = load_full_adapter_state(model, weights)
        else:
            unexpected = set_peft_model_state_dict(model, weights).unexpected_keys
        if unexpected:
            raise ValueError(f"{directory}: {unexpected[0]} is not a weight of this run's adapter; {fix}")
        return
    saved = load_saved_model(directory, dtype=model.dtype)
    try:
        if is_sharded(model):
            load_full_model_state(model, saved.state_dict())
        else:
            model.load_state_dict(saved.state_dict())
    except RuntimeError as exc:  # torch lists the mismatched keys and shapes
        raise ValueError(f"{directory} does not fit this run's model; {fix}. {exc}") from None


@dataclass
class Trained:
    """What a checkpoint saves and restores: the prepared model, optimizer and LR schedule, and how to write the
    model folder (`config_overrides`, `tokenizer`)."""

    model: nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    config_overrides: dict[str, Any] | None = None
    tokenizer: PreTrainedTokenizerBase | None = None


def save_model_files(
    model: nn.Module,
    directory: Path,
    config_overrides: dict[str, Any] | None = None,
    state_dict: dict[str, torch.Tensor] | None = None,
) -> None:
    """The model as users load it: a PEFT model as its adapter folder, any other with `save_pretrained`.

    `state_dict` replaces the model's own weights where those are shards (DeepSpeed ZeRO-3; `gather_state_dict`).
    """
    if isinstance(model, PeftModel):
        save_adapter(model, directory, config_overrides, state_dict)
    else:
        save_pretrained_quietly(model, directory, state_dict)


def save_pretrained_quietly(
    model: PreTrainedModel, directory: Path, state_dict: dict[str, torch.Tensor] | None = None
) -> None:
    """`save_pretrained` without transformers' per-shard progress bar, which would break the training bar."""
    enabled = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        model.save_pretrained(directory, state_dict=state_dict)
    finally:
        if enabled:
            hf_logging.enable_progress_bar()


def save_checkpoint(
    accelerator: Accelerator, output_dir: Path, state: TrainerState, recipe_yaml: str, keep: int, trained: Trained
) -> Path:
    """Save the full training state atomically as `checkpoints/step_NNNNNN`, keeping the newest `keep`."""
    final = checkpoint_dir(output_dir, state.step)
    tmp = final.with_name(_TMP + final.name)
    if accelerator.is_main_process:
        for stale in (output_dir / CHECKPOINTS).glob(_TMP + "*"):
            shutil.rmtree(stale)
        tmp.mkdir(parents=True)
    accelerator.wait_for_everyone()
    save_model_folder(accelerator, trained.model, tmp, trained.config_overrides, trained.tokenizer)
    if zero_stage(accelerator) is not None:  # the engine writes its (sharded) optimizer state and weights itself
        trained.model.save_checkpoint(str(tmp), tag=ENGINE_DIR, save_latest=False)
    optimizer_state = None
    if is_sharded(trained.model):  # gathered whole on the first process (every process must call it)
        optimizer_state = full_optimizer_state(trained.model, trained.optimizer)
    elif zero_stage(accelerator) is None:
        optimizer_state = trained.optimizer.state_dict()
    if accelerator.is_main_process:
        if optimizer_state is not None:
            save_tree(optimizer_state, tmp, "optimizer")
        for script in tmp.glob("zero_to_*.py"):  # DeepSpeed's merging scripts: `model/` holds the merged weights
            script.unlink()
        save_tree(trained.scheduler.state_dict(), tmp, "scheduler")
    save_tree(random_states(), tmp, f"random_states_{accelerator.process_index}")
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


def load_checkpoint(accelerator: Accelerator, path: Path, trained: Trained) -> TrainerState:
    """Restore model, optimizer, scheduler and RNG states from `path`; return the trainer state. A checkpoint that
    holds a pickle is refused (`ValueError`) before anything is read; DeepSpeed's own tensor files are loaded
    tensors-only (`tensors_only_loading`)."""
    pickles = pickles_in(path)
    if pickles:
        raise ValueError(
            f"{path} holds {', '.join(pickles)}: a file this toolkit never writes (a pickle, or an older version's "
            "checkpoint), which loading could run as code; resume from a checkpoint without it"
        )
    model, optimizer = trained.model, trained.optimizer
    if zero_stage(accelerator) is not None:
        load_engine_state(trained, path)
    elif is_sharded(model):
        load_model_folder(model, path)
        current = current_optimizer_state(model, optimizer)
        load_full_optimizer_state(model, optimizer, with_current_hyperparameters(load_tree(path, "optimizer"), current))
    else:
        load_model_folder(accelerator.unwrap_model(model), path)
        current = optimizer.state_dict()
        optimizer.load_state_dict(with_current_hyperparameters(load_tree(path, "optimizer"), current))
    load_schedule(trained.scheduler, load_tree(path, "scheduler"))
    rng = path / f"random_states_{accelerator.process_index}.json"
    if rng.is_file():  # a run resumed on more processes than wrote it draws fresh on the new ones
        set_random_states(load_tree(path, rng.stem))
    return saved_state(path)


def load_engine_state(trained: Trained, path: Path) -> None:
    """Restore the DeepSpeed engine's weights and optimizer state from `path/ENGINE_DIR`, keeping the optimizer's
    hyperparameters as this run's recipe sets them (only the moments and master weights come from the checkpoint)."""
    groups = trained.optimizer.param_groups
    hyperparameters = [{key: value for key, value in group.items() if key != "params"} for group in groups]
    with tensors_only_loading(trained.model):
        loaded, _ = trained.model.load_checkpoint(str(path), tag=ENGINE_DIR, load_lr_scheduler_states=False)
    if loaded is None:  # DeepSpeed warns and returns None for a missing file
        raise ValueError(f"{path / ENGINE_DIR} holds no DeepSpeed checkpoint of this run's processes")
    for group, values in zip(trained.optimizer.param_groups, hyperparameters, strict=True):
        group.update(values)


def is_checkpoint(path: Path) -> bool:
    return (path / STATE_FILE).is_file() and (path / MODEL_DIR).is_dir()


def _is_model_dir(path: Path) -> bool:
    """A folder `load_model` reads: a saved model (config.json) or an adapter (adapter_config.json)."""
    return (path / "config.json").is_file() or is_adapter_dir(path)


@dataclass(frozen=True)
class SavedModel:
    """Where `retrofit eval` finds a model, the recipe it was trained with, and its training step."""

    model: Path
    recipe: Path
    step: int


def locate_saved_model(path: Path) -> SavedModel:
    """Resolve a run directory (its final `model/` or `adapter/`, else its latest checkpoint), a checkpoint, a model
    folder or an adapter folder.

    The recipe is the `recipe.yaml` in `path` or up to two folders above it; the step is the checkpoint's, or the
    run's latest checkpoint's for a final model. Raises `FileNotFoundError` saying what is missing.
    """
    if not path.exists():
        raise FileNotFoundError(f"{path} does not exist; give a run directory, a checkpoint or a model folder")
    model = next((path / d for d in (MODEL_DIR, ADAPTER_DIR) if _is_model_dir(path / d)), path)
    if not _is_model_dir(model):
        checkpoints = list_checkpoints(path)
        if not checkpoints:
            raise FileNotFoundError(
                f"{path} holds no model: no config.json, adapter_config.json, {MODEL_DIR}/ or {ADAPTER_DIR}/ folder "
                "or checkpoint"
            )
        model = checkpoints[-1]
    recipe = next((p / RECIPE_FILE for p in (path, *path.parents[:2]) if (p / RECIPE_FILE).is_file()), None)
    if recipe is None:
        raise FileNotFoundError(f"no {RECIPE_FILE} in {path} or the two folders above: the eval set comes from it")
    candidates = [path, model, *list_checkpoints(recipe.parent)[-1:]]
    state = next((p / STATE_FILE for p in candidates if (p / STATE_FILE).is_file()), None)
    step = json.loads(state.read_text())["step"] if state else 0
    return SavedModel(model, recipe, step)


def load_model(path: Path) -> nn.Module:
    """The model of a checkpoint, a final `model/` folder (anything `from_pretrained` reads) or an adapter folder
    (on its base, rebuilt by `retrofit.lora.load_adapter` in float32 as the trainer trained on it)."""
    folder = path / MODEL_DIR if is_checkpoint(path) else path
    if is_adapter_dir(folder):
        return load_adapter(folder, dtype=torch.float32)
    return load_saved_model(folder)


def saved_state(checkpoint: Path) -> TrainerState:
    """The trainer state a checkpoint was saved with (its step and tokens seen)."""
    return TrainerState(**json.loads((checkpoint / STATE_FILE).read_text()))


def saved_step(checkpoint: Path) -> int:
    """The step a checkpoint was saved at."""
    return saved_state(checkpoint).step


def discard_after(output_dir: Path, step: int) -> None:
    """Delete the checkpoints and evaluation JSONs of `output_dir` after `step` (all of them for 0): what an
    `--overwrite` run replaces."""
    for checkpoint in list_checkpoints(output_dir):
        if saved_step(checkpoint) > step:
            shutil.rmtree(checkpoint)
    for result in (output_dir / EVAL_DIR).glob(f"{_PREFIX}*.json"):
        if int(result.stem.removeprefix(_PREFIX)) > step:
            result.unlink()


@contextlib.contextmanager
def replaced_atomically(folder: Path) -> Iterator[Path]:
    """Yield a temporary folder to write; on success it replaces `folder` (a crash leaves the old one, or none)."""
    partial = folder.with_name(_TMP + folder.name)
    if partial.exists():
        shutil.rmtree(partial)
    partial.mkdir(parents=True)
    yield partial
    _fsync_tree(partial)
    if folder.exists():
        old = folder.with_name(_TMP + folder.name + ".old")
        os.replace(folder, old)
        os.replace(partial, folder)
        shutil.rmtree(old)
    else:
        os.replace(partial, folder)


def write_atomically(path: Path, text: str) -> None:
    """Write `text` to `path` through a temporary file, so a crash leaves the old file or the new one."""
    tmp = path.with_name(_TMP + path.name)
    tmp.write_text(text)
    os.replace(tmp, path)


def _fsync_tree(root: Path) -> None:
    """Flush the files of a checkpoint to disk before it is renamed into place."""
    for path in root.rglob("*"):
        if path.is_file():
            with path.open("rb") as f:
                os.fsync(f.fileno())


def resume_point(resume: str | None, output_dir: Path, *, overwrite: bool) -> Path | None:
    """The checkpoint to resume from (`auto`: the latest in output_dir, if any).

    Without `--resume`, an output_dir that already has checkpoints is an error unless `overwrite` is set.
    """
    existing = list_checkpoints(output_dir)
    if resume == "auto":
        good = good_checkpoints(output_dir)
        return good[-1] if good else None
    if resume is not None:
        path = Path(resume)
        if not (path / STATE_FILE).is_file():
            raise RecipeError(
                "",
                f"--resume {resume}: not a checkpoint (no {STATE_FILE}); "
                f"use a {CHECKPOINTS}/step_* folder or --resume auto",
                "command line",
            )
        start = saved_step(path)
        later = [c.name for c in existing if saved_step(c) > start]
        if later and not overwrite:
            raise RecipeError(
                "",
                f"--resume {resume}: {output_dir} holds later checkpoints ({', '.join(later)}), which this run would "
                "mix with its own; discard them with --overwrite, or branch off with --set output_dir=...",
                "command line",
            )
        return path
    if existing and not overwrite:
        raise RecipeError(
            "output_dir",
            f"{output_dir} already has checkpoints; continue with --resume auto, "
            "start over with --overwrite, or pick another --set output_dir=...",
        )
    return None
