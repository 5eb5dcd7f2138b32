"""A small model's training step is bound by the host: how much `BatchedMuon` and prefetched data take off it.

The Depo replication model (14M parameters, T = 115, batch 128): the profiler finds 16 ms (N=1) and under 43 ms
(N=4) of device time in a 90-250 ms step; the rest is Python and kernel launches. This times the trainer's step
(`micro_step`, clip, optimizer step) three ways on the same model, interleaved, and reports the median step time of
each and its speed-up over the first: torch's Muon with the batch made inline (as before), `BatchedMuon` with the
batch made inline, and `BatchedMuon` with batches from `prefetched` (a worker process), as `retrofit train` runs
now.

    source .gpu/setup.sh && python -m benchmarks.step_overhead --passes 1 4 --out OUT [--profile]   # GPU machine

`--profile` also writes the torch profiler's tables of one step of the first way (`step-overhead-profile-n<N>.txt`):
where the host time goes.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections.abc import Iterator
from datetime import date
from pathlib import Path

import torch
from accelerate.utils import set_seed

from benchmarks.run import write_profile
from benchmarks.triton_cache import use_kept_autotuning
from retrofit import optim
from retrofit.recipes import load_recipe, resolve
from retrofit.training.build import build_model
from retrofit.training.data import StepBatches, micro_batch, prefetched
from retrofit.training.distributed import micro_step
from retrofit.training.trainer import make_accelerator

BATCH = 128
WARMUP_STEPS, TIMED_STEPS = 5, 40


def measure(passes: int, rounds: int, profile: Path | None) -> dict[str, dict]:
    """Median ms per step of each way, for recipes/replicate/depo-n<passes>.yaml; `profile`: a file for the
    profiler's tables of one step of the first way."""
    recipe = load_recipe(f"recipes/replicate/depo-n{passes}.yaml", ["output_dir=/tmp/step-overhead"]).recipe
    resolved = resolve(recipe)
    task, pad = resolved.task, resolved.task.tokenizer.pad_token_id
    accelerator = make_accelerator(recipe, trackers=False)
    set_seed(0)
    model = build_model(resolved)
    batched = optim.BatchedMuon
    optim.BatchedMuon = torch.optim.Muon  # the optimizer as it was: torch's Muon inside MuonWithAdamW
    torch_muon = optim.build_optimizer(model, recipe.optimizer)
    optim.BatchedMuon = batched
    batched_muon = optim.build_optimizer(model, recipe.optimizer)
    model, torch_muon, batched_muon = accelerator.prepare(model, torch_muon, batched_muon)
    model.train()
    next_step = iter(range(10**9))
    loader = prefetched(StepBatches(task, 0, range(10**9), 1, 0, 1, BATCH, pad), pin_memory=True)

    def train(steps: int, optimizer: torch.optim.Optimizer, data: Iterator | None) -> None:
        for _ in range(steps):
            batch = next(data) if data is not None else micro_batch(task, 0, next(next_step), range(BATCH), pad)
            batch = {k: v.to(accelerator.device, non_blocking=True) for k, v in batch.items()}
            loss = micro_step(accelerator, model, batch, micro=0, accum=1)
            norm = accelerator.clip_grad_norm_(model.parameters(), 1.0)
            torch.stack([loss.double(), norm.double()]).tolist()  # the trainer's one sync per step
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)

    ways = {
        "torch Muon, inline data": (torch_muon, None),
        "BatchedMuon, inline data": (batched_muon, None),
        "BatchedMuon, prefetched data": (batched_muon, loader),
    }
    for optimizer, _ in ways.values():
        train(1, optimizer, None)  # compiles and autotunes the kernels
    if profile is not None:
        write_profile(profile, lambda: train(1, torch_muon, None))
    times: dict[str, list[float]] = {name: [] for name in ways}
    for _ in range(rounds):
        for name, (optimizer, data) in ways.items():
            train(WARMUP_STEPS, optimizer, data)
            torch.cuda.synchronize()
            start = time.perf_counter()
            train(TIMED_STEPS, optimizer, data)
            torch.cuda.synchronize()
            times[name].append((time.perf_counter() - start) / TIMED_STEPS * 1e3)
    base = statistics.median(times["torch Muon, inline data"])
    return {
        name: {"ms_per_step": statistics.median(t), "speedup": base / statistics.median(t), "rounds_ms": t}
        for name, t in times.items()
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.step_overhead", description=__doc__.splitlines()[0])
    parser.add_argument("--passes", type=int, nargs="+", default=[1, 4], help="sleep passes N (default 1 4)")
    parser.add_argument("--rounds", type=int, default=4, help="timed rounds per way (default 4)")
    parser.add_argument("--out", type=Path, help="folder for step-overhead.json (and the profiles)")
    parser.add_argument("--profile", action="store_true", help="also profile one step per N (needs --out)")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        parser.error("needs a CUDA GPU: the host overhead it measures is kernel launches")
    use_kept_autotuning()
    rows = {}
    for passes in args.passes:
        profile = args.out / f"step-overhead-profile-n{passes}.txt" if args.profile and args.out else None
        rows[passes] = measure(passes, args.rounds, profile)
        for name, row in rows[passes].items():
            print(f"N={passes}  {name:30s} {row['ms_per_step']:7.1f} ms/step  {row['speedup']:.2f}x", flush=True)
    result = {"device": torch.cuda.get_device_name(), "date": date.today().isoformat(), "rows": rows}
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "step-overhead.json").write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
