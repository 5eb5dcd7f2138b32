"""Training state (optimizer, LR schedule, random generators) stored without pickles: tensors in safetensors, the
rest in JSON.

Resuming must never run code from a checkpoint, and a pickle can (accelerate's `optimizer.bin`,
`random_states_0.pkl` and `custom_checkpoint_0.pkl` are pickles, loaded with `weights_only=False`). A state dict is
a tree of dicts, lists, tuples, tensors, numpy arrays and JSON scalars; `save_tree` writes its tensors to
`NAME.safetensors` and the rest to `NAME.json`, with tags that keep what JSON would lose (integer dict keys, tuples,
numpy arrays), and `load_tree` rebuilds the same tree. Anything else is refused when saving.

Under DeepSpeed the engine writes its own files (`*.pt`: weights, sharded optimizer state), which it would load with
`torch.load(weights_only=False)`. `tensors_only_loading` makes it load them with `weights_only=True` instead,
allowing only the few DeepSpeed classes its state holds (`DEEPSPEED_STATE_CLASSES`): a pickle that names anything
else is refused before it runs.
"""

from __future__ import annotations

import contextlib
import importlib
import json
import os
import pickle
import random
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file

SUFFIXES = (".json", ".safetensors")
ENGINE_DIR = "engine"  # DeepSpeed's own files in a checkpoint, loaded by `tensors_only_loading`
# What DeepSpeed 0.19's ZeRO checkpoints hold besides tensors and plain containers (found with
# `torch.serialization.get_unsafe_globals_in_checkpoint` on ZeRO-2 and ZeRO-3 checkpoints, bf16 and fp32).
DEEPSPEED_STATE_CLASSES = (
    ("deepspeed.utils.tensor_fragment", "fragment_address"),
    ("deepspeed.runtime.fp16.loss_scaler", "LossScaler"),
    ("deepspeed.runtime.fp16.loss_scaler", "DynamicLossScaler"),
    ("deepspeed.runtime.zero.config", "ZeroStageEnum"),
)


def save_tree(tree: Any, directory: Path, name: str) -> None:
    """Write `tree` as `directory/name.json` and `directory/name.safetensors`."""
    tensors: dict[str, torch.Tensor] = {}
    encoded = _encode(tree, tensors)
    save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, directory / f"{name}.safetensors")
    (directory / f"{name}.json").write_text(json.dumps(encoded) + "\n")


def load_tree(directory: Path, name: str, device: torch.device | str = "cpu") -> Any:
    """The tree `save_tree` wrote, its tensors on `device`."""
    tensors = load_file(directory / f"{name}.safetensors", device=str(device))
    return _decode(json.loads((directory / f"{name}.json").read_text()), tensors)


def _encode(value: Any, tensors: dict[str, torch.Tensor]) -> Any:
    if isinstance(value, torch.Tensor):
        key = str(len(tensors))
        tensors[key] = value
        return {"tensor": key}
    if isinstance(value, np.ndarray):
        return {"ndarray": _encode(torch.from_numpy(value.copy()), tensors), "dtype": str(value.dtype)}
    if isinstance(value, dict):
        return {"dict": [[_encode(k, tensors), _encode(v, tensors)] for k, v in value.items()]}
    if isinstance(value, tuple):
        return {"tuple": [_encode(v, tensors) for v in value]}
    if isinstance(value, list):
        return {"list": [_encode(v, tensors) for v in value]}
    if isinstance(value, np.generic):
        return value.item()
    if value is None or isinstance(value, bool | int | float | str):
        return value
    raise TypeError(f"cannot store a {type(value).__name__} in a checkpoint without pickling it")


def _decode(value: Any, tensors: dict[str, torch.Tensor]) -> Any:
    if not isinstance(value, dict):
        return value
    (kind, content), *extra = value.items()
    if kind == "tensor":
        return tensors[content]
    if kind == "ndarray":
        return _decode(content, tensors).cpu().numpy().astype(extra[0][1])
    if kind == "dict":
        return {_decode(k, tensors): _decode(v, tensors) for k, v in content}
    if kind == "tuple":
        return tuple(_decode(v, tensors) for v in content)
    if kind == "list":
        return [_decode(v, tensors) for v in content]
    raise ValueError(f"unknown entry {kind!r} in a stored training state")


def random_states() -> dict[str, Any]:
    """The random generators this process draws from: Python's, numpy's, torch's CPU and CUDA ones."""
    states: dict[str, Any] = {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        states["cuda"] = torch.cuda.get_rng_state_all()
    return states


def set_random_states(states: dict[str, Any]) -> None:
    """Restore what `random_states` returned."""
    random.setstate(states["python"])
    np.random.set_state(states["numpy"])
    torch.set_rng_state(states["torch"].cpu())
    if "cuda" in states and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([s.cpu() for s in states["cuda"]])


def pickles_in(directory: Path) -> list[str]:
    """The files of a checkpoint that are neither JSON, safetensors nor YAML, nor inside its model folder, nor
    DeepSpeed's tensor files (`ENGINE_DIR/*.pt`, loaded by `tensors_only_loading`): what resuming never unpickles."""
    found = []
    for root, _, files in os.walk(directory):
        for file in files:
            path = Path(root, file).relative_to(directory)
            engine_tensors = path.parts[0] == ENGINE_DIR and path.suffix == ".pt"
            if path.parts[0] != "model" and path.suffix not in (*SUFFIXES, ".yaml") and not engine_tensors:
                found.append(str(path))
    return sorted(found)


@contextlib.contextmanager
def tensors_only_loading(engine: Any) -> Iterator[None]:
    """Within it, the DeepSpeed `engine` loads its checkpoint files with `torch.load(weights_only=True)`, allowing
    `DEEPSPEED_STATE_CLASSES` besides tensors and containers; a file naming any other class raises
    `ValueError` naming the file, without running it."""
    allowed = [getattr(importlib.import_module(module), name) for module, name in DEEPSPEED_STATE_CLASSES]

    def load(path: str, map_location: Any = None) -> Any:
        try:
            with torch.serialization.safe_globals(allowed):
                return torch.load(path, map_location=map_location, weights_only=True)
        except pickle.UnpicklingError as exc:
            named = re.search(r"GLOBAL (\S+)", str(exc))
            what = f"names {named.group(1)}" if named else "is no tensor file"
            raise ValueError(f"{Path(path).name} {what}, not DeepSpeed's state: loading it could run code") from None

    files = engine.checkpoint_engine
    files.load = load  # shadows the class's loader for this instance
    try:
        yield
    finally:
        del files.load
