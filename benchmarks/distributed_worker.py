"""One process of a `benchmarks.distributed` run, and its reload check.

    accelerate launch ... -m benchmarks.distributed_worker train RECIPE.yaml [retrofit train options]
    python -m benchmarks.distributed_worker reload RECIPE.yaml OUT.json MODEL_DIR [MODEL_DIR ...]

`train` is `retrofit train` that also appends every `accelerator.log` call of the main process to
`$BENCH_RUN_DIR/metrics.jsonl` (the recipes log every step) and writes each process's peak CUDA memory to
`$BENCH_RUN_DIR/memory_rank{RANK}.json`, even when training fails.

`reload` loads each model folder with `from_pretrained` (recording missing and unexpected keys), in fp32 weights
with bf16 autocast on one GPU, and computes its loss on the first 8 examples of step 0 of the recipe's task (to
compare runs) and on the recipe's evaluation set (to compare with the run's final evaluation in `results.json`, the
loss of the weights it saved: `save_gap`, the largest relative difference over the difficulty buckets).
"""

from __future__ import annotations

import json
import math
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:
    from retrofit.evaluation import EvalResult

GIB = 2**30


def record_logged_metrics(path: Path) -> None:
    """Make `Accelerator.log` also append `{"step": ..., name: value, ...}` lines to `path` on the main process."""
    from accelerate import Accelerator

    original = Accelerator.log

    def log(self: Accelerator, values: dict[str, Any], step: int | None = None, *args: Any, **kwargs: Any) -> None:
        if self.is_main_process:
            row = {"step": step, **{k: float(v) for k, v in values.items()}}
            with path.open("a") as f:
                f.write(json.dumps(row) + "\n")
        original(self, values, step, *args, **kwargs)

    Accelerator.log = log


def write_peak_memory(run_dir: Path) -> None:
    """This process's peak CUDA memory (allocated and reserved, GiB) as `memory_rank{RANK}.json`."""
    if not torch.cuda.is_available():
        return
    rank = int(os.environ.get("RANK", "0"))
    device = torch.cuda.current_device()
    peak = {
        "rank": rank,
        "device": torch.cuda.get_device_name(device),
        "allocated_gib": torch.cuda.max_memory_allocated(device) / GIB,
        "reserved_gib": torch.cuda.max_memory_reserved(device) / GIB,
    }
    (run_dir / f"memory_rank{rank}.json").write_text(json.dumps(peak) + "\n")


def train(argv: Sequence[str]) -> int:
    """`retrofit train ARGV`, recording metrics and peak memory under `$BENCH_RUN_DIR`."""
    from retrofit.cli import main

    run_dir = Path(os.environ["BENCH_RUN_DIR"])
    record_logged_metrics(run_dir / "metrics.jsonl")
    try:
        return main(["train", *argv])
    finally:
        write_peak_memory(run_dir)


def save_gap(output_dir: Path, reloaded: EvalResult) -> dict[str, Any]:
    """The reloaded model's eval loss per bucket against the run's final evaluation (`output_dir/results.json`,
    written with the model folder, on the weights it saved), and the largest relative difference (inf if any loss
    is not finite)."""
    from retrofit.evaluation import load_result

    final = output_dir / "results.json"
    if not final.is_file():
        return {"save_gap_error": f"no {final}"}
    trained = load_result(final)
    pairs = list(zip((b.loss for b in trained.buckets), (b.loss for b in reloaded.buckets), strict=True))
    gaps = [abs(b - a) / max(abs(a), 1e-12) for a, b in pairs]
    return {
        "eval_step": trained.step,
        "eval_loss_trained": [a for a, _ in pairs],
        "eval_loss_reloaded": [b for _, b in pairs],
        "save_gap": max(gaps) if all(math.isfinite(g) for g in gaps) else math.inf,
    }


def reload(recipe_path: str, out: str, model_dirs: Sequence[str]) -> int:
    """Load each model folder, record its loading info, its loss on a fixed batch and its `save_gap`; write them
    to `out`."""
    from accelerate import Accelerator
    from transformers import AutoModelForCausalLM

    from retrofit.evaluation import evaluate, load_eval_set
    from retrofit.recipes import load_recipe, resolve
    from retrofit.training.data import micro_batch

    resolved = resolve(load_recipe(recipe_path).recipe)
    task, section = resolved.task, resolved.recipe.eval
    batch = micro_batch(task, resolved.recipe.seed, 0, range(8), task.tokenizer.pad_token_id)
    eval_set = load_eval_set(section, resolved.eval_task)
    accelerator = Accelerator()  # one process: evaluate's sum over processes is the identity
    results = {}
    for folder in model_dirs:
        try:
            model, info = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32, output_loading_info=True)
            model = model.cuda().eval()
            with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16):
                loss = model(**{k: v.cuda() for k, v in batch.items()}).loss.item()
                reloaded = evaluate(
                    model, eval_set, task=resolved.eval_task, step=0, batch_size=section.batch_size,
                    accelerator=accelerator,
                )  # fmt: skip
            results[folder] = {
                "loss": loss,
                "missing_keys": list(info["missing_keys"]),
                "unexpected_keys": list(info["unexpected_keys"]),
                **save_gap(Path(folder).parent, reloaded),
            }
            del model
            torch.cuda.empty_cache()
        except Exception as exc:  # one unloadable folder is a result, not the end of the check
            results[folder] = {"error": f"{type(exc).__name__}: {exc}"}
    Path(out).write_text(json.dumps(results, indent=2) + "\n")
    return 0


def main(argv: Sequence[str]) -> int:
    if argv and argv[0] == "train":
        return train(argv[1:])
    if len(argv) >= 4 and argv[0] == "reload":
        return reload(argv[1], argv[2], argv[3:])
    print(__doc__, file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
