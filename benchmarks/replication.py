"""Issue 9: the paper's sweeps (N ∈ {1, 2, 4} of one task at once on one GPU) as `retrofit sweep` calls.

    source .gpu/setup.sh && python3 -m benchmarks.replication rule110 --root /tmp/replicate/rule110 [--seed S]
    python -m benchmarks.replication depo --passes 1,4   # only some N; the others can follow with the same seed
    python -m benchmarks.replication depo --dry-run      # CPU: tiny settings through the whole path, in seconds
    python -m benchmarks.replication depo --root /tmp/tune --tune optimizer.muon.lr=2e-3,1e-2 --tune ...  # N=1 grid

This is `retrofit sweep recipes/replicate/<task>.yaml --over sleep.passes=1,2,4 --seeds S` with the runs side by
side on the device, the kept Triton autotuning results seeded first. `--tune` sweeps N=1 alone over the values
given, the way the paper chose its learning rates (on the model without sleep, then shared by all N); its report
compares them by those values. `--dry-run` shrinks the model and budget and hides the GPU, so the whole path runs on
a CPU in seconds. The runs, `sweep.json` and `report/` go under ROOT (see `retrofit.sweep`).
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence
from pathlib import Path

from benchmarks.triton_cache import use_kept_autotuning
from retrofit.recipes import RecipeError
from retrofit.sweep import Axis, parse_axis, sweep

REPO = Path(__file__).resolve().parents[1]
RECIPES = REPO / "recipes" / "replicate"
TASKS = ("rule110", "depo")
PASSES = (1, 2, 4)
# --dry-run: the recipes' data and sleep settings on a d=16 model, 2 steps of 4 examples, a 4-per-bucket eval.
DRY_RUN_OVERRIDES = (
    "model.config.hidden_size=16",
    "model.config.intermediate_size=32",
    "model.config.num_attention_heads=2",
    "model.config.linear_num_heads=2",
    "model.config.linear_head_dim=8",
    "train.max_steps=2",
    "train.batch_size=4",
    "train.micro_batch_size=4",
    "train.log_every=1",
    "eval.every_steps=1",
    "eval.source=generated",
    "eval.num_per_difficulty=4",
    "eval.batch_size=32",
)


def sweep_plan(
    passes: Sequence[int], tune: Sequence[str], overrides: Sequence[str], *, dry_run: bool
) -> tuple[list[Axis], list[str]]:
    """The sweep's axes and overrides: N over `passes`, or (tuning) N=1 and the tuned keys' values."""
    settings = [*(DRY_RUN_OVERRIDES if dry_run else ()), *overrides]
    if tune:
        return [parse_axis(item) for item in tune], [*settings, "sleep.passes=1"]
    return [("sleep.passes", tuple(str(n) for n in passes))], settings


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.replication",
        description="Train N = 1, 2, 4 of one task at once on one GPU (retrofit sweep), then compare them.",
    )
    parser.add_argument("task", choices=TASKS, help="the sweep: recipes/replicate/<task>.yaml over sleep.passes")
    parser.add_argument("--seed", type=int, default=0, help="seed of all runs (default 0)")
    parser.add_argument("--root", type=Path, help="where the runs go (default: runs/replicate/<task>-seed<S>)")
    parser.add_argument(
        "--set", dest="overrides", action="append", default=[], metavar="KEY.PATH=VALUE",
        help="override a key of every run (after --dry-run's settings); repeatable",
    )  # fmt: skip
    parser.add_argument(
        "--tune", action="append", default=[], metavar="KEY.PATH=V1,V2",
        help="instead of the N sweep, N=1 over these values (the paper tuned its rates on N=1 only); repeatable",
    )  # fmt: skip
    parser.add_argument(
        "--passes", type=_passes, default=PASSES, metavar="N1,N2",
        help="train only these N (default 1,2,4), e.g. one per GPU session; the others can follow with the same seed",
    )  # fmt: skip
    parser.add_argument("--dry-run", action="store_true", help="tiny model, 2 steps, on the CPU: checks the path")
    return parser


def _passes(text: str) -> tuple[int, ...]:
    """`--passes 1,4` as (1, 4); only the N of the paper's sweeps."""
    chosen = tuple(int(n) for n in text.split(",") if n.strip().isdigit())
    if not chosen or any(n not in PASSES for n in chosen) or len(chosen) != len(text.split(",")):
        raise argparse.ArgumentTypeError(f"{text!r}: give a comma-separated subset of {','.join(map(str, PASSES))}")
    return tuple(sorted(set(chosen)))


def main(argv: Sequence[str] | None = None) -> int:
    """Run one sweep and its report; return the exit code (2: a bad key or value, named in one line)."""
    args = _parser().parse_args(argv)
    suffix = "-dry-run" if args.dry_run else ""
    root = args.root or REPO / "runs" / "replicate" / f"{args.task}-seed{args.seed}{suffix}"
    if args.dry_run:
        os.environ["CUDA_VISIBLE_DEVICES"] = ""  # the runs inherit it: all on the CPU
    else:
        use_kept_autotuning()
    try:
        axes, overrides = sweep_plan(args.passes, args.tune, args.overrides, dry_run=args.dry_run)
        return sweep(RECIPES / f"{args.task}.yaml", axes, [args.seed], root, overrides, side_by_side=True)
    except RecipeError as exc:
        print(f"error: {exc.line()}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
