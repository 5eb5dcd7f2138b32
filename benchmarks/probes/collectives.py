"""Probe (issue 24): how often one training step moves the weights between processes, per launch mode.

Counts the collectives of one training step (the second, so that start-up broadcasts are out of it) on two CPU
processes over gloo, from torch's profiler: the calls of each c10d operation, and for all-gathers and
reduce-scatters the elements moved, as a multiple of the model's parameter count. The counts depend on the sleep
plan (chunks, passes) and on which blocks reshard, not on the width or the device, so a narrow model on the CPU
gives the GPU runs' numbers. Runs:
- `ddp`: `multi_gpu` (every process holds the whole model; DDP all-reduces each gradient bucket once per backward);
- `fsdp2`: the trainer's FSDP2, the loop range kept gathered through the step (`retrofit.training.fsdp`);
- `fsdp2_resharded`: the same with every block resharded after each call, FSDP2's default.

DeepSpeed ZeRO is not among them: accelerate 1.15 counts one process under DeepSpeed on the CPU even when two run,
so ZeRO's collectives need the GPU machine.

    python -m benchmarks.probes.collectives --out OUT                # CPU, a minute
    python -m benchmarks.probes.collectives --shape 2b --out OUT     # Jet-Nemotron-2B's 28 blocks, narrow
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
from collections import defaultdict
from pathlib import Path
from typing import Any

import yaml

REPO = Path(__file__).resolve().parents[2]
RUNS = ("ddp", "fsdp2", "fsdp2_resharded")
MOVED_ELEMENTS = {"c10d::_allgather_base_": 0, "c10d::_reduce_scatter_base_": 1}  # which argument is the whole
PROFILED_STEP = 2


def probe_recipe(run: str, shape: str, output_dir: Path) -> dict[str, Any]:
    """The tiny Jet-Nemotron recipe on Rule 110 (T=101, L=24: 5 chunks, N=2), 2 steps; `shape` 2b gives it the
    blocks of the Jet-Nemotron-2B shape (28, its default loop range) at the tiny width."""
    config = yaml.safe_load((REPO / "recipes" / "jet-nemotron-tiny.yaml").read_text())["model"]["config"]
    if shape == "2b":
        layout = json.loads((REPO / "benchmarks" / "configs" / "jet-nemotron-2b.json").read_text())
        config = {**config, "num_hidden_layers": layout["num_hidden_layers"], "layer_types": layout["layer_types"]}
    recipe: dict[str, Any] = {
        "seed": 0,
        "output_dir": str(output_dir),
        "task": {"name": "rule110", "options": {"steps_choices": [1]}},
        "model": {"config": config},
        "sleep": {"window": 24, "passes": 2, "eviction": "hard", "sleep_on": "context_only"},
        "optimizer": {"name": "adamw", "schedule": "constant", "warmup_steps": 0},
        "train": {"max_steps": PROFILED_STEP, "batch_size": 8, "checkpoint_every": 0, "log_every": 1},
        "eval": {"source": "generated", "num_per_difficulty": 2, "every_steps": 0, "batch_size": 16},
    }
    if run.startswith("fsdp2"):
        recipe["launch"] = {"mode": "fsdp2", "num_processes": 2}
    return recipe


def tally(events: Any) -> dict[str, dict[str, float]]:
    """{c10d operation: {"calls": n, "elements": moved}} over profiler `events` (elements only where the whole
    tensor is an argument: all-gathers and reduce-scatters)."""
    counts: dict[str, dict[str, float]] = defaultdict(lambda: {"calls": 0, "elements": 0})
    for event in events:
        if not event.name.startswith("c10d::"):
            continue
        counts[event.name]["calls"] += 1
        argument = MOVED_ELEMENTS.get(event.name)
        if argument is not None:
            counts[event.name]["elements"] += math.prod(event.input_shapes[argument])
    return dict(counts)


def worker(recipe: Path, out: Path, reshard_loop: bool) -> int:
    """`retrofit train RECIPE` with the profiler on for step `PROFILED_STEP`; each process writes its tally."""
    import torch.profiler
    from accelerate import Accelerator

    from retrofit.cli import main
    from retrofit.training import distributed

    if reshard_loop:  # FSDP2's default: no block stays gathered between calls
        shard_model = distributed.shard_model
        distributed.shard_model = lambda model, blocks, loop, device: shard_model(model, blocks, range(0), device)
    profiler = torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], record_shapes=True)
    log = Accelerator.log
    phase = {"profiling": False, "done": False}

    def profile_between_logs(self: Accelerator, values: dict, step: int | None = None, *args: Any, **kwargs: Any):
        if step == PROFILED_STEP - 1 and not phase["profiling"]:  # step 1's log; step 2 runs until the next one
            profiler.start()
            phase["profiling"] = True
        elif step == PROFILED_STEP and phase["profiling"] and not phase["done"]:
            profiler.stop()
            phase["done"] = True
            rank = int(os.environ.get("RANK", "0"))
            (out / f"rank{rank}.json").write_text(json.dumps(tally(profiler.events()), indent=1) + "\n")
        return log(self, values, step, *args, **kwargs)

    Accelerator.log = profile_between_logs
    return main(["train", str(recipe), "--overwrite"])


def run_one(run: str, shape: str, out: Path) -> dict[str, Any]:
    """Train `run` on two CPU processes (torchrun over gloo); its tally of rank 0 and the model's parameter count."""
    folder = out / run
    folder.mkdir(parents=True, exist_ok=True)
    recipe = folder / "recipe.yaml"
    recipe.write_text(yaml.safe_dump(probe_recipe(run, shape, folder / "train")))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "ACCELERATE_USE_CPU": "1", "CUDA_VISIBLE_DEVICES": ""}
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "-m", __spec__.name]
    command += ["worker", str(recipe), str(folder)] + (["--reshard-loop"] if run == "fsdp2_resharded" else [])
    done = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True)
    (folder / "log.txt").write_text(done.stdout + done.stderr)
    if done.returncode != 0:
        raise SystemExit(f"error: {run} failed (exit {done.returncode}); see {folder / 'log.txt'}")
    header = (folder / "train" / "train.log").read_text().splitlines()[0]
    parameters = int(header.split(" parameters")[0].rsplit(" ", 1)[-1].replace(",", ""))
    return {"parameters": parameters, "collectives": json.loads((folder / "rank0.json").read_text())}


def table(results: dict[str, dict[str, Any]]) -> str:
    """Markdown: per run and c10d operation, calls per step and elements moved per step ÷ parameters."""
    lines = ["| run | operation | calls per step | elements moved ÷ parameters |", "|---|---|---:|---:|"]
    for run, result in results.items():
        for name, count in sorted(result["collectives"].items()):
            moved = f"{count['elements'] / result['parameters']:.2f}" if name in MOVED_ELEMENTS else ""
            lines.append(f"| {run} | `{name}` | {count['calls']} | {moved} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command")
    probe = sub.add_parser("worker", help="one process of a run (started by torchrun)")
    probe.add_argument("recipe", type=Path)
    probe.add_argument("out", type=Path)
    probe.add_argument("--reshard-loop", action="store_true")
    parser.add_argument("--out", type=Path, default=Path(os.environ.get("OUT", "collectives")))
    parser.add_argument("--shape", choices=("tiny", "2b"), default="tiny")
    args = parser.parse_args(argv)
    if args.command == "worker":
        return worker(args.recipe, args.out, args.reshard_loop)
    results = {run: run_one(run, args.shape, args.out / args.shape) for run in RUNS}
    report = table(results)
    (args.out / f"collectives-{args.shape}.json").write_text(json.dumps(results, indent=1) + "\n")
    (args.out / f"collectives-{args.shape}.md").write_text(report + "\n")
    print(report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
