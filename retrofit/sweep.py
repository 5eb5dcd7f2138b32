"""`retrofit sweep RECIPE --over KEY=V1,V2 [--over ...] [--seeds 0,1]`: train a grid of runs, then compare them.

Each run is `retrofit train RECIPE` with its grid values as `--set` overrides, in its own folder under the sweep's
root, named by its values (`passes1-seed0`). Every run's recipe is validated before the first one starts, so a bad
key fails in seconds, not after hours. On a CPU the runs go one after another; on a GPU side by side (CUDA
time-slices the device, so one run's host work overlaps another's kernels). A sweep that stopped (Ctrl-C, a kill)
resumes where it was: finished runs are kept, the others continue from their latest checkpoint (`--resume auto`).
At the end `ROOT/sweep.json` records each run's command, exit code and wall time, and `retrofit report` writes
`ROOT/report/` (tables, plots, JSON) over the runs that finished.
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
from subprocess import PIPE, STDOUT

from retrofit.recipes import RecipeError, load_recipe, resolve, short_key_names

RESULTS_FILE = "results.json"
SWEEP_FILE = "sweep.json"
REPORT_DIR = "report"
POLL_SECONDS = 0.5
LOG_TAIL_LINES = 20
# Keys the sweep sets itself: each run's folder, and the seed (`--seeds`).
RESERVED_KEYS = {"output_dir": "the sweep names each run's folder (use --root)", "seed": "use --seeds 0,1"}

Axis = tuple[str, tuple[str, ...]]


@dataclass(frozen=True)
class SweepRun:
    """One run of a sweep: its grid values, folder, log file and training command."""

    values: tuple[tuple[str, str], ...]  # (recipe key, value), the seed last
    run_dir: Path
    command: list[str]

    @property
    def log(self) -> Path:
        return self.run_dir.with_name(self.run_dir.name + ".log")  # not with_suffix: values hold dots (lr0.01)

    @property
    def label(self) -> str:
        return ", ".join(f"{key}={value}" for key, value in self.values)

    @property
    def finished(self) -> bool:
        return (self.run_dir / RESULTS_FILE).is_file()


@dataclass(frozen=True)
class Outcome:
    """How one run ended: its exit code (0 for a run finished earlier) and its wall time in this sweep."""

    returncode: int
    seconds: float


def parse_axis(text: str) -> Axis:
    """`--over sleep.passes=1,2` as `("sleep.passes", ("1", "2"))`; refuses a reserved or malformed key."""
    key, _, values = text.partition("=")
    key = key.strip()
    choices = tuple(v.strip() for v in values.split(",") if v.strip())
    if not key or not choices:
        raise RecipeError("", f"--over {text!r}: write KEY=VALUE1,VALUE2 (e.g. --over sleep.passes=1,2)", "--over")
    if key in RESERVED_KEYS:
        raise RecipeError(key, f"cannot be swept: {RESERVED_KEYS[key]}", "--over")
    return key, choices


def run_names(grid: Sequence[tuple[tuple[str, str], ...]]) -> list[str]:
    """A folder name per grid point from its values, `passes1-seed0`: each key's last part, or the whole dotted key
    where two keys share a last part (`optimizer.muon.lr` and `optimizer.adamw.lr`)."""
    short = [name.replace(".", "_") for name in short_key_names([key for key, _ in grid[0]])]
    return ["-".join(f"{name}{value}" for name, (_, value) in zip(short, point, strict=True)) for point in grid]


def plan_sweep(
    recipe: str | os.PathLike, axes: Sequence[Axis], seeds: Sequence[int], root: Path, overrides: Sequence[str] = ()
) -> list[SweepRun]:
    """Every run of the grid (axes × seeds), each recipe loaded and validated now: a bad key or value raises
    `RecipeError` naming it before anything trains."""
    keys = [key for key, _ in axes]
    duplicated = sorted({key for key in keys if keys.count(key) > 1})
    if duplicated:
        raise RecipeError(duplicated[0], "is given to --over twice: list all its values in one --over", "--over")
    repeated = next(((key, values) for key, values in axes if len(set(values)) < len(values)), None)
    if repeated is not None:
        raise RecipeError(repeated[0], f"lists a value twice ({','.join(repeated[1])}): give each value once", "--over")
    if len(set(seeds)) < len(seeds):
        raise RecipeError(
            "seed", f"--seeds lists a seed twice ({','.join(map(str, seeds))}): give each once", "--seeds"
        )
    value_lists = [[(key, value) for value in values] for key, values in axes]
    grid = [(*point, ("seed", str(seed))) for point in itertools.product(*value_lists) for seed in seeds]
    runs = []
    for point, name in zip(grid, run_names(grid), strict=True):
        run_dir = root / name
        settings = [*overrides, *(f"{key}={value}" for key, value in point), f"output_dir={run_dir}"]
        loaded = load_recipe(recipe, settings)  # raises RecipeError naming the key and the --set item
        with loaded.attributing_errors():
            resolve(loaded.recipe)  # the checks of sections that the schema leaves open (sleep, task options)
        command = [sys.executable, "-m", "retrofit", "train", str(recipe), "--resume", "auto"]
        runs.append(SweepRun(point, run_dir, command + [arg for s in settings for arg in ("--set", s)]))
    return runs


def run_one_by_one(runs: Sequence[SweepRun]) -> list[Outcome]:
    """Train the runs in turn, each showing its progress here and writing it to its log; finished runs are kept."""
    outcomes = []
    for i, run in enumerate(runs, 1):
        if run.finished:
            print(f"[{i}/{len(runs)}] {run.label}: finished earlier, kept ({run.run_dir})", flush=True)
            outcomes.append(Outcome(0, 0.0))
            continue
        print(f"[{i}/{len(runs)}] {run.label}: training into {run.run_dir} (log {run.log})", flush=True)
        start = time.monotonic()
        with run.log.open("ab") as log, subprocess.Popen(run.command, stdout=PIPE, stderr=STDOUT) as process:
            for chunk in iter(lambda: process.stdout.read1(4096), b""):
                sys.stdout.buffer.write(chunk)
                sys.stdout.flush()
                log.write(chunk)
        outcomes.append(Outcome(process.returncode, round(time.monotonic() - start, 1)))
        seconds = outcomes[-1].seconds
        print(f"[{i}/{len(runs)}] {run.label}: exit {process.returncode} after {seconds:.0f} s", flush=True)
    return outcomes


def run_side_by_side(runs: Sequence[SweepRun], env: dict[str, str] | None = None) -> list[Outcome]:
    """Start every unfinished run at once in the background, wait for all, and say how each ended.

    If waiting is interrupted (Ctrl-C), the runs still going are terminated rather than left behind.
    """
    start = time.monotonic()
    processes: dict[int, subprocess.Popen] = {}
    outcomes: dict[int, Outcome] = {i: Outcome(0, 0.0) for i, run in enumerate(runs) if run.finished}
    try:
        for i, run in enumerate(runs):
            if i in outcomes:
                print(f"{run.label}: finished earlier, kept ({run.run_dir})", flush=True)
                continue
            with run.log.open("ab") as log:
                processes[i] = subprocess.Popen(run.command, env=env, stdout=log, stderr=subprocess.STDOUT)
            print(f"{run.label}: started (pid {processes[i].pid}), log {run.log}", flush=True)
        while len(outcomes) < len(runs):
            for i, process in processes.items():
                if i not in outcomes and process.poll() is not None:
                    outcome = outcomes[i] = Outcome(process.returncode, round(time.monotonic() - start, 1))
                    print(f"{runs[i].label}: exit {outcome.returncode} after {outcome.seconds:.0f} s", flush=True)
            time.sleep(POLL_SECONDS)
        return [outcomes[i] for i in range(len(runs))]
    finally:
        for process in processes.values():
            if process.poll() is None:
                process.terminate()


def side_by_side_env(runs: int) -> dict[str, str]:
    """The environment of runs sharing one machine: its CPU cores split between them."""
    env = dict(os.environ)
    env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // max(runs, 1))))
    return env


def write_json_atomically(path: Path, data: object) -> None:
    """Write JSON through a temporary file and a rename, so a kill never leaves half a file."""
    temporary = path.with_name(path.name + ".tmp")
    temporary.write_text(json.dumps(data, indent=2) + "\n")
    os.replace(temporary, path)


def write_sweep_json(root: Path, recipe: str, runs: Sequence[SweepRun], outcomes: Sequence[Outcome]) -> None:
    """Record what ran, how it ended and how long it took (what recalibrates a recipe's budget); a run kept from an
    earlier invocation keeps the time that invocation recorded."""
    earlier = {}
    if (root / SWEEP_FILE).is_file():
        earlier = {r["run_dir"]: r["seconds"] for r in json.loads((root / SWEEP_FILE).read_text())["runs"]}
    outcomes = [
        Outcome(o.returncode, earlier.get(str(run.run_dir), o.seconds)) if o.seconds == 0.0 else o
        for run, o in zip(runs, outcomes, strict=True)
    ]
    records = [
        {"values": dict(run.values), "run_dir": str(run.run_dir), "log": str(run.log), "command": run.command}
        | {"returncode": outcome.returncode, "seconds": outcome.seconds}
        for run, outcome in zip(runs, outcomes, strict=True)
    ]
    write_json_atomically(root / SWEEP_FILE, {"recipe": str(recipe), "runs": records})


def log_tail(path: Path, lines: int = LOG_TAIL_LINES) -> str:
    """The last `lines` lines of a run's log (progress-bar carriage returns split into lines)."""
    text = path.read_text(errors="replace").replace("\r", "\n") if path.is_file() else ""
    return "\n".join([line for line in text.splitlines() if line.strip()][-lines:])


def default_root(recipe: str | os.PathLike) -> Path:
    """`<the recipe's output_dir>-sweep`, e.g. `runs/rule110-tiny-sweep`."""
    return Path(f"{load_recipe(recipe).recipe.output_dir}-sweep")


def sweep(
    recipe: str | os.PathLike,
    axes: Sequence[Axis],
    seeds: Sequence[int],
    root: Path | None = None,
    overrides: Sequence[str] = (),
    *,
    side_by_side: bool | None = None,
    dry_run: bool = False,
) -> int:
    """Plan, train and report a sweep; return the exit code (0 only when every run and the report succeeded)."""
    from retrofit.report import make_report

    root = (root or default_root(recipe)).absolute()
    runs = plan_sweep(recipe, axes, seeds, root, overrides)
    if side_by_side is None:
        import torch

        side_by_side = torch.cuda.is_available()
    mode = "side by side on one GPU" if side_by_side else "one after another"
    print(f"sweep of {len(runs)} run(s) of {recipe} into {root}, {mode}:")
    for run in runs:
        print(f"  {run.run_dir.name}: {run.label}{' (finished earlier)' if run.finished else ''}")
    if dry_run:
        return 0
    root.mkdir(parents=True, exist_ok=True)
    outcomes = run_side_by_side(runs, side_by_side_env(len(runs))) if side_by_side else run_one_by_one(runs)
    write_sweep_json(root, str(recipe), runs, outcomes)
    failed = [run for run, outcome in zip(runs, outcomes, strict=True) if outcome.returncode != 0]
    for run in failed:
        print(f"{run.label} failed; the end of {run.log}:\n{log_tail(run.log)}", file=sys.stderr)
    finished = [run.run_dir for run in runs if run.finished]
    if not finished:
        return 1
    written = make_report(finished, root / REPORT_DIR)
    print(written[0].read_text(), end="")
    print(f"wrote {', '.join(str(p) for p in written)}")
    return 1 if failed else 0


def add_sweep_parser(subparsers: argparse._SubParsersAction) -> None:
    """Register `retrofit sweep RECIPE --over KEY=V1,V2 ... [--seeds 0,1] [--root DIR] [--dry-run]`."""
    parser = subparsers.add_parser("sweep", help="train a grid of runs (e.g. N=1,2) and compare them")
    parser.add_argument("recipe", help="recipe YAML, or a shipped recipe's name (rule110-tiny)")
    parser.add_argument(
        "--over", dest="axes", action="append", default=[], metavar="KEY.PATH=V1,V2",
        help="a recipe key and its values, one axis of the grid (e.g. sleep.passes=1,2); repeatable",
    )  # fmt: skip
    parser.add_argument("--seeds", type=_seeds, default=(0,), metavar="S1,S2", help="seeds of every point (default 0)")
    parser.add_argument("--root", type=Path, help="where the runs go (default: the recipe's output_dir + '-sweep')")
    parser.add_argument(
        "--set", dest="overrides", action="append", default=[], metavar="KEY.PATH=VALUE",
        help="override a recipe key in every run; repeatable",
    )  # fmt: skip
    parser.add_argument("--dry-run", action="store_true", help="validate every run's recipe and print the plan")
    parser.add_argument(
        "--side-by-side", action=argparse.BooleanOptionalAction, default=None,
        help="run all at once (default on a GPU) or one after another (default on a CPU)",
    )  # fmt: skip
    parser.set_defaults(run=run_sweep)


def _seeds(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(s) for s in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: give comma-separated integers, e.g. 0,1") from None


def run_sweep(args: argparse.Namespace) -> int:
    """Handler of `retrofit sweep`; recipe errors reach the command line's one-line handler."""
    if not args.axes:
        raise RecipeError("", "give at least one --over KEY=V1,V2 (e.g. --over sleep.passes=1,2)", "--over")
    axes = [parse_axis(text) for text in args.axes]
    return sweep(
        args.recipe, axes, args.seeds, args.root, args.overrides, side_by_side=args.side_by_side, dry_run=args.dry_run
    )
