"""`retrofit` command line: `train`, `sweep`, `validate`, `eval`, `generate`, `push`, `merge`, `report`, `recipes`
and `env`.

Recipe problems exit with code 2 and one line on stderr naming the file, the key and the fix; a training run
whose loss or gradients stop being finite exits with code 3 and keeps its last good checkpoint.
`python -m retrofit ...` is the same command, so `accelerate launch -m retrofit train RECIPE.yaml` works.
"""

from __future__ import annotations

import argparse
import errno
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, NoReturn

if TYPE_CHECKING:
    from packaging.specifiers import SpecifierSet

EXIT_RUNTIME_ERROR = 1
EXIT_RECIPE_ERROR = 2
EXIT_DIVERGED = 3
EXIT_INTERRUPTED = 130

ENV_PACKAGES = (
    ("torch", "torch"),
    ("triton", "triton"),
    ("fla (flash-linear-attention)", "flash-linear-attention"),
    ("fla-core", "fla-core"),
    ("transformers", "transformers"),
    ("accelerate", "accelerate"),
    ("deepspeed", "deepspeed"),
    ("peft", "peft"),
    ("datasets", "datasets"),
)


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; return the exit code."""
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv  # accepted anywhere on the line, for every command
    args = _parser().parse_args([a for a in argv if a != "--debug"])
    args.debug = debug
    for flag, key in SHORTCUTS.items():  # after the --set's, so a shortcut wins
        if getattr(args, _dest(flag), None) is not None:
            args.overrides.append(f"{key}={getattr(args, _dest(flag))}")
    if args.command == "env":
        print(env_report())
        return 0
    from retrofit.recipes import RecipeError
    from retrofit.training.trainer import TrainingDiverged, TrainingInterrupted

    try:
        return args.run(args)
    except RecipeError as exc:
        if args.debug:
            raise
        print(f"error: {exc.line()}", file=sys.stderr)
        return EXIT_RECIPE_ERROR
    except TrainingDiverged as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_DIVERGED
    except TrainingInterrupted as exc:
        print(str(exc), file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except Exception as exc:  # a runtime fault: one line, the traceback only with --debug
        if args.debug:
            raise
        print(f"error: {runtime_error_line(exc)} (rerun with --debug for the traceback)", file=sys.stderr)
        return EXIT_RUNTIME_ERROR


# Flags that stand for a recipe key, as `--set KEY=VALUE` does.
SHORTCUTS = {"--max-steps": "train.max_steps", "--output-dir": "output_dir", "--seed": "seed"}


def _dest(flag: str) -> str:
    return "shortcut_" + flag.removeprefix("--").replace("-", "_")


class _Parser(argparse.ArgumentParser):
    """argparse, with a hint toward `--set` for a flag it does not know (a recipe key, most often)."""

    def error(self, message: str) -> NoReturn:
        if "unrecognized arguments" in message:
            message += "; set a recipe key with --set KEY=VALUE (e.g. --set optimizer.adamw.lr=1e-4)"
        super().error(message)


def runtime_error_line(exc: BaseException) -> str:
    """One line for a runtime fault: the first line of its message, with a hint for the common ones."""
    message = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    if isinstance(exc, OSError) and exc.errno == errno.ENOSPC:
        return f"the disk is full ({message}); free space or set output_dir on another disk"
    if isinstance(exc, PermissionError):
        return f"permission denied ({message}); choose a folder you can write to"
    return message if isinstance(exc, ValueError | OSError) else f"{type(exc).__name__}: {message}"


def _parser() -> argparse.ArgumentParser:
    from retrofit.generate_command import add_generate_parser
    from retrofit.hub import add_push_parser
    from retrofit.lora import add_merge_parser
    from retrofit.report import add_report_parser
    from retrofit.sweep import add_sweep_parser

    parser = _Parser(
        prog="retrofit",
        description="Retrofit sleep onto SSM/attention hybrid LMs. Errors are one line; add --debug to any command "
        "for the traceback.",
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def overrides(p: argparse.ArgumentParser, *, shortcuts: bool = True) -> None:
        p.add_argument(
            "--set",
            dest="overrides",
            action="append",
            default=[],
            metavar="KEY.PATH=VALUE",
            help="override a recipe key (value parsed as YAML); repeatable",
        )
        for flag, key in SHORTCUTS.items() if shortcuts else ():
            p.add_argument(flag, dest=_dest(flag), metavar="VALUE", help=f"the same as --set {key}=VALUE")

    train = commands.add_parser("train", help="train a recipe")
    train.add_argument("recipe", type=Path, help="recipe YAML, or a shipped recipe's name (rule110-tiny)")
    overrides(train)
    train.add_argument(
        "--resume", metavar="PATH|auto", help="continue from a checkpoint folder, or from the latest one in output_dir"
    )
    train.add_argument("--overwrite", action="store_true", help="discard output_dir's checkpoints and start over")
    train.add_argument(
        "--print-launch",
        action="store_true",
        help="for a recipe with launch:, write its DeepSpeed config and print the accelerate command, not run it",
    )
    train.set_defaults(run=_train)

    validate = commands.add_parser("validate", help="check a recipe (with --dry-run: build it and take one step)")
    validate.add_argument("recipe", type=Path, help="recipe YAML, or a shipped recipe's name (rule110-tiny)")
    overrides(validate)
    validate.add_argument(
        "--dry-run",
        action="store_true",
        help="also build model and data, apply sleep and run one optimizer step per stage on a tiny batch",
    )
    validate.set_defaults(run=_validate)

    evaluate = commands.add_parser("eval", help="evaluate a run, a checkpoint or a saved model by difficulty")
    evaluate.add_argument("path", type=Path, help="run directory, checkpoints/step_* folder or model folder")
    overrides(evaluate, shortcuts=False)
    evaluate.add_argument("--output-dir", type=Path, help="where to write results.* (default: PATH)")
    evaluate.set_defaults(run=_eval)

    add_generate_parser(commands)  # retrofit.generate_command
    add_push_parser(commands)  # retrofit.hub
    add_merge_parser(commands)  # retrofit.lora
    add_report_parser(commands)  # retrofit.report
    add_sweep_parser(commands)  # retrofit.sweep

    recipes = commands.add_parser("recipes", help="list the shipped recipes, which train and validate take by name")
    recipes.set_defaults(run=_recipes)
    commands.add_parser("env", help="print the versions of the packages a bug report needs")
    return parser


def _recipes(args: argparse.Namespace) -> int:
    from retrofit.recipes import load_recipe
    from retrofit.shipped import shipped_dir, shipped_recipes

    print(f"Shipped recipes ({shipped_dir('recipes')}); train one with `retrofit train NAME`:\n")
    print("| name | description |\n|---|---|")
    for name in shipped_recipes():
        print(f"| {name} | {load_recipe(name).recipe.description or ''} |")
    return 0


def _train(args: argparse.Namespace) -> int:
    from retrofit.launch import inside_launched_process
    from retrofit.recipes import load_recipe
    from retrofit.training.launcher import launch_train
    from retrofit.training.trainer import train

    loaded = load_recipe(args.recipe, args.overrides)
    with loaded.attributing_errors():
        if args.print_launch or (loaded.recipe.launch is not None and not inside_launched_process()):
            return launch_train(
                loaded, args.overrides, resume=args.resume, overwrite=args.overwrite, print_only=args.print_launch
            )
        train(loaded, resume=args.resume, overwrite=args.overwrite)
    return 0


def _validate(args: argparse.Namespace) -> int:
    from retrofit.launch import check_launch, plan_launch
    from retrofit.recipes import load_recipe, resolve
    from retrofit.training.trainer import DRY_RUN_EXAMPLES, dry_run

    loaded = load_recipe(args.recipe, args.overrides)
    launch = loaded.recipe.launch
    with loaded.attributing_errors():
        check_launch(loaded.recipe)
        if launch is not None and launch.num_processes:  # the batch must split over the processes it names
            plan_launch(loaded.recipe, visible_gpus=0)
        resolved = resolve(loaded.recipe)
        report = dry_run(loaded) if args.dry_run else None
    recipe = loaded.recipe
    print(
        f"recipe OK: {args.recipe} (task {recipe.task.name}, T={resolved.task.seq_len}, L={resolved.sleep.window}, "
        f"N={resolved.sleep.passes}, {resolved.sleep.eviction} eviction, output_dir {recipe.output_dir})"
    )
    if report is not None:
        s = report.summary
        print(
            f"parameters: {s.parameters:,} ({s.trainable:,} trainable; {s.muon_parameters:,} in block matrices, "
            f"{s.blocks} blocks)"
        )
        print(
            f"tokens per step: {report.tokens_per_step:,} ({recipe.train.batch_size} x {resolved.task.seq_len}; "
            f"{report.accumulation_steps} accumulation step(s) of {recipe.micro_batch_size()} per process)"
        )
        print(f"passes per chunk: {report.passes}")
        print(
            f"one optimizer step on {DRY_RUN_EXAMPLES} examples: loss {report.loss:.4f} ({report.device}, "
            f"mixed precision {report.precision})"
        )
        for line in report.stages:
            print(line)
    return 0


def _eval(args: argparse.Namespace) -> int:
    import json
    from dataclasses import asdict

    from retrofit.evaluation import evaluate, format_table, load_eval_set, write_report
    from retrofit.recipes import RecipeError, load_recipe, resolve
    from retrofit.training.checkpoint import load_model, locate_saved_model, write_atomically
    from retrofit.training.trainer import make_accelerator

    try:
        saved = locate_saved_model(args.path)
    except FileNotFoundError as exc:
        raise RecipeError("", str(exc), "command line") from None
    loaded = load_recipe(saved.recipe, args.overrides)
    with loaded.attributing_errors():
        resolved = resolve(loaded.recipe)
    accelerator = make_accelerator(loaded.recipe, trackers=False)
    model = load_model(saved.model)
    for warning in sleep_mismatch(model, resolved.sleep, saved.model):
        print(f"warning: {warning}", file=sys.stderr)
    model = accelerator.prepare(model)
    eval_set = load_eval_set(loaded.recipe.eval, resolved.eval_task, resolved.sleep.window)
    result = evaluate(
        model,
        eval_set,
        task=resolved.eval_task,
        step=saved.step,
        batch_size=loaded.recipe.eval.batch_size,
        accelerator=accelerator,
        window=resolved.sleep.window,
    )
    if accelerator.is_main_process:
        # A folder of its own: a run's results.* stay those of its training.
        out_dir = args.output_dir or args.path / "evaluations" / f"step_{saved.step:06d}"
        write_report(result, out_dir)
        record = {"model": str(saved.model), "recipe": str(saved.recipe), "step": saved.step,
                  "overrides": args.overrides, "sleep": asdict(resolved.sleep), "examples": len(eval_set)}  # fmt: skip
        write_atomically(out_dir / "evaluated.json", json.dumps(record, indent=2) + "\n")
        print(format_table(result))
        print(f"wrote {out_dir}/{{results.json, results.md, results.png, evaluated.json}}")
    return 0


def sleep_mismatch(model: object, expected: object, folder: Path) -> list[str]:
    """What differs between the loaded model's sleep settings and the recipe's (none: the config lost them)."""
    actual = getattr(model, "sleep_config", None)
    if actual is None:
        return [f"{folder} has no sleep_config in its config.json: it is evaluated without sleep"]
    from dataclasses import asdict

    have, want = asdict(actual), asdict(expected)
    return [
        f"{folder}: sleep_config.{key} is {have[key]!r}, the run's recipe says {want[key]!r}; the model's is used"
        for key in sorted(want)
        if have.get(key) != want[key]
    ]


def env_report() -> str:
    """Versions of Python, the packages a bug report needs, and CUDA. Reads metadata; imports no kernels."""
    import platform
    from importlib import metadata

    import torch

    import retrofit

    lines = [
        f"retrofit: {retrofit.__version__}",
        f"python: {platform.python_version()}",
        f"platform: {platform.platform()}",
    ]
    tested = tested_ranges()
    for label, dist in ENV_PACKAGES:
        try:
            version = metadata.version(dist)
        except metadata.PackageNotFoundError:
            version = "not installed"
        lines.append(f"{label}: {version}{range_note(version, tested.get(dist))}")
    if torch.cuda.is_available():
        names = ", ".join(torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count()))
        lines.append(f"CUDA: {torch.version.cuda} ({torch.cuda.device_count()} GPU(s): {names})")
    else:
        built = f"torch built with CUDA {torch.version.cuda}" if torch.version.cuda else "CPU-only torch build"
        lines.append(f"CUDA: not available ({built})")
    return "\n".join(lines)


def tested_ranges() -> dict[str, SpecifierSet]:
    """The version range of each dependency that CI tests, as this installed distribution declares it."""
    from importlib import metadata

    from packaging.requirements import Requirement

    try:
        declared = metadata.requires("sleep-retrofit") or []
    except metadata.PackageNotFoundError:  # run from a checkout that was never installed
        return {}
    requirements = (Requirement(line) for line in declared)
    return {canonical(r.name): r.specifier for r in requirements if r.marker is None and r.specifier}


def range_note(version: str, tested: SpecifierSet | None) -> str:
    """A note that `version` lies inside the tested range, or a warning with the fix when it does not."""
    if tested is None or version == "not installed":
        return ""
    if tested.contains(version, prereleases=True):
        return f" (inside the tested range {tested})"
    return f" (OUTSIDE the tested range {tested}: install the pinned set, pip install -c constraints.txt -e .)"


def canonical(name: str) -> str:
    return name.lower().replace("_", "-")
