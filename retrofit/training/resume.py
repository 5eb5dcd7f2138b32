"""What a resumed run takes from its checkpoint, and what it takes from the recipe as it is now.

A checkpoint stores the recipe it was written with. On resume the two are compared key by key:
- keys that change what is trained or on what data (`model`, `task`, `adapter`, `stages`, `seed`,
  `train.batch_size`) are refused, naming the key;
- every other change (learning rates, schedule, clipping, `max_steps`, sleep, evaluation, logging) is applied, one
  line per key. The optimizer keeps its moments but takes the recipe's hyperparameters; the schedule keeps its
  position but takes the recipe's base rates.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
import yaml

from retrofit.recipes import Recipe, RecipeError

# A change under one of these would train another model or on other data than the checkpoint's.
REFUSED = ("model", "task", "adapter", "stages", "seed", "train.batch_size")


@dataclass(frozen=True)
class Change:
    key: str
    before: Any
    after: Any

    def line(self) -> str:
        return f"resume: {self.key} changed from {self.before!r} to {self.after!r} (applied)"


def recipe_changes(saved_yaml: str, recipe: Recipe) -> list[Change]:
    """The keys whose values differ between the checkpoint's recipe and `recipe` (output_dir and description aside);
    `RecipeError` naming the first one that cannot change on resume (`REFUSED`)."""
    before = dict(_flat(yaml.safe_load(saved_yaml) or {}))
    after = dict(_flat(recipe.model_dump(mode="json")))
    changes = [
        Change(key, before.get(key), after.get(key))
        for key in sorted(before.keys() | after.keys())
        if before.get(key) != after.get(key) and key not in ("output_dir", "description")
    ]
    for change in changes:
        if any(change.key == r or change.key.startswith(r + ".") for r in REFUSED):
            raise RecipeError(
                change.key,
                f"changed since the checkpoint (was {change.before!r}, now {change.after!r}), which would train "
                "another model or on other data; resume with the checkpoint's recipe.yaml, or start a new run",
            )
    return changes


def _flat(tree: Any, prefix: str = "") -> Iterator[tuple[str, Any]]:
    if isinstance(tree, dict) and tree:
        for key, value in tree.items():
            yield from _flat(value, f"{prefix}.{key}" if prefix else str(key))
    else:
        yield prefix, tree


def with_current_hyperparameters(saved: Any, current: Any) -> Any:
    """A saved optimizer state dict whose param groups take `current`'s hyperparameters (its moments are kept).
    Works through optimizers made of several (`MuonWithAdamW`'s `{name: state_dict}`)."""
    if isinstance(saved, dict) and "param_groups" in saved and "state" in saved:
        pairs = zip(saved["param_groups"], current["param_groups"], strict=True)
        groups = [{**now, "params": then["params"]} for then, now in pairs]
        return {**saved, "param_groups": groups}
    if isinstance(saved, dict):
        return {key: with_current_hyperparameters(value, current[key]) for key, value in saved.items()}
    return saved


def load_schedule(scheduler: torch.optim.lr_scheduler.LambdaLR, saved: dict[str, Any]) -> None:
    """Restore the schedule's position from `saved`, keeping this run's base rates, and set the optimizer's rates
    for that position."""
    base_lrs = list(scheduler.base_lrs)
    scheduler.load_state_dict(saved)
    scheduler.base_lrs = base_lrs
    factors: list[Callable[[int], float]] = scheduler.lr_lambdas
    for group, base, factor in zip(scheduler.optimizer.param_groups, base_lrs, factors, strict=True):
        group["lr"] = base * factor(scheduler.last_epoch)
    scheduler._last_lr = [group["lr"] for group in scheduler.optimizer.param_groups]
