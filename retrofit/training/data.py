"""Training batches as a pure function of (seed, step): resuming needs only the step number.

Example `i` of the global batch of step `s` is `task.train_example(seed, s, i, batch_size)`: a generator draws it with
its own generator seeded with (task, seed, s, i), a data task takes it from its seeded epoch order. So the data order
is the same for every run with the same seed, whatever the number of processes, the micro-batch size or the number
of sleep passes, and a resumed run sees exactly the batches it would have seen.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import torch
from torch import Tensor
from torch.utils.data import DataLoader, IterableDataset

from retrofit.recipes import Recipe, RecipeError
from retrofit.tasks import IGNORE_INDEX, Example, Task

WORKER_TIMEOUT_S = 600  # one micro-batch takes milliseconds to make; a worker this late is stuck


def micro_batch(
    task: Task, seed: int, step: int, indices: range, pad_token_id: int, batch_size: int
) -> dict[str, Tensor]:
    """The examples `indices` of step `step`'s global batch (of `batch_size` examples), collated."""
    return collate([task.train_example(seed, step, i, batch_size) for i in indices], pad_token_id)


def micro_batch_indices(micro_step: int, process: int, num_processes: int, size: int) -> range:
    """Which examples of the global batch one process takes on one accumulation micro-step."""
    start = (micro_step * num_processes + process) * size
    return range(start, start + size)


class StepBatches(IterableDataset):
    """This process's micro-batches of the optimizer steps `steps`, in training order: `accum` per step."""

    def __init__(
        self, task: Task, seed: int, steps: range, accum: int, process: int, num_processes: int, size: int, pad: int
    ) -> None:
        self.task, self.seed, self.steps, self.accum = task, seed, steps, accum
        self.process, self.num_processes, self.size, self.pad = process, num_processes, size, pad
        self.batch_size = accum * num_processes * size

    def __iter__(self) -> Iterator[dict[str, Tensor]]:
        for step in self.steps:
            for micro in range(self.accum):
                indices = micro_batch_indices(micro, self.process, self.num_processes, self.size)
                yield micro_batch(self.task, self.seed, step, indices, self.pad, self.batch_size)


def prefetched(batches: StepBatches, *, pin_memory: bool) -> Iterator[dict[str, Tensor]]:
    """`batches` made a few micro-batches ahead in a worker process: generating examples is Python work that would
    otherwise hold up the main process, which a small model's training step is bound by.

    The loader seeds its worker from a generator of its own, not torch's global one, so a resumed run's random
    state stays the uninterrupted run's. A worker that stops answering is an error after `WORKER_TIMEOUT_S`.
    """
    loader = DataLoader(
        batches, batch_size=None, num_workers=1, prefetch_factor=4, pin_memory=pin_memory,
        generator=torch.Generator(), timeout=WORKER_TIMEOUT_S,
    )  # fmt: skip
    return iter(loader)


def collate(examples: Sequence[Example], pad_token_id: int) -> dict[str, Tensor]:
    """Right-pad to the longest example (padding: attention_mask 0, labels -100), as tensors.

    Right padding keeps each example's chunk alignment: its tokens stay at the positions the task placed them.
    """
    length = max(len(ex["input_ids"]) for ex in examples)

    def pad(key: str, value: int) -> Tensor:
        return torch.tensor([ex[key] + [value] * (length - len(ex[key])) for ex in examples], dtype=torch.long)

    return {
        "input_ids": pad("input_ids", pad_token_id),
        "attention_mask": pad("attention_mask", 0),
        "labels": pad("labels", IGNORE_INDEX),
    }


def accumulation_steps(recipe: Recipe, num_processes: int) -> int:
    """Micro-steps per optimizer step so that micro-batches x processes x steps = the global batch."""
    micro = recipe.micro_batch_size(num_processes)
    per_step = micro * num_processes
    if recipe.train.batch_size % per_step:
        raise RecipeError(
            "train.batch_size",
            f"{recipe.train.batch_size} is not a multiple of micro_batch_size x processes = "
            f"{micro} x {num_processes}; set train.micro_batch_size",
        )
    return recipe.train.batch_size // per_step
