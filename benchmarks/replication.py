"""Issue 9: one command per sweep trains N ∈ {1, 2, 4} at once on one GPU, then reports the runs side by side.

    source .gpu/setup.sh && python3 -m benchmarks.replication rule110 --root /tmp/replicate/rule110 [--seed S]
    python -m benchmarks.replication depo --passes 1,4   # only some N; the others can follow with the same seed
    python -m benchmarks.replication depo --dry-run      # CPU: tiny settings through the whole path, in seconds
    python -m benchmarks.replication depo --root /tmp/tune --tune optimizer.muon.lr=2e-3,1e-2 --tune ...  # N=1 grid

Each N is its own `retrofit train` process on `recipes/replicate/<task>-n<N>.yaml`, with `--set output_dir=ROOT/n<N>`,
`--set seed=S` and then any `--set` given here (e.g. `--set task.options.steps=4` for another Rule 110 depth). All
three start together in the background on the same device: CUDA time-slices the GPU between the processes, so one
run's host work (data generation, kernel launches) overlaps another's kernels; the recipes' comments size the budget
for that. Each run logs to `ROOT/n<N>.log`. When all have exited, `ROOT/sweep.json` records their commands, wall
times and exit codes (what recalibrates the budgets), and `retrofit report` on the runs that finished writes
`ROOT/report/`. The exit code is 0 only when every run and the report succeeded. `--tune` runs N=1 alone at each
combination of the values given, the way the paper chose its learning rates (on the model without sleep, then
shared by all N), and compares them in `ROOT/tuning.md`: final loss per difficulty and exact accuracy.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from benchmarks.triton_cache import use_kept_autotuning
from retrofit.cli import main as retrofit_main
from retrofit.evaluation import EvalResult, load_result

REPO = Path(__file__).resolve().parents[1]
RECIPES = REPO / "recipes" / "replicate"
TASKS = ("rule110", "depo")
PASSES = (1, 2, 4)
POLL_SECONDS = 0.5
LOG_TAIL_LINES = 20
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


@dataclass(frozen=True)
class SweepRun:
    """One run of a sweep: its recipe's training command, output folder and log file."""

    passes: int
    run_dir: Path
    log: Path
    command: list[str]
    settings: tuple[str, ...] = ()  # the tuned values (`--tune`), as KEY=VALUE

    @property
    def label(self) -> str:
        return ", ".join([f"N={self.passes}", *self.settings])


@dataclass(frozen=True)
class Outcome:
    """How one run ended: its exit code and its wall time from the sweep's start."""

    returncode: int
    seconds: float


def plan(
    task: str, root: Path, seed: int, overrides: Sequence[str], *, dry_run: bool, passes: Sequence[int] = PASSES
) -> list[SweepRun]:
    """The training command of each N in `passes`: the N's recipe, its output folder under `root`, the seed, then
    overrides. A subset of N is the same comparison: the data order and the initial weights depend on the seed only."""
    return [_run(task, n, root / f"n{n}", seed, overrides, dry_run=dry_run) for n in passes]


def plan_tuning(
    task: str, root: Path, seed: int, overrides: Sequence[str], grid: Sequence[str], *, dry_run: bool
) -> list[SweepRun]:
    """N=1 at every combination of the `grid`'s values (each `KEY=V1,V2,...`), as the paper tuned its rates: on the
    model without sleep only, the chosen values then shared by every N."""
    axes = []
    for item in grid:
        key, _, values = item.partition("=")
        if not key or not values:
            raise ValueError(f"--tune {item!r}: write KEY=VALUE1,VALUE2,... (e.g. optimizer.muon.lr=2e-3,1e-2)")
        axes.append([f"{key}={value}" for value in values.split(",")])
    return [
        _run(task, 1, root / f"tune{i}", seed, overrides, dry_run=dry_run, tuned=combination)
        for i, combination in enumerate(itertools.product(*axes))
    ]


def _run(
    task: str,
    passes: int,
    run_dir: Path,
    seed: int,
    overrides: Sequence[str],
    *,
    dry_run: bool,
    tuned: Sequence[str] = (),
) -> SweepRun:
    settings = [f"output_dir={run_dir}", f"seed={seed}", *(DRY_RUN_OVERRIDES if dry_run else ()), *overrides, *tuned]
    command = [sys.executable, "-m", "retrofit", "train", str(RECIPES / f"{task}-n{passes}.yaml")]
    command += [arg for setting in settings for arg in ("--set", setting)]
    return SweepRun(passes, run_dir, run_dir.with_suffix(".log"), command, tuple(tuned))


def child_env(runs: int, *, dry_run: bool) -> dict[str, str]:
    """The runs' environment: the CPU cores split between them; `dry_run` hides the GPU so all of it runs on CPU."""
    env = dict(os.environ)
    env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // runs)))
    if dry_run:
        env["CUDA_VISIBLE_DEVICES"] = ""
    return env


def run_concurrently(runs: Sequence[SweepRun], env: dict[str, str]) -> list[Outcome]:
    """Start every run in the background at once, wait for all, and say how each ended.

    If waiting is interrupted (Ctrl-C), the runs still going are terminated rather than left behind.
    """
    start = time.monotonic()
    processes: list[subprocess.Popen] = []
    try:
        for run in runs:
            with run.log.open("w") as log:
                processes.append(subprocess.Popen(run.command, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT))
            print(f"{run.label}: started (pid {processes[-1].pid}), log {run.log}", flush=True)
        outcomes: dict[int, Outcome] = {}
        while len(outcomes) < len(processes):
            for i, process in enumerate(processes):
                if i not in outcomes and process.poll() is not None:
                    outcome = outcomes[i] = Outcome(process.returncode, round(time.monotonic() - start, 1))
                    print(f"{runs[i].label}: exit {outcome.returncode} after {outcome.seconds:.0f} s", flush=True)
            time.sleep(POLL_SECONDS)
        return [outcomes[i] for i in range(len(processes))]
    finally:
        for process in processes:
            if process.poll() is None:
                process.terminate()


def write_sweep_json(path: Path, task: str, seed: int, runs: Sequence[SweepRun], outcomes: Sequence[Outcome]) -> None:
    """Record what ran and how long each run took: the measurement the recipes' budgets are recalibrated with."""
    records = [
        {"passes": r.passes, "settings": list(r.settings), "run_dir": str(r.run_dir), "log": str(r.log)}
        | {"command": r.command}
        | {"returncode": o.returncode, "seconds": o.seconds}
        for r, o in zip(runs, outcomes, strict=True)
    ]
    path.write_text(json.dumps({"task": task, "seed": seed, "runs": records}, indent=2) + "\n")


def tuning_table(runs: Sequence[SweepRun], outcomes: Sequence[Outcome]) -> str:
    """Markdown: each tuned setting's final loss per difficulty and its exact accuracy on the evaluation set."""
    results = {}
    for run, outcome in zip(runs, outcomes, strict=True):
        path = run.run_dir / "results.json"
        results[run.label] = load_result(path) if outcome.returncode == 0 and path.is_file() else outcome.returncode
    found = [r for r in results.values() if isinstance(r, EvalResult)]
    difficulties = sorted({b.difficulty for r in found for b in r.buckets})
    lines = [
        "| run | " + " | ".join(f"loss {d}" for d in difficulties) + " | accuracy |",
        "|---|" + "---:|" * (len(difficulties) + 1),
    ]
    for label, result in results.items():
        if isinstance(result, EvalResult):
            losses = {b.difficulty: f"{b.loss:.4f}" for b in result.buckets}
            cells = [losses.get(d, "-") for d in difficulties] + [f"{result.accuracy:.3f}"]
        else:
            cells = [f"failed (exit {result})"] + ["-"] * len(difficulties)
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def log_tail(path: Path, lines: int = LOG_TAIL_LINES) -> str:
    """The last `lines` lines of a run's log (tqdm's carriage-return updates split into lines)."""
    text = path.read_text(errors="replace").replace("\r", "\n")
    return "\n".join([line for line in text.splitlines() if line.strip()][-lines:])


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.replication",
        description="Train N = 1, 2, 4 of one task at once on one GPU, then run `retrofit report` on them.",
    )
    parser.add_argument("task", choices=TASKS, help="the sweep: recipes/replicate/<task>-n<N>.yaml")
    parser.add_argument("--seed", type=int, default=0, help="seed of all three runs (--set seed=S; default 0)")
    parser.add_argument("--root", type=Path, help="where the runs go (default: runs/replicate/<task>-seed<S>)")
    parser.add_argument(
        "--set", dest="overrides", action="append", default=[], metavar="KEY.PATH=VALUE",
        help="override a key of all three recipes (after --seed and --dry-run's settings); repeatable",
    )  # fmt: skip
    parser.add_argument(
        "--tune", action="append", default=[], metavar="KEY.PATH=V1,V2",
        help="instead of the sweep, N=1 at every combination of these values (the paper tuned its rates on N=1 "
        "only), compared in ROOT/tuning.md; repeatable",
    )  # fmt: skip
    parser.add_argument(
        "--passes", type=_passes, default=PASSES, metavar="N1,N2",
        help="train only these N (default 1,2,4), e.g. one per GPU session; the others can follow with the same seed",
    )  # fmt: skip
    parser.add_argument("--dry-run", action="store_true", help="tiny model, 2 steps, on the CPU: checks the path")
    return parser


def _passes(text: str) -> tuple[int, ...]:
    """`--passes 1,4` as (1, 4); only the N that have a recipe."""
    chosen = tuple(int(n) for n in text.split(",") if n.strip().isdigit())
    if not chosen or any(n not in PASSES for n in chosen) or len(chosen) != len(text.split(",")):
        raise argparse.ArgumentTypeError(f"{text!r}: give a comma-separated subset of {','.join(map(str, PASSES))}")
    return tuple(sorted(set(chosen)))


def main(argv: Sequence[str] | None = None) -> int:
    """Run one sweep and its report; return the exit code (2: the root already holds runs)."""
    args = _parser().parse_args(argv)
    suffix = "-dry-run" if args.dry_run else ""
    root = (args.root or REPO / "runs" / "replicate" / f"{args.task}-seed{args.seed}{suffix}").absolute()
    if args.tune:
        runs = plan_tuning(args.task, root, args.seed, args.overrides, args.tune, dry_run=args.dry_run)
    else:
        runs = plan(args.task, root, args.seed, args.overrides, dry_run=args.dry_run, passes=args.passes)
    taken = [str(r.run_dir) for r in runs if r.run_dir.exists()]
    if taken:
        print(f"error: {', '.join(taken)} already exist(s); remove them or choose another --root", file=sys.stderr)
        return 2
    root.mkdir(parents=True, exist_ok=True)
    if not args.dry_run:
        use_kept_autotuning()
    outcomes = run_concurrently(runs, child_env(len(runs), dry_run=args.dry_run))
    write_sweep_json(root / "sweep.json", args.task, args.seed, runs, outcomes)
    ended = list(zip(runs, outcomes, strict=True))
    failed = [run for run, outcome in ended if outcome.returncode != 0]
    for run in failed:
        print(f"{run.label} failed; the end of {run.log}:\n{log_tail(run.log)}", file=sys.stderr)
    if args.tune:
        table = tuning_table(runs, outcomes)
        (root / "tuning.md").write_text(table)
        print(table, end="")
        return 1 if failed else 0
    finished = [str(run.run_dir) for run, outcome in ended if outcome.returncode == 0]
    if not finished:
        return 1
    code = retrofit_main(["report", *finished, "--out", str(root / "report")])
    return 1 if failed else code


if __name__ == "__main__":
    sys.exit(main())
