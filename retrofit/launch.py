"""Start a recipe on GPUs: its `launch:` mode, the accelerate and DeepSpeed configs, and the `accelerate` command.

A recipe names how it runs with `launch: MODE` or `launch: {mode: MODE, num_processes: N}`:

| mode | accelerate config (`recipes/accelerate/`) | DeepSpeed config (`recipes/deepspeed/`) |
|---|---|---|
| `single_gpu` | `single_gpu.yaml`: one process | none |
| `multi_gpu` | `multi_gpu.yaml`: DDP, every process holds the whole model | none |
| `zero2` | `deepspeed_zero2.yaml` | `zero2.json`: optimizer states and gradients sharded |
| `zero3` | `deepspeed_zero3.yaml` | `zero3.json`: parameters sharded too |
| `fsdp2` | `fsdp2.yaml`: processes only; the trainer shards with FSDP2 (`retrofit.training.fsdp`) | none |

`retrofit train RECIPE` with a mode, run outside a launched process (`retrofit.training.launcher`), checks the
recipe against the mode (`check_launch`), writes the DeepSpeed config with its `"auto"` values filled from the recipe
to `OUTPUT_DIR/deepspeed_config.json`, prints the `accelerate launch` command and runs it. Every process it starts runs
`retrofit train RECIPE` again; those see accelerate's environment (`inside_launched_process`) and train.

Why retrofit fills `"auto"` itself: accelerate derives the micro-batch from a dataloader passed to `prepare`, and the
trainer has none (a batch is a function of seed and step), so the values come from the recipe instead:
`train_batch_size = train_micro_batch_size_per_gpu x gradient_accumulation_steps x processes`, `gradient_clipping`
from `optimizer.grad_clip` (0: off) and `bf16.enabled` from `train.precision`. The same function fills a DeepSpeed
config given to a plain `accelerate launch` (`retrofit.training.distributed.configure_distributed`).

What a mode refuses (`check_launch`, each an error naming the recipe key):
- `optimizer.name: muon` under `zero2`/`zero3`/`fsdp2`: ZeRO hands the optimizer flat 1-D shards of the weights, and
  `torch.optim.Muon` orthogonalises whole 2-D matrices (it raises on its first step). DeepSpeed's own Muon is a
  different optimizer, configured in its JSON, which the trainer's optimizer and schedule cannot drive. FSDP2 gives
  each process row shards of every matrix, which Muon cannot orthogonalise either. Under DDP (`multi_gpu`) every
  process holds whole matrices and the same averaged gradient, so Muon runs as on one GPU.
- stages that train different parameters under `zero2`/`zero3`: DeepSpeed fixes what it partitions and steps when
  the engine is built, so freezing a parameter later does not take it out of the optimizer.
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, get_args

from retrofit.recipes import Recipe, RecipeError
from retrofit.recipes.schema import LaunchMode
from retrofit.shipped import shipped_dir
from retrofit.training.data import accumulation_steps

LAUNCH_MODES: tuple[str, ...] = get_args(LaunchMode)
ZERO_MODES = ("zero2", "zero3")
SHARDED_MODES = (*ZERO_MODES, "fsdp2")  # modes whose optimizer sees shards of the weights
RECIPES_DIR = shipped_dir("recipes")
ACCELERATE_CONFIGS = {
    "single_gpu": "single_gpu.yaml",
    "multi_gpu": "multi_gpu.yaml",
    "zero2": "deepspeed_zero2.yaml",
    "zero3": "deepspeed_zero3.yaml",
    "fsdp2": "fsdp2.yaml",
}
DEEPSPEED_CONFIG_FILE = "deepspeed_config.json"

# Environment variables that a launcher sets in the processes it starts: every accelerate launcher sets
# ACCELERATE_MIXED_PRECISION; torchrun and the DeepSpeed launcher set LOCAL_RANK and WORLD_SIZE.
LAUNCHER_ENV = ("ACCELERATE_MIXED_PRECISION", "LOCAL_RANK", "WORLD_SIZE")

# The DeepSpeed keys a recipe decides (dotted paths), and the recipe key a user changes to change each.
RECIPE_KEYS = {
    "train_batch_size": "train.batch_size",
    "train_micro_batch_size_per_gpu": "train.micro_batch_size",
    "gradient_accumulation_steps": "train.batch_size",
    "gradient_clipping": "optimizer.grad_clip",
    "bf16.enabled": "train.precision",
}


def accelerate_config(mode: str) -> Path:
    """The accelerate config file of a launch mode."""
    return RECIPES_DIR / "accelerate" / ACCELERATE_CONFIGS[mode]


def deepspeed_template(mode: str) -> Path | None:
    """The DeepSpeed config (with `"auto"` values) of a ZeRO mode; `None` for the others."""
    return RECIPES_DIR / "deepspeed" / f"{mode}.json" if mode in ZERO_MODES else None


def inside_launched_process(environ: Mapping[str, str] = os.environ) -> bool:
    """Whether this process was started by `accelerate launch` (or torchrun): then `retrofit train` trains."""
    return any(name in environ for name in LAUNCHER_ENV)


def check_launch(recipe: Recipe, mode: str | None = None, origin: str | None = None) -> None:
    """Refuse what `mode` (default: the recipe's `launch.mode`) cannot run; see the module docstring.

    `origin` says where the mode comes from in the messages (default `launch: MODE`).
    """
    mode = mode or (recipe.launch.mode if recipe.launch else None)
    if mode not in SHARDED_MODES:
        return
    origin = origin or f"launch: {mode}"
    if recipe.optimizer.name == "muon":
        raise RecipeError(
            "optimizer.name",
            f"muon cannot run on sharded weights ({origin}): the optimizer sees shards of each weight and Muon "
            "orthogonalises whole 2-D matrices; use optimizer.name: adamw with this launch, or keep Muon with "
            "launch: multi_gpu (DDP)",
        )
    if mode not in ZERO_MODES:
        return
    stages = recipe.stages or []
    for i, stage in enumerate(stages[1:], start=1):
        if list(stage.trainable) != list(stages[0].trainable):
            raise RecipeError(
                f"stages[{i}].trainable",
                f"differs from stage {stages[0].name!r}, but under DeepSpeed ZeRO ({origin}) the trained parameters "
                "are fixed when the engine is built; give every stage the same trainable patterns, use launch: "
                "multi_gpu, or train each stage as its own recipe (the next one loading the previous model/)",
            )


def deepspeed_values(recipe: Recipe, num_processes: int) -> dict[str, Any]:
    """The DeepSpeed config values the recipe decides, by dotted key, for `num_processes` processes.

    Raises `RecipeError` (`train.batch_size`) when the global batch does not split into micro-batches x processes.
    """
    accumulation, micro = accumulation_steps(recipe, num_processes), recipe.micro_batch_size(num_processes)
    return {
        "train_batch_size": micro * accumulation * num_processes,
        "train_micro_batch_size_per_gpu": micro,
        "gradient_accumulation_steps": accumulation,
        "gradient_clipping": recipe.optimizer.grad_clip or 0.0,
        "bf16.enabled": recipe.train.precision != "fp32",  # DeepSpeed runs on GPUs, where `auto` means bf16
    }


def fill_deepspeed_config(config: Mapping[str, Any], values: Mapping[str, Any], source: str) -> dict[str, Any]:
    """A copy of the DeepSpeed `config` with `values` (dotted keys) written where it says `"auto"` or nothing.

    A value the config sets differently is an error naming the recipe key; so is any `"auto"` left over, which
    nothing would fill. `source` names the config in messages.
    """
    filled = json.loads(json.dumps(config))
    for dotted, value in values.items():
        *parents, leaf = dotted.split(".")
        node = filled
        for part in parents:
            node = node.setdefault(part, {})
        current = node.get(leaf, "auto")
        if current == "auto":
            node[leaf] = value
        elif current != value:
            raise RecipeError(
                RECIPE_KEYS[dotted],
                f'gives {dotted} = {value!r}, but the DeepSpeed config {source} sets {current!r}; set it to "auto" '
                "there so the recipe decides it",
            )
    left = _auto_keys(filled)
    if left:
        raise RecipeError(
            "launch",
            f'the DeepSpeed config {source} leaves {", ".join(left)} as "auto", which retrofit does not fill (it '
            f"fills {', '.join(RECIPE_KEYS)}); give them values there",
        )
    return filled


def _auto_keys(node: Mapping[str, Any], prefix: str = "") -> list[str]:
    found = []
    for key, value in node.items():
        if isinstance(value, Mapping):
            found += _auto_keys(value, f"{prefix}{key}.")
        elif value == "auto":
            found.append(prefix + key)
    return found


@dataclass(frozen=True)
class LaunchPlan:
    """What `retrofit train` starts for a recipe with a launch mode."""

    mode: str
    num_processes: int
    accelerate_config: Path
    deepspeed_config: dict[str, Any] | None  # filled; written to `deepspeed_path`
    deepspeed_path: Path | None


def plan_launch(recipe: Recipe, visible_gpus: int) -> LaunchPlan:
    """The launch of `recipe` (its `launch:` section) on a machine with `visible_gpus` GPUs.

    The process count is `launch.num_processes`, else 1 for `single_gpu` and `visible_gpus` otherwise.
    """
    section = recipe.launch
    mode = section.mode if section else None
    if mode is None:
        raise RecipeError("launch", f"is not set; add launch: MODE with MODE one of {', '.join(LAUNCH_MODES)}")
    check_launch(recipe, mode)
    num_processes = (section.num_processes if section else None) or (1 if mode == "single_gpu" else visible_gpus)
    if num_processes < 1:
        raise RecipeError(
            "launch.num_processes",
            f"no GPU is visible here, so the number of processes for {mode} is unknown; set it, e.g. "
            f"--set launch.num_processes=8, or run on the GPU machine",
        )
    values = deepspeed_values(recipe, num_processes)  # checks the batch arithmetic for every mode
    template = deepspeed_template(mode)
    if template is None:
        return LaunchPlan(mode, num_processes, accelerate_config(mode), None, None)
    filled = fill_deepspeed_config(json.loads(template.read_text()), values, str(template))
    return LaunchPlan(
        mode, num_processes, accelerate_config(mode), filled, Path(recipe.output_dir) / DEEPSPEED_CONFIG_FILE
    )


def write_deepspeed_config(plan: LaunchPlan) -> None:
    """Write the plan's filled DeepSpeed config (if any) where its command reads it."""
    if plan.deepspeed_path is not None:
        plan.deepspeed_path.parent.mkdir(parents=True, exist_ok=True)
        plan.deepspeed_path.write_text(json.dumps(plan.deepspeed_config, indent=2) + "\n")


def accelerate_executable() -> str:
    """The `accelerate` script next to this Python (so the launch uses this environment), else the one on PATH."""
    beside = Path(sys.executable).with_name("accelerate")
    return str(beside) if beside.is_file() else "accelerate"


def launch_command(plan: LaunchPlan, program: Sequence[str]) -> list[str]:
    """`accelerate launch --config_file ... [--deepspeed_config_file ...] --num_processes N PROGRAM...`.

    `program` is what every process runs, e.g. `["-m", "retrofit", "train", "recipe.yaml"]`.
    """
    command = [accelerate_executable(), "launch", "--config_file", str(plan.accelerate_config)]
    if plan.deepspeed_path is not None:
        command += ["--deepspeed_config_file", str(plan.deepspeed_path)]
    return [*command, "--num_processes", str(plan.num_processes), *program]
