"""`retrofit report RUN_DIR... [--out DIR]`: compare any finished runs side by side.

The paper's claims (Fig 2b, Fig 3) compare one task trained with N = 1, 2, 4 on the same data; a sweep may also vary
a learning rate or the seed. This reads what each run directory holds after `retrofit train` (`recipe.yaml`,
`results.json`, the `eval/` step JSONs and the TensorBoard `train/tokens_seen` scalars), groups the runs by task,
labels each by the recipe values in which the runs of its task differ (`N=2, seed=1`; N is `sleep.passes`, L is
`sleep.window`), and writes into the output folder:
- `<task>-accuracy-vs-tokens.png`: exact-match accuracy against training tokens seen, one line per run, one panel
  per difficulty bucket (plus one for all examples when there are several buckets), with the chance level;
- `<task>-loss-vs-tokens.png`: the same for the eval loss per answer token, the paper's Depo metric (Fig 3): a Depo
  example is exact only when all of its 10 answers are, which stays at 0 long after the loss starts to fall;
- `<task>-accuracy-by-difficulty.png`: the final accuracy per bucket, one bar per run;
- `report.md`: per task, tables of the final accuracy and loss (rows: difficulty buckets, columns: runs);
- `report.json`: the same numbers and each run's curves, for scripts.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Literal

import numpy as np
import yaml

from retrofit.config import SleepConfig
from retrofit.evaluation import METRIC, EvalResult, load_result
from retrofit.recipes import short_key_names
from retrofit.training.checkpoint import EVAL_DIR, RECIPE_FILE

RESULTS_FILE = "results.json"
TENSORBOARD_DIR = "tensorboard"
TOKENS_TAG = "train/tokens_seen"
DIFFICULTY_NAMES = {"rule110": "rollout depth t", "depo": "hops k", "gsm_infinite": "operations"}
Metric = Literal["accuracy", "loss"]
METRICS: tuple[Metric, ...] = ("accuracy", "loss")
METRIC_NAMES = {"accuracy": "exact-match accuracy", "loss": "cross-entropy per answer token"}
# Chance levels where a task defines one: Rule 110 answers 4 bits (all right: 1/16; a bit's loss: ln 2).
CHANCE: dict[str, dict[Metric, float]] = {"rule110": {"accuracy": 1 / 16, "loss": math.log(2)}}
# Recipe keys that never tell runs apart, and the short names of the keys a column header shows.
UNCOMPARED_KEYS = ("output_dir", "description")
KEY_NAMES = {"sleep.passes": "N", "sleep.window": "L"}


class ReportError(ValueError):
    """A run directory cannot be reported; the message names it and says what is missing."""


@dataclass(frozen=True)
class Evaluation:
    """One evaluation of a run and the training tokens seen when it was made."""

    tokens_seen: int
    result: EvalResult


@dataclass(frozen=True)
class Run:
    """A run: where it is, what it trained (task, N, seed) and its evaluations, oldest first; `finished` is False
    for a run that never wrote `results.json` (stopped or still going), reported up to its last evaluation."""

    path: Path
    task: str
    passes: int
    seed: int
    evaluations: tuple[Evaluation, ...]
    finished: bool = True
    settings: tuple[tuple[str, str], ...] = ()  # the saved recipe, flattened to (dotted key, value)
    label: str = ""  # the values that tell this run from the others of its task (set by `group_by_task`)

    @property
    def final(self) -> Evaluation:
        """The evaluation at the end of training (the run's `results.json`), or an unfinished run's last one."""
        return self.evaluations[-1]


def load_run(path: Path, *, unfinished: bool = False) -> Run:
    """Read a run directory; raise `ReportError` naming the folder and the file it lacks.

    `unfinished` also takes a run without `results.json` (stopped, or still going) up to its last evaluation.
    """
    if not path.is_dir():
        raise ReportError(f"{path} is not a run directory: no such folder")
    recipe = _read_recipe(path)
    results = path / RESULTS_FILE
    finished = results.is_file()
    earlier = [_read_result(p) for p in sorted((path / EVAL_DIR).glob("step_*.json"))]
    if not finished and not unfinished:
        raise ReportError(
            f"{path} is not a finished run: it has no {RESULTS_FILE} (written when training ends; the run may "
            "still be going, or have failed); pass --unfinished to report it up to its last evaluation"
        )
    if not finished and not earlier:
        raise ReportError(f"{path} has neither {RESULTS_FILE} nor any evaluation in {EVAL_DIR}/: nothing to report")
    final = _read_result(results) if finished else earlier[-1]
    history = [r for r in earlier if r.step < final.step] + [final]
    steps, tokens = tokens_seen_curve(path)
    evaluations = tuple(Evaluation(round(float(np.interp(r.step, steps, tokens))), r) for r in history)
    passes = (recipe.get("sleep") or {}).get("passes", SleepConfig.passes)
    settings = tuple(flatten(recipe))
    return Run(path, recipe["task"]["name"], int(passes), int(recipe.get("seed", 0)), evaluations, finished, settings)


def flatten(data: dict[str, Any], prefix: str = "") -> list[tuple[str, str]]:
    """A nested recipe as (dotted key, value as text) pairs."""
    pairs = []
    for key, value in data.items():
        if isinstance(value, dict) and value:
            pairs += flatten(value, f"{prefix}{key}.")
        else:
            pairs.append((f"{prefix}{key}", json.dumps(value) if isinstance(value, list | dict) else str(value)))
    return pairs


def _read_result(path: Path) -> EvalResult:
    try:
        return load_result(path)
    except ValueError as exc:  # names the file
        raise ReportError(str(exc)) from None


def _read_recipe(path: Path) -> dict[str, Any]:
    """The run's saved recipe (`recipe.yaml`, written when the run starts)."""
    recipe_file = path / RECIPE_FILE
    if not recipe_file.is_file():
        raise ReportError(
            f"{path} is not a run directory: it has no {RECIPE_FILE} (retrofit train writes one into its output_dir)"
        )
    recipe = yaml.safe_load(recipe_file.read_text())
    if not isinstance(recipe, dict) or not isinstance(recipe.get("task"), dict) or "name" not in recipe["task"]:
        raise ReportError(f"{recipe_file} names no task (task.name); is it a recipe saved by retrofit train?")
    return recipe


def tokens_seen_curve(path: Path) -> tuple[list[int], list[float]]:
    """Training tokens seen against step, from the run's TensorBoard scalars, starting at (0, 0).

    The trainer logs `train/tokens_seen` every `train.log_every` steps and at the last step; an evaluation between
    two logged steps is placed by linear interpolation (tokens per step only vary with padding).
    """
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    # the event files sit in tensorboard/<project>/ (tensorboard/ itself in runs of earlier versions)
    folders = sorted({f.parent for f in (path / TENSORBOARD_DIR).rglob("events.out.tfevents.*")})
    points: dict[int, float] = {}
    for folder in folders:
        accumulator = EventAccumulator(str(folder), size_guidance={"scalars": 0})
        accumulator.Reload()
        if TOKENS_TAG in accumulator.Tags()["scalars"]:
            points |= {event.step: event.value for event in accumulator.Scalars(TOKENS_TAG)}  # a resume's last wins
    if not points:
        raise ReportError(
            f"{path} has no {TOKENS_TAG} scalars under {TENSORBOARD_DIR}/ (the x axis of the accuracy curves); "
            "train with tensorboard in train.log_with"
        )
    steps = sorted(points)
    return [0, *steps], [0.0, *(points[s] for s in steps)]


def group_by_task(runs: Sequence[Run]) -> dict[str, list[Run]]:
    """Runs per task, each labelled by the recipe values in which it differs from the others of its task, and
    ordered by those values (numbers by size)."""
    groups: dict[str, list[Run]] = {}
    for run in runs:
        groups.setdefault(run.task, []).append(run)
    return {task: label_runs(group) for task, group in groups.items()}


def label_runs(runs: Sequence[Run]) -> list[Run]:
    """`runs` labelled (`N=2, lr=0.001`) and sorted by their differing recipe values; runs whose recipes are the
    same are told apart by their folder names."""
    values = [dict(run.settings) for run in runs]
    keys = sorted({key for v in values for key in v} - set(UNCOMPARED_KEYS), key=_key_order)
    differing = [key for key in keys if len({v.get(key) for v in values}) > 1]
    names = short_names(differing)
    labels = [
        ", ".join(f"{names[k]}={v.get(k, '–')}" for k in differing) or run.path.name
        for run, v in zip(runs, values, strict=True)
    ]
    if len(set(labels)) < len(labels):
        labels = [
            f"{label} ({run.path.name})" if label else run.path.name for label, run in zip(labels, runs, strict=True)
        ]
    ranked = [
        (tuple(_sort_key(v.get(k, "")) for k in differing), str(run.path), replace(run, label=label))
        for run, v, label in zip(runs, values, labels, strict=True)
    ]
    return [run for *_, run in sorted(ranked, key=lambda item: item[:2])]


def short_names(keys: Sequence[str]) -> dict[str, str]:
    """What a header calls each key: N and L for the sleep schedule, else the key's last part, or the whole key where
    two keys share a last part (`optimizer.muon.lr`, `optimizer.adamw.lr`)."""
    return {key: KEY_NAMES.get(key, name) for key, name in zip(keys, short_key_names(keys), strict=True)}


def _key_order(key: str) -> tuple[int, str]:
    """N and L first, the seed last, the rest by name."""
    rank = list(KEY_NAMES).index(key) if key in KEY_NAMES else len(KEY_NAMES) + (key == "seed")
    return (rank, key)


def _sort_key(value: str) -> tuple[int, float, str]:
    try:
        return (0, float(value), value)
    except ValueError:
        return (1, 0.0, value)


def shared_schedule(runs: Sequence[Run]) -> str:
    """`N=2, L=24` for the sleep values that all `runs` share (the ones that differ are in the labels)."""
    parts = []
    for key, name in KEY_NAMES.items():
        values = {dict(run.settings).get(key) for run in runs}
        if len(values) == 1 and None not in values:
            parts.append(f"{name}={values.pop()}")
    return ", ".join(parts)


def difficulty_name(task: str) -> str:
    """What a task's difficulty buckets count, for axis labels and table headers."""
    return DIFFICULTY_NAMES.get(task, "difficulty")


def difficulties(runs: Sequence[Run]) -> list[int]:
    """Every difficulty bucket that any run's final evaluation reports, in increasing order."""
    return sorted({b.difficulty for run in runs for b in run.final.result.buckets})


def bucket_value(result: EvalResult, difficulty: int, metric: Metric = "accuracy") -> float | None:
    """One bucket's accuracy or loss in `result`; `None` when it has no such bucket."""
    return next((getattr(b, metric) for b in result.buckets if b.difficulty == difficulty), None)


def overall_value(result: EvalResult, metric: Metric) -> float | None:
    """The accuracy over all examples; `None` for the loss, which evaluation keeps per bucket only."""
    return result.accuracy if metric == "accuracy" else None


def markdown_section(task: str, runs: Sequence[Run]) -> str:
    """One task's part of `report.md`: its runs, then final accuracy and loss (rows: buckets, columns: runs)."""
    shared = shared_schedule(runs)
    lines = [f"## {task}" + (f" ({shared})" if shared else ""), ""]
    lines += [
        f"- {r.label}: `{r.path}` (seed {r.seed}, step {r.final.result.step}, {r.final.tokens_seen:,} tokens"
        + ("" if r.finished else "; unfinished: its last evaluation")
        + ")"
        for r in runs
    ]
    for metric in METRICS:
        lines += ["", f"Final {METRIC_NAMES[metric]}:", "", metric_table(task, runs, metric)]
    return "\n".join(lines)


def metric_table(task: str, runs: Sequence[Run], metric: Metric) -> str:
    """Final accuracy or loss as a markdown table: one row per bucket (and all examples, for accuracy), one column
    per run."""
    digits = 3 if metric == "accuracy" else 4
    rows = [(str(d), [bucket_value(r.final.result, d, metric) for r in runs]) for d in difficulties(runs)]
    if metric == "accuracy":
        rows.append(("all", [overall_value(r.final.result, metric) for r in runs]))
    lines = [f"| {difficulty_name(task)} | " + " | ".join(r.label for r in runs) + " |"]
    lines.append("|---:|" + "---:|" * len(runs))
    for label, values in rows:
        lines.append(f"| {label} | " + " | ".join("–" if v is None else f"{v:.{digits}f}" for v in values) + " |")
    return "\n".join(lines)


def summary(groups: dict[str, list[Run]]) -> dict[str, Any]:
    """The report as JSON-able data: per task and run, the final accuracies and losses, and their curves."""

    def evaluation(e: Evaluation) -> dict[str, Any]:
        return {
            "step": e.result.step,
            "tokens_seen": e.tokens_seen,
            "accuracy": e.result.accuracy,
            "buckets": {str(b.difficulty): b.accuracy for b in e.result.buckets},
            "losses": {str(b.difficulty): b.loss for b in e.result.buckets},
        }

    tasks = {
        task: {
            "difficulty": difficulty_name(task),
            "chance": CHANCE.get(task, {}),
            "runs": [
                {"label": r.label, "passes": r.passes, "run_dir": str(r.path), "seed": r.seed, "finished": r.finished}
                | evaluation(r.final)
                | {"curve": [evaluation(e) for e in r.evaluations]}
                for r in runs
            ],
        }
        for task, runs in groups.items()
    }
    return {"metric": METRIC, "loss": METRIC_NAMES["loss"], "tasks": tasks}


def curve(run: Run, difficulty: int | None, metric: Metric) -> list[tuple[int, float]]:
    """(tokens seen, value) of one bucket (`None`: all examples) at each evaluation that reports it."""
    points = []
    for e in run.evaluations:
        value = overall_value(e.result, metric) if difficulty is None else bucket_value(e.result, difficulty, metric)
        if value is not None:
            points.append((e.tokens_seen, value))
    return points


def plot_curves(task: str, runs: Sequence[Run], metric: Metric, path: Path) -> None:
    """Accuracy or loss against tokens seen, one line per run and the chance level; one panel per bucket (plus all
    examples, for the accuracy of several buckets)."""
    plt = _pyplot()
    panels: list[int | None] = [*difficulties(runs)]
    if metric == "accuracy" and len(panels) > 1:
        panels.append(None)  # all examples
    columns = min(len(panels), 3)
    rows = math.ceil(len(panels) / columns)
    fig, axes = plt.subplots(rows, columns, figsize=(4.5 * columns, 3.4 * rows), squeeze=False)
    for ax, difficulty in zip(axes.flat, panels, strict=False):
        for color, run in enumerate(runs):
            points = curve(run, difficulty, metric)
            if points:
                ax.plot(*zip(*points, strict=True), marker="o", color=f"C{color}", label=run.label)
        chance = CHANCE.get(task, {}).get(metric)
        if chance is not None:
            ax.axhline(chance, color="grey", linestyle="--", linewidth=1, label="chance")
        title = "all examples" if difficulty is None else f"{difficulty_name(task)} = {difficulty}"
        ax.set(xlabel="tokens seen", ylabel=METRIC_NAMES[metric], xlim=(0, None), title=title)
        ax.set_ylim(*((0, 1) if metric == "accuracy" else (0, None)))
        ax.legend(fontsize="small")
    for ax in axes.flat[len(panels) :]:
        ax.set_visible(False)
    shared = shared_schedule(runs)
    fig.suptitle(f"{task}: {metric} during training" + (f" ({shared})" if shared else ""))
    _save(fig, path)


def plot_accuracy_by_difficulty(task: str, runs: Sequence[Run], path: Path) -> None:
    """Final accuracy per difficulty bucket, one bar per run, and the chance level."""
    plt = _pyplot()
    buckets = difficulties(runs)
    fig, ax = plt.subplots(figsize=(max(4.5, 0.5 * len(buckets) * len(runs) + 2), 3.6))
    width = 0.8 / len(runs)
    for i, run in enumerate(runs):
        bars = [(x, bucket_value(run.final.result, d)) for x, d in enumerate(buckets)]
        bars = [(x - 0.4 + width * (i + 0.5), accuracy) for x, accuracy in bars if accuracy is not None]
        ax.bar(*zip(*bars, strict=True), width, color=f"C{i}", label=run.label)
    chance = CHANCE.get(task, {}).get("accuracy")
    if chance is not None:
        ax.axhline(chance, color="grey", linestyle="--", linewidth=1, label="chance")
    ax.set_xticks(range(len(buckets)), [str(d) for d in buckets])
    shared = shared_schedule(runs)
    title = f"{task}: final accuracy" + (f" ({shared})" if shared else "")
    ax.set(xlabel=difficulty_name(task), ylabel=METRIC_NAMES["accuracy"], ylim=(0, 1), title=title)
    ax.legend(fontsize="small")
    _save(fig, path)


def _pyplot() -> Any:
    """matplotlib's pyplot on the Agg backend (no display needed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig: Any, path: Path) -> None:
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    _pyplot().close(fig)


def default_out_dir(run_dirs: Sequence[Path]) -> Path:
    """`report/` in the folder that holds the runs (a sweep's root)."""
    return Path(os.path.commonpath([p.absolute().parent for p in run_dirs])) / "report"


def make_report(run_dirs: Sequence[Path], out_dir: Path | None = None, *, unfinished: bool = False) -> list[Path]:
    """Read the runs and write the plots, `report.md` and `report.json` into `out_dir`; return the paths.

    `unfinished` also reports runs that stopped before writing `results.json`, up to their last evaluation.
    """
    run_dirs = [Path(p) for p in run_dirs]
    groups = group_by_task([load_run(p, unfinished=unfinished) for p in run_dirs])
    out_dir = Path(out_dir) if out_dir is not None else default_out_dir(run_dirs)
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    for task, runs in groups.items():
        for metric in METRICS:
            written.append(out_dir / f"{task}-{metric}-vs-tokens.png")
            plot_curves(task, runs, metric, written[-1])
        written.append(out_dir / f"{task}-accuracy-by-difficulty.png")
        plot_accuracy_by_difficulty(task, runs, written[-1])
    markdown, summary_json = out_dir / "report.md", out_dir / "report.json"
    header = f"Accuracy: {METRIC}. Loss: mean {METRIC_NAMES['loss']}, per bucket.\n\n"
    markdown.write_text(header + "\n\n".join(markdown_section(task, runs) for task, runs in groups.items()) + "\n")
    summary_json.write_text(json.dumps(summary(groups), indent=2) + "\n")
    return [markdown, summary_json, *written]


def add_report_parser(subparsers: argparse._SubParsersAction) -> None:
    """Register `retrofit report RUN_DIR... [--out DIR]`."""
    parser = subparsers.add_parser("report", help="compare finished runs side by side: plots, tables, JSON")
    parser.add_argument("run_dirs", nargs="+", type=Path, metavar="RUN_DIR", help="output_dir of a finished run")
    parser.add_argument("--out", type=Path, help="folder to write into (default: report/ beside the runs)")
    parser.add_argument(
        "--unfinished",
        action="store_true",
        help="also report runs without results.json (stopped or still going), up to their last evaluation",
    )
    parser.set_defaults(run=run_report)


def run_report(args: argparse.Namespace) -> int:
    """Handler of `retrofit report`; a folder that is not a finished run exits 2 with one line naming it."""
    try:
        written = make_report(args.run_dirs, args.out, unfinished=args.unfinished)
    except ReportError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(written[0].read_text(), end="")
    print(f"wrote {', '.join(str(p) for p in written)}")
    return 0
