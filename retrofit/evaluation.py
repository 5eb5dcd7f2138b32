"""Evaluation by difficulty bucket and by window, and its reports (JSON, markdown tables, PNG plot).

An example is correct when every supervised token is the argmax of the logits at the position before it, all from
one forward pass (wake only: no extra loops at prediction time, as in the paper). Each bucket (rollout steps, hops,
operations, a data task's difficulty field: the task's `difficulty`) reports its exact-match accuracy (where the task
scores one) and its mean cross-entropy per supervised token.

The loss by window index is the mean loss of the supervised tokens in window 1, 2, 3 ... (positions [0, L), [L, 2L),
...): by window k, the context of k - 1 windows has been evicted and lives on only in the fast state. It is the
curve that shows what sleep keeps.
"""

from __future__ import annotations

import json
import warnings
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import datasets
import torch
import torch.nn.functional as F
from accelerate import Accelerator
from torch import Tensor, nn

from retrofit.engine import IGNORE_INDEX, next_token_targets
from retrofit.recipes.schema import EvalSection
from retrofit.tasks import Task
from retrofit.training.checkpoint import write_atomically
from retrofit.training.data import collate
from retrofit.training.distributed import gathers_per_call

METRIC = "exact match of all supervised tokens (greedy argmax, one forward pass)"


@dataclass(frozen=True)
class Bucket:
    """One difficulty bucket's results."""

    difficulty: int
    examples: int
    correct: int
    accuracy: float
    loss: float


@dataclass(frozen=True)
class WindowLoss:
    """The supervised tokens of one window (1-based `window`: positions [(window - 1) L, window L))."""

    window: int
    tokens: int
    loss: float


@dataclass(frozen=True)
class EvalResult:
    """All buckets of one evaluation, at training step `step`, and the loss by window of length `window_length`."""

    task: str
    step: int
    buckets: list[Bucket]
    windows: list[WindowLoss] = field(default_factory=list)
    window_length: int | None = None
    exact_match: bool = True  # False: accuracy is not a meaningful number for this task (`text`)

    @property
    def accuracy(self) -> float:
        """Exact-match accuracy over all examples."""
        total = sum(b.examples for b in self.buckets)
        return sum(b.correct for b in self.buckets) / max(total, 1)

    def to_dict(self) -> dict:
        return {
            "task": self.task,
            "step": self.step,
            "metric": METRIC,
            "accuracy": self.accuracy,
            "buckets": [asdict(b) for b in self.buckets],
            "window_length": self.window_length,
            "windows": [asdict(w) for w in self.windows],
            "exact_match": self.exact_match,
        }


def load_eval_set(section: EvalSection, task: Task, window: int | None = None) -> datasets.Dataset:
    """The recipe's eval set: the frozen file in data/ (or `eval.path`), or a freshly generated one.

    `resolve` has checked that a frozen set holds every difficulty bucket of the task. Warns when every example
    fits in one `window` (the recipe's L): nothing would be evicted, so the evaluation would not measure sleep.
    """
    if task.has_held_out:
        dataset = task.held_out()
    elif section.source == "generated":
        dataset = task.eval_dataset(section.num_per_difficulty, section.seed)
    else:
        dataset = task.load_frozen_eval(section.path)
    longest = max((len(ids) for ids in dataset["input_ids"]), default=0)
    if window is not None and longest <= window:
        warnings.warn(
            f"every evaluation example fits in one window (longest {longest} tokens, sleep.window {window}): nothing "
            f"is evicted, so the evaluation does not measure sleep; evaluate longer examples "
            f"(eval.source: generated with eval.task_options)",
            stacklevel=2,
        )
    return dataset


@torch.no_grad()
def evaluate(
    model: nn.Module,
    dataset: datasets.Dataset,
    *,
    task: Task,
    step: int,
    batch_size: int,
    accelerator: Accelerator,
    window: int | None = None,
) -> EvalResult:
    """Evaluate `model` on `dataset`; each process takes every N-th example and the counts are summed. With `window`
    (the sleep window L), also the loss by window index.

    Under DeepSpeed ZeRO-3 and FSDP2 every process evaluates the whole set instead: its all-gathers pair up by the
    order of module calls, so processes with different batches (or a different number of them) would deadlock.
    """
    difficulties = sorted(set(dataset["difficulty"]))
    slot = {d: i for i, d in enumerate(difficulties)}
    # Per bucket: examples, correct, summed token loss, supervised tokens.
    sums = torch.zeros(len(difficulties), 4, dtype=torch.float64, device=accelerator.device)
    longest = max((len(ids) for ids in dataset["input_ids"]), default=1)
    num_windows = -(-longest // window) if window else 0
    by_window = torch.zeros(num_windows, 2, dtype=torch.float64, device=accelerator.device)  # summed loss, tokens
    replicated = gathers_per_call(accelerator, model)
    rank, world = accelerator.process_index, accelerator.num_processes
    shard = dataset if replicated else dataset.select(range(rank, len(dataset), world))
    was_training = model.training
    sleeping = getattr(getattr(model, "module", model), "sleep_config", None) is not None  # DDP, DeepSpeed wrap
    model.eval()
    for start in range(0, len(shard), batch_size):
        rows = shard[start : start + batch_size]
        examples = [{key: rows[key][j] for key in rows} for j in range(len(rows["difficulty"]))]
        batch = {k: v.to(accelerator.device) for k, v in collate(examples, task.tokenizer.pad_token_id).items()}
        targets = next_token_targets(batch["labels"], batch["attention_mask"].bool())
        supervised = targets != IGNORE_INDEX
        with accelerator.autocast():  # what `prepare` adds to a forward; FSDP2's model is not prepared
            token_loss, token_correct = _token_scores(model, batch, targets, sleeping)
        correct = token_correct.all(dim=1)
        per_example = torch.stack(
            [torch.ones_like(correct), correct, token_loss.sum(dim=1), supervised.sum(dim=1)], dim=1
        ).double()
        index = torch.tensor([slot[d] for d in rows["difficulty"]], device=accelerator.device)
        sums.index_add_(0, index, per_example)
        if window:  # logits at t score the label at t + 1, which lies in window (t + 1) // L
            label_window = (torch.arange(1, targets.shape[1] + 1, device=targets.device) // window).expand_as(targets)
            by_window.index_add_(
                0, label_window[supervised], torch.stack([token_loss[supervised], supervised[supervised]], 1).double()
            )
    model.train(was_training)
    sums = (sums if replicated else accelerator.reduce(sums, reduction="sum")).cpu()
    by_window = (by_window if replicated else accelerator.reduce(by_window, reduction="sum")).cpu()
    buckets = [
        Bucket(d, int(n), int(c), float(c / max(n, 1)), float(loss / max(tokens, 1)))
        for d, (n, c, loss, tokens) in zip(difficulties, sums.tolist(), strict=True)
    ]
    windows = [WindowLoss(k + 1, int(n), float(loss / n)) for k, (loss, n) in enumerate(by_window.tolist()) if n]
    return EvalResult(task.name, step, buckets, windows, window, task.scores_exact_match)


def _token_scores(model: nn.Module, batch: dict, targets: torch.Tensor, sleeping: bool) -> tuple[Tensor, Tensor]:
    """Each position's next-token loss (0 without a label) and whether its argmax is its label (True without one).

    A sleeping model scores its tokens itself, a chunk of head rows at a time (`return_token_scores`): `[B, T, V]`
    logits of a 248K vocabulary would not fit. A model without sleep (one whose saved `sleep_config` is gone) is
    scored from its logits."""
    if sleeping:
        out = model(**batch, return_token_scores=True)
        return out.token_loss, out.token_correct
    logits = model(**batch).logits.float()
    loss = F.cross_entropy(logits.transpose(1, 2), targets, ignore_index=IGNORE_INDEX, reduction="none")
    return loss, (logits.argmax(-1) == targets) | (targets == IGNORE_INDEX)


def format_table(result: EvalResult) -> str:
    """Markdown tables: one row per difficulty bucket, then all examples; then the loss by window index."""
    metric = METRIC if result.exact_match else "mean loss per supervised token"
    lines = [
        f"Evaluation of {result.task} at step {result.step}: {metric}",
        "",
        "| difficulty | examples | accuracy | loss |",
        "|---:|---:|---:|---:|",
    ]
    accuracy = (lambda a: f"{a:.3f}") if result.exact_match else (lambda a: "n/a")
    lines += [f"| {b.difficulty} | {b.examples} | {accuracy(b.accuracy)} | {b.loss:.4f} |" for b in result.buckets]
    total = sum(b.examples for b in result.buckets)
    lines.append(f"| all | {total} | {accuracy(result.accuracy)} | |")
    if result.windows:
        lines += [
            "",
            f"Loss by window (L = {result.window_length}): the supervised tokens of window k, after k - 1 windows of "
            "context were evicted",
            "",
            "| window | tokens | loss |",
            "|---:|---:|---:|",
        ]
        lines += [f"| {w.window} | {w.tokens} | {w.loss:.4f} |" for w in result.windows]
    return "\n".join(lines)


def write_report(result: EvalResult, out_dir: Path, history: Sequence[EvalResult] = ()) -> list[Path]:
    """Write `results.md`, `results.png` and, last, `results.json` into `out_dir`, each atomically; return their
    paths. `history` (earlier evaluations of the same run) adds an accuracy-over-training panel to the plot."""
    out_dir.mkdir(parents=True, exist_ok=True)
    json_path, md_path, png_path = out_dir / "results.json", out_dir / "results.md", out_dir / "results.png"
    write_atomically(md_path, format_table(result) + "\n")
    partial = png_path.with_name(f".{png_path.stem}.partial.png")
    plot(result, history, partial)
    partial.replace(png_path)
    write_atomically(json_path, json.dumps(result.to_dict(), indent=2) + "\n")
    return [json_path, md_path, png_path]


def plot(result: EvalResult, history: Sequence[EvalResult], path: Path) -> None:
    """Accuracy (or, for a task without exact match, loss) per bucket; with a history, the same over training
    steps; with windows, the loss by window index."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    score = (lambda b: b.accuracy) if result.exact_match else (lambda b: b.loss)
    ylabel, ylim = ("exact-match accuracy", (0, 1)) if result.exact_match else ("loss per token", None)
    panels = 1 + bool(history) + bool(result.windows)
    fig, axes = plt.subplots(1, panels, figsize=(5 * panels, 3.6), squeeze=False)
    ax = axes[0][0]
    labels = [str(b.difficulty) for b in result.buckets]
    ax.bar(labels, [score(b) for b in result.buckets], color="tab:blue")
    ax.set(xlabel="difficulty", ylabel=ylabel, ylim=ylim, title=f"{result.task}, step {result.step}")
    if history:
        ax = axes[0][1]
        runs = [*history, result]
        for b in result.buckets:
            points = [(r.step, score(x)) for r in runs for x in r.buckets if x.difficulty == b.difficulty]
            ax.plot(*zip(*points, strict=True), marker="o", label=f"difficulty {b.difficulty}")
        ax.set(xlabel="step", ylabel=ylabel, ylim=ylim, title="during training")
        ax.legend(fontsize="small")
    if result.windows:
        ax = axes[0][-1]
        ax.plot([w.window for w in result.windows], [w.loss for w in result.windows], marker="o", color="tab:red")
        ax.set_xticks([w.window for w in result.windows])
        ax.set(xlabel=f"window (L = {result.window_length})", ylabel="loss per supervised token",
               title="loss by window index")  # fmt: skip
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def load_result(path: Path) -> EvalResult:
    """Read back a `results.json` (or a per-step eval JSON); a file that is not one is a `ValueError` naming it."""
    try:
        data = json.loads(path.read_text())
        return EvalResult(
            data["task"],
            data["step"],
            [Bucket(**b) for b in data["buckets"]],
            [WindowLoss(**w) for w in data.get("windows", [])],
            data.get("window_length"),
            data.get("exact_match", True),
        )
    except (json.JSONDecodeError, KeyError, TypeError) as exc:
        raise ValueError(
            f"{path}: not an evaluation result of retrofit ({exc!r}); delete it or evaluate again"
        ) from None
