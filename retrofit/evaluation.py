"""Evaluation by difficulty bucket, and its reports (JSON, markdown table, PNG plot).

An example is correct when every supervised token is the argmax of the logits at the position before it, all from
one forward pass (wake only: no extra loops at prediction time, as in the paper). Each bucket (rollout steps, hops,
operations: the task's `difficulty`) reports its exact-match accuracy and its mean cross-entropy per supervised token.
"""

from __future__ import annotations

import json
import warnings
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import datasets
import torch
import torch.nn.functional as F
from accelerate import Accelerator
from torch import nn

from retrofit.engine import IGNORE_INDEX, next_token_targets
from retrofit.recipes.schema import EvalSection
from retrofit.tasks import Task
from retrofit.training.data import collate
from retrofit.training.distributed import zero_stage

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
class EvalResult:
    """All buckets of one evaluation, at training step `step`."""

    task: str
    step: int
    buckets: list[Bucket]

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
        }


def load_eval_set(section: EvalSection, task: Task, window: int | None = None) -> datasets.Dataset:
    """The recipe's eval set: the frozen file in data/ (or `eval.path`), or a freshly generated one.

    `resolve` has checked that a frozen set holds every difficulty bucket of the task. Warns when every example
    fits in one `window` (the recipe's L): nothing would be evicted, so the evaluation would not measure sleep.
    """
    if section.source == "generated":
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
) -> EvalResult:
    """Evaluate `model` on `dataset`; each process takes every N-th example and the counts are summed.

    Under DeepSpeed ZeRO-3 every process evaluates the whole set instead: its all-gathers pair up by the order of
    module calls, so processes with different batches (or a different number of them) would deadlock.
    """
    difficulties = sorted(set(dataset["difficulty"]))
    slot = {d: i for i, d in enumerate(difficulties)}
    # Per bucket: examples, correct, summed token loss, supervised tokens.
    sums = torch.zeros(len(difficulties), 4, dtype=torch.float64, device=accelerator.device)
    replicated = zero_stage(accelerator) == 3
    rank, world = accelerator.process_index, accelerator.num_processes
    shard = dataset if replicated else dataset.select(range(rank, len(dataset), world))
    was_training = model.training
    model.eval()
    for start in range(0, len(shard), batch_size):
        rows = shard[start : start + batch_size]
        examples = [{key: rows[key][j] for key in rows} for j in range(len(rows["difficulty"]))]
        batch = {k: v.to(accelerator.device) for k, v in collate(examples, task.tokenizer.pad_token_id).items()}
        logits = model(**batch, return_logits=True).logits.float()
        targets = next_token_targets(batch["labels"], batch["attention_mask"].bool())
        supervised = targets != IGNORE_INDEX
        token_loss = F.cross_entropy(logits.transpose(1, 2), targets, ignore_index=IGNORE_INDEX, reduction="none")
        correct = ((logits.argmax(-1) == targets) | ~supervised).all(dim=1)
        per_example = torch.stack(
            [torch.ones_like(correct), correct, token_loss.sum(dim=1), supervised.sum(dim=1)], dim=1
        ).double()
        index = torch.tensor([slot[d] for d in rows["difficulty"]], device=accelerator.device)
        sums.index_add_(0, index, per_example)
    model.train(was_training)
    sums = (sums if replicated else accelerator.reduce(sums, reduction="sum")).cpu()
    buckets = [
        Bucket(d, int(n), int(c), float(c / max(n, 1)), float(loss / max(tokens, 1)))
        for d, (n, c, loss, tokens) in zip(difficulties, sums.tolist(), strict=True)
    ]
    return EvalResult(task.name, step, buckets)


def format_table(result: EvalResult) -> str:
    """A markdown table: one row per difficulty bucket, then all examples."""
    lines = [
        f"Evaluation of {result.task} at step {result.step}: {METRIC}",
        "",
        "| difficulty | examples | accuracy | loss |",
        "|---:|---:|---:|---:|",
    ]
    lines += [f"| {b.difficulty} | {b.examples} | {b.accuracy:.3f} | {b.loss:.4f} |" for b in result.buckets]
    total = sum(b.examples for b in result.buckets)
    lines.append(f"| all | {total} | {result.accuracy:.3f} | |")
    return "\n".join(lines)


def write_report(result: EvalResult, out_dir: Path, history: Sequence[EvalResult] = ()) -> list[Path]:
    """Write `results.json`, `results.md` and `results.png` into `out_dir`; return their paths.

    `history` (earlier evaluations of the same run) adds an accuracy-over-training panel to the plot.
    """
    out_dir.mkdir(parents=True, exist_ok=True)
    json_path, md_path, png_path = out_dir / "results.json", out_dir / "results.md", out_dir / "results.png"
    json_path.write_text(json.dumps(result.to_dict(), indent=2) + "\n")
    md_path.write_text(format_table(result) + "\n")
    plot(result, history, png_path)
    return [json_path, md_path, png_path]


def plot(result: EvalResult, history: Sequence[EvalResult], path: Path) -> None:
    """Accuracy per bucket (left) and, with a history, accuracy per bucket over training steps (right)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = 2 if history else 1
    fig, axes = plt.subplots(1, panels, figsize=(5 * panels, 3.6), squeeze=False)
    ax = axes[0][0]
    labels = [str(b.difficulty) for b in result.buckets]
    ax.bar(labels, [b.accuracy for b in result.buckets], color="tab:blue")
    ax.set(xlabel="difficulty", ylabel="exact-match accuracy", ylim=(0, 1), title=f"{result.task}, step {result.step}")
    if history:
        ax = axes[0][1]
        runs = [*history, result]
        for b in result.buckets:
            points = [(r.step, x.accuracy) for r in runs for x in r.buckets if x.difficulty == b.difficulty]
            ax.plot(*zip(*points, strict=True), marker="o", label=f"difficulty {b.difficulty}")
        ax.set(xlabel="step", ylabel="exact-match accuracy", ylim=(0, 1), title="during training")
        ax.legend(fontsize="small")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def load_result(path: Path) -> EvalResult:
    """Read back a `results.json` (or a per-step eval JSON); a file that is not one is a `ValueError` naming it."""
    try:
        data = json.loads(path.read_text())
        return EvalResult(data["task"], data["step"], [Bucket(**b) for b in data["buckets"]])
    except (json.JSONDecodeError, KeyError, TypeError) as exc:
        raise ValueError(
            f"{path}: not an evaluation result of retrofit ({exc!r}); delete it or evaluate again"
        ) from None
