"""Optimizers and LR schedules from a recipe's `optimizer:` section.

The paper trains with Muon for the blocks' weight matrices and AdamW for everything else. Here every `nn.Linear`
weight inside the sleep blocks (projections, gate producers, the dynamic conv's kernel generator, LoRA's A and B)
goes to Muon; embeddings, lm_head, norms, biases, `A_log` and `dt_bias` go to AdamW. `MuonWithAdamW` holds both
behind one `torch.optim.Optimizer`, so the trainer, the LR scheduler and checkpoints see a single optimizer. Both
optimizers follow the same schedule: each group's LR is its own base LR times the schedule factor.

The Muon half is `BatchedMuon`: `torch.optim.Muon`'s update, batched over matrices of one shape. A small model's
training step is bound by kernel launches, and torch's Muon launches about 25 kernels per matrix.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from retrofit.recipes.schema import OptimizerSection

# Matrices updated together: at most this many elements (a batch's fp32 stack is 256 MiB, its bf16 copies half that).
MAX_BATCH_ELEMENTS = 1 << 26


class BatchedMuon(torch.optim.Muon):
    """`torch.optim.Muon`, with the matrices of one shape updated together: one Newton–Schulz chain of batched
    matmuls per shape, and foreach ops for the momentum and the weights.

    The same update as torch's (momentum, Nesterov, bf16 Newton–Schulz on the wide orientation, decoupled weight
    decay, the shape's LR adjustment) and the same state (`momentum_buffer` per parameter), so checkpoints move
    between the two. Only the kernels differ: a few per shape instead of about 25 per matrix. Equal to torch's to
    the last bit for fp32 parameters on CPU; bf16 parameters may differ by a rounding (torch decays them with
    another kernel). Extra memory: one batch of updates at a time, at most `MAX_BATCH_ELEMENTS` elements.
    """

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:
        loss = _evaluate(closure)
        for group in self.param_groups:
            params = [p for p in group["params"] if p.grad is not None]
            if not params:
                continue
            grads = [p.grad for p in params]
            buffers = [self._momentum_buffer(p) for p in params]
            momentum, lr, decay = group["momentum"], float(group["lr"]), group["weight_decay"]
            torch._foreach_lerp_(buffers, grads, 1 - momentum)
            if decay:
                torch._foreach_mul_(params, 1 - lr * decay)
            for indices in _same_shape_batches(params):
                batch = [params[i] for i in indices]
                update = torch.stack([buffers[i] for i in indices])
                if group["nesterov"]:
                    update = torch.stack([grads[i] for i in indices]).lerp_(update, momentum)
                ortho = newton_schulz(update, group["ns_coefficients"], group["ns_steps"], group["eps"])
                step_size = adjusted_lr(lr, group["adjust_lr_fn"], batch[0].shape)
                torch._foreach_add_(batch, list(ortho.to(batch[0].dtype).unbind(0)), alpha=-step_size)
        return loss

    def _momentum_buffer(self, param: nn.Parameter) -> torch.Tensor:
        state = self.state[param]
        if "momentum_buffer" not in state:
            state["momentum_buffer"] = torch.zeros_like(param.grad, memory_format=torch.preserve_format)
        return state["momentum_buffer"]


def _evaluate(closure: Callable[[], float] | None) -> float | None:
    """The loss of an optimizer step's `closure`, recomputed with gradients on (the `Optimizer.step` contract)."""
    if closure is None:
        return None
    with torch.enable_grad():
        return closure()


def _same_shape_batches(params: list[nn.Parameter]) -> list[list[int]]:
    """Indices of `params` in batches of one shape, device and dtype, each at most `MAX_BATCH_ELEMENTS` big."""
    by_kind: dict[tuple, list[int]] = {}
    for i, p in enumerate(params):
        by_kind.setdefault((tuple(p.shape), p.device, p.dtype), []).append(i)
    batches = []
    for indices in by_kind.values():
        per_batch = max(1, MAX_BATCH_ELEMENTS // params[indices[0]].numel())
        batches += [indices[start : start + per_batch] for start in range(0, len(indices), per_batch)]
    return batches


def newton_schulz(
    matrices: torch.Tensor, coefficients: tuple[float, float, float], steps: int, eps: float
) -> torch.Tensor:
    """Muon's quintic Newton–Schulz orthogonalisation of each matrix of `matrices` [G, m, n], in bf16, as
    `torch.optim.Muon` computes it for one: Frobenius-normalised, iterated on the wide orientation."""
    a, b, c = coefficients
    x = matrices.bfloat16()
    tall = x.size(-2) > x.size(-1)
    if tall:
        x = x.mT
    x = x / x.norm(dim=(-2, -1), keepdim=True).clamp(min=eps)
    for _ in range(steps):
        gram = x @ x.mT
        x = torch.baddbmm(x, torch.baddbmm(gram, gram, gram, beta=b, alpha=c), x, beta=a)
    return x.mT if tall else x


def adjusted_lr(lr: float, adjust_lr_fn: str | None, shape: torch.Size) -> float:
    """Muon's LR for a matrix of `shape` [A, B] (torch's rule): x sqrt(max(1, A/B)) by default ("original"),
    x 0.2 sqrt(max(A, B)) for "match_rms_adamw"."""
    rows, cols = shape[:2]
    if adjust_lr_fn is None or adjust_lr_fn == "original":
        return lr * math.sqrt(max(1, rows / cols))
    if adjust_lr_fn == "match_rms_adamw":
        return lr * 0.2 * math.sqrt(max(rows, cols))
    return lr


class MuonWithAdamW(torch.optim.Optimizer):
    """`BatchedMuon` on `muon_params` plus `torch.optim.AdamW` on `adamw_params`, as one optimizer.

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
            self.inner["muon"] = BatchedMuon(muon_params, **muon)
        if adamw_params:
            self.inner["adamw"] = torch.optim.AdamW(adamw_params, **adamw)
        super().__init__(self._inner_groups(), defaults={})

    def _inner_groups(self) -> list[dict[str, Any]]:
        return [group for opt in self.inner.values() for group in opt.param_groups]

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:
        loss = _evaluate(closure)
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
