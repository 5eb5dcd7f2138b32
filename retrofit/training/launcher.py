"""`retrofit train` on a recipe with `launch:`: check it once, write its DeepSpeed config, and run `accelerate launch`.

The launch configuration itself (modes, configs, the command) lives in `retrofit.launch`; this is the part that
needs the training side too (the resume point), so that training depends on the launch configuration and not the
reverse.

The printed command is `accelerate launch ...`; it runs as `python -m retrofit.training.launcher launch ...`, the
same launcher, whose own report of a failed process (torch's `ChildFailedError` traceback) is left out: every
process says in one line what went wrong, and the exit code is the failed process's.
"""

from __future__ import annotations

import importlib.util
import shlex
import signal
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

from retrofit.launch import launch_command, plan_launch, write_deepspeed_config
from retrofit.recipes import LoadedRecipe, RecipeError
from retrofit.training.checkpoint import resume_point


def train_program(recipe_path: Path, overrides: Sequence[str], resume: str | None, overwrite: bool) -> list[str]:
    """The `-m retrofit train ...` part of the command: the same recipe, overrides and resume flags."""
    program = ["-m", "retrofit", "train", str(recipe_path)]
    for item in overrides:
        program += ["--set", item]
    if resume is not None:
        program += ["--resume", resume]
    return [*program, "--overwrite"] if overwrite else program


def launch_train(
    loaded: LoadedRecipe,
    overrides: Sequence[str],
    *,
    resume: str | None = None,
    overwrite: bool = False,
    print_only: bool = False,
) -> int:
    """Write the DeepSpeed config, print the `accelerate launch` command and (unless `print_only`) run it.

    Returns the command's exit code (0 when only printing). Checks the recipe and the resume point first, so a
    mistake is reported once here rather than by every process.
    """
    import torch

    from retrofit.recipes import resolve

    recipe = loaded.recipe
    resolve(recipe)  # task, sleep, stages and model config: refused here once, not by every process
    plan = plan_launch(recipe, torch.cuda.device_count())
    resume_point(resume, Path(recipe.output_dir), overwrite=overwrite)
    command = launch_command(plan, train_program(loaded.path, overrides, resume, overwrite))
    write_deepspeed_config(plan)
    print(shlex.join(command), flush=True)
    if print_only:
        return 0
    if plan.deepspeed_path is not None and importlib.util.find_spec("deepspeed") is None:
        raise RecipeError(
            "launch",
            f"{plan.mode} needs DeepSpeed, which is not installed here: pip install deepspeed, or use multi_gpu",
        )
    if plan.num_processes > 1 and torch.cuda.device_count() == 0:
        raise RecipeError(
            "launch.num_processes",
            f"{plan.num_processes} processes on a machine without a visible GPU: accelerate would start them as "
            f"unconnected runs writing the same output_dir; set it to 1, or start CPU processes as one gloo group "
            f"(multi_gpu, fsdp2): ACCELERATE_USE_CPU=1 torchrun --nproc_per_node {plan.num_processes} -m retrofit "
            f"train {loaded.path}",
        )
    return subprocess.run([sys.executable, "-m", __name__, *command[1:]], check=False).returncode


def run_accelerate_launch() -> int:
    """`accelerate launch` (arguments from `sys.argv`); a failed process gives its exit code, not a traceback (a
    signal N gives 128 + N, as a shell reports it)."""
    from accelerate.commands.accelerate_cli import main as accelerate_main
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError

    try:
        accelerate_main()
    except ChildFailedError as exc:
        _, failure = exc.get_first_failure()
        code = failure.exitcode
        if code < 0:
            print(f"error: a training process was killed by {signal.Signals(-code).name}", file=sys.stderr)
            return 128 - code
        return code
    return 0


if __name__ == "__main__":
    sys.exit(run_accelerate_launch())
