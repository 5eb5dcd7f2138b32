"""Optimizers and LR schedules from a recipe's `optimizer:` section.

The paper trains with Muon for the blocks' weight matrices and AdamW for everything else. Here every `nn.Linear`
weight inside the sleep blocks (projections, gate producers, the dynamic conv's kernel generator, LoRA's A and B)
goes to Muon; embeddings, lm_head, norms, biases, `A_log` and `dt_bias` go to AdamW. `MuonWithAdamW` holds both
behind one `torch.optim.Optimizer`, so the trainer, the LR scheduler and checkpoints see a single optimizer. Both
optimizers follow the same schedule: each group's LR is its own base LR times the schedule factor.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from retrofit.recipes.schema import OptimizerSection


class MuonWithAdamW(torch.optim.Optimizer):
    """`torch.optim.Muon` on `muon_params` plus `torch.optim.AdamW` on `adamw_params`, as one optimizer.

    The param groups are the inner optimizers' own group dicts, so an LR scheduler that sets
    `param_groups[i]["lr"]` drives both. An empty list gets no inner optimizer (a LoRA adapter on Jet-Nemotron
    trains block matrices only).
    """

    def __init__(
        self,
        muon_params: list[nn.Parameter],
        adamw_params: list[nn.Parameter],
        muon: dict[str, Any],
        adamw: dict[str, Any],
    ) -> None:
        if not muon_params and not adamw_params:
            raise ValueError("nothing to optimize: no parameter of the model requires a gradient")
        self.inner: dict[str, torch.optim.Optimizer] = {}
        if muon_params:
            self.inner["muon"] = torch.optim.Muon(muon_params, **muon)
        if adamw_params:
            self.inner["adamw"] = torch.optim.AdamW(adamw_params, **adamw)
        super().__init__(self._inner_groups(), defaults={})

    def _inner_groups(self) -> list[dict[str, Any]]:
        return [group for opt in self.inner.values() for group in opt.param_groups]

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for opt in self.inner.values():
            opt.step()
        return loss

    def state_dict(self) -> dict[str, Any]:
        return {name: opt.state_dict() for name, opt in self.inner.items()}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        for name, opt in self.inner.items():
            opt.load_state_dict(state_dict[name])
        # Loading replaces the inner group dicts; share the new ones again.
        self.param_groups = self._inner_groups()


def split_parameters(model: nn.Module) -> tuple[list[nn.Parameter], list[nn.Parameter]]:
    """(Muon params, AdamW params): Muon takes the weights of the `nn.Linear` layers inside the sleep blocks, AdamW
    everything else that trains (module docstring)."""
    blocks = model.get_sleep_adapter().blocks
    matrices = [m.weight for m in blocks.modules() if isinstance(m, nn.Linear) and m.weight.requires_grad]
    matrix_ids = {id(p) for p in matrices}
    rest = [p for p in model.parameters() if p.requires_grad and id(p) not in matrix_ids]
    return matrices, rest


def build_optimizer(model: nn.Module, section: OptimizerSection) -> torch.optim.Optimizer:
    """The optimizer a recipe asks for (`muon`: Muon + AdamW; `adamw`: AdamW on every parameter)."""
    adamw = section.adamw
    adamw_kwargs = {"lr": adamw.lr, "betas": adamw.betas, "eps": adamw.eps, "weight_decay": adamw.weight_decay}
    if section.name == "adamw":
        return torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], **adamw_kwargs)
    muon = section.muon
    muon_kwargs = {
        "lr": muon.lr,
        "momentum": muon.momentum,
        "weight_decay": muon.weight_decay,
        "nesterov": muon.nesterov,
        "ns_steps": muon.ns_steps,
        "adjust_lr_fn": muon.adjust_lr_fn,
    }
    matrices, rest = split_parameters(model)
    return MuonWithAdamW(matrices, rest, muon_kwargs, adamw_kwargs)


def schedule_factor(section: OptimizerSection, max_steps: int) -> Callable[[int], float]:
    """LR multiplier per optimizer step: linear warmup to 1, then `schedule` down to `min_lr_ratio`."""
    warmup, floor = section.warmup_steps, section.min_lr_ratio

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        if section.schedule == "constant":
            return 1.0
        progress = min(1.0, (step - warmup) / max(1, max_steps - warmup))
        shape = 0.5 * (1 + math.cos(math.pi * progress)) if section.schedule == "cosine" else 1 - progress
        return floor + (1 - floor) * shape

    return factor


def build_scheduler(
    optimizer: torch.optim.Optimizer, section: OptimizerSection, max_steps: int
) -> torch.optim.lr_scheduler.LambdaLR:
    """A `LambdaLR` stepping once per optimizer step with `schedule_factor`."""
    return torch.optim.lr_scheduler.LambdaLR(optimizer, schedule_factor(section, max_steps))
