"""`launch: fsdp2`: the model sharded with torch's FSDP2 (`fully_shard`), one sleep block at a time.

The trainer applies `fully_shard` itself rather than through accelerate's FSDP plugin, for two reasons:
- the sleep loop calls each looped block up to N times per chunk. `shard_model` keeps the loop range's blocks
  gathered from their first call to the end of the step's last backward: not resharded after a forward, nor after
  each use in the backward (the trainer reshards them then, `distributed.micro_step`). Their calls then cost one
  all-gather per looped block and step, instead of two per call (FSDP2's default) or one per call (gathered
  through the forward only: FSDP2 still reshards after each use's backward). Every other block reshards after its
  call, as FSDP2 does by default. `python -m benchmarks.probes.collectives` counts them. accelerate's plugin sets
  one policy for all modules;
- accelerate 1.15 runs FSDP on CUDA only, while the same code here runs on CPU processes over gloo, which is how
  the tests check FSDP2 against one process.

Precision follows the single-process run: fp32 weights, bf16 autocast in the forward when the recipe asks for bf16
(`micro_step`), gradients reduced in fp32. Checkpoints hold the same files as a one-process run's: the model folder
gathered whole, and the optimizer state gathered whole on the first process (`full_optimizer_state`), as
safetensors and JSON: no pickles (torch's distributed checkpoints keep their metadata in one).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.distributed as dist
from peft import PeftModel, get_peft_model_state_dict
from torch import nn
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import FSDPModule, fully_shard
from torch.distributed.tensor import DTensor

_GATHERED = StateDictOptions(full_state_dict=True, cpu_offload=True)
_WHOLE_IN = StateDictOptions(full_state_dict=True)


def shard_model(model: nn.Module, blocks: Sequence[nn.Module], loop: range, device: torch.device) -> nn.Module:
    """Shard `model` across the processes of the default group, in place; returns it.

    Each of the sleep engine's `blocks` (the decoder layers, or a native model's views over them) is its own FSDP
    unit; those in `loop` stay gathered until the caller reshards them (see the module docstring). What
    is left (embedding, final norm, head) belongs to the root unit, `model`. A single process without a process
    group gets a group of one.
    """
    if not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1)
    mesh = init_device_mesh(device.type, (dist.get_world_size(),))
    for index, block in enumerate(blocks):
        fully_shard(block, mesh=mesh, reshard_after_forward=index not in loop)
        if index in loop:
            block.set_reshard_after_backward(False)
    # Views over decoder layers (transformers' native models) sit outside the module tree: the root must leave
    # their layers' weights to them.
    tree = {id(module) for module in model.modules()}
    outside = {param for block in blocks if id(block) not in tree for param in block.parameters()}
    fully_shard(model, mesh=mesh, ignored_params=outside or None)
    return model


def is_sharded(model: nn.Module) -> bool:
    return isinstance(model, FSDPModule)


def local_part(tensor: torch.Tensor) -> torch.Tensor:
    """This process's shard of a sharded parameter; any other tensor itself."""
    return tensor.to_local() if isinstance(tensor, DTensor) else tensor


def full_model_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The whole state dict on the host of the first process (empty on the others); every process must call it.

    A tied weight (the head sharing the embedding) comes once, under its first name, as `save_pretrained` keeps it.
    """
    state = get_model_state_dict(model, options=_GATHERED)
    first = {name for name, _ in model.named_parameters()}
    aliases = {name for name, _ in model.named_parameters(remove_duplicate=False)} - first
    return {name: tensor for name, tensor in state.items() if name not in aliases}


def load_full_model_state(model: nn.Module, state_dict: dict[str, torch.Tensor]) -> None:
    """Load a whole state dict (every process holds it) into the sharded `model`."""
    set_model_state_dict(model, state_dict, options=_WHOLE_IN)


def load_full_adapter_state(model: PeftModel, weights: dict[str, torch.Tensor]) -> list[str]:
    """Load an adapter folder's weights (named as PEFT saves them) into the sharded PEFT `model`; returns the saved
    names that match none of its weights.

    PEFT's own `get_peft_model_state_dict` names each weight of the model as the adapter file does; the model's
    weights are then looked up by those names.
    """
    names = list(model.state_dict())
    probe = {name: torch.tensor(index) for index, name in enumerate(names)}
    saved_as = {key: names[int(index)] for key, index in get_peft_model_state_dict(model, state_dict=probe).items()}
    state = {saved_as[key]: tensor for key, tensor in weights.items() if key in saved_as}
    set_model_state_dict(model, state, options=StateDictOptions(full_state_dict=True, strict=False))
    return sorted(set(weights) - set(saved_as))


def full_optimizer_state(model: nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """The optimizer's whole state, keyed by parameter name, on the host of the first process (empty elsewhere)."""
    return get_optimizer_state_dict(model, optimizer, options=_GATHERED)


def current_optimizer_state(model: nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """The optimizer's state as `full_optimizer_state` keys it, without gathering the moments (its hyperparameters
    are what a resume keeps)."""
    return get_optimizer_state_dict(model, optimizer, options=StateDictOptions(full_state_dict=False))


def load_full_optimizer_state(model: nn.Module, optimizer: torch.optim.Optimizer, state: dict[str, Any]) -> None:
    """Load a whole optimizer state (every process holds it) into the optimizer of the sharded `model`."""
    set_optimizer_state_dict(model, optimizer, state, options=_WHOLE_IN)
