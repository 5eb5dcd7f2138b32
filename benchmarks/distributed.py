"""Distributed training on 2 GPUs: single GPU, DDP, ZeRO-2 and ZeRO-3 checked against each other in one call.

Run from the repository root on a 2-GPU machine prepared with the GPU kit (it has DeepSpeed):

    source .gpu/setup.sh && PYTHONPATH=. OUT=/tmp/out python -m benchmarks.distributed
    python -m benchmarks.distributed --dry-run --out /tmp/plan   # recipes, DeepSpeed configs and commands only

Models: a tiny random Jet-Nemotron (the config of `recipes/jet-nemotron-tiny.yaml`) and the Jet-Nemotron-2B shape
(`benchmarks/configs/jet-nemotron-2b.json`, random init, 1.96B parameters), both trained 20 steps on Rule 110
(T=101, L=24: 5 chunks, N=2 sleep passes, `context_only`). Every Rule 110 example has the same length and label
positions, so every process runs the same sleep plan, which ZeRO-3 needs (`retrofit.training.distributed`). All
runs share the seed and the global batch (tiny 8, 2B 16) and differ only in how the work is spread: tiny, one
process accumulates 4 micro-batches, two processes 2 each; 2B, one micro-batch of 16 or 8 per process. AdamW (Muon
is refused under ZeRO) at 3e-4 (tiny) or 2e-5 (2B; larger steps make its loss chaotic), bf16.

The tiny ZeRO-3 runs shard every weight (`stage3_param_persistence_threshold: 0`; `zero3.json` keeps weights of up
to 1e5 elements whole, which is all of the tiny model's), so they test the gathering in the sleep loop as the 2B
shape does, at a loss curve gentle enough to compare step by step.

Each run is `accelerate launch` (the command `retrofit.launch` builds) of `benchmarks.distributed_worker`, which is
`retrofit train` recording per-step metrics and peak memory; each in its own process group under a timeout. A run
that fails or times out is recorded with its log's tail and the others go on. Runs go in groups; a group's runs
start together:
1. the single-GPU references: tiny and 2B (on GPU 0 and 1), and 2B under DeepSpeed ZeRO-2 on one process (GPU 0),
   the reference of the 2B ZeRO runs (below);
2. tiny on 2 GPUs, all at once (the tiny runs are small and their numbers do not depend on timing; their tokens/s
   are marked as shared): DDP, ZeRO-2, ZeRO-3, FSDP2 (checkpoints at steps 10 and 20), and ZeRO-3 with a frozen
   base (one stage training only the Jet mixers of the looped blocks, with weight decay, so a frozen weight that
   DeepSpeed still steps would move);
3. tiny ZeRO-3 resumed from the step-10 checkpoint;
4. 2B on 2 GPUs: ZeRO-3 alone, then FSDP2 alone, so that their tokens/s measure 1 -> 2 GPU scaling; then ZeRO-2 and
   DDP at once (141 GB per H200 holds both; tokens/s marked as shared). Their checkpoints are deleted after the run;
5. tiny ZeRO-3 with the sleep blocks as ZeRO-3 leaf modules (DeepSpeed's `zero_optimization.leaf_module`);
6. reload: every finished run's `model/` folder through `from_pretrained`, its loss on a fixed batch and on the
   eval set (against the run's final evaluation).
Runs that would not fit in what is left of `--budget-s` are skipped (recorded as such); rerun with `--only`.

Pass criteria, bf16 (`--tol-first`, `--tol-all`): per-step loss relative to the reference run's at most 1e-2 at
step 1 and 5e-2 at every step. DDP autocasts from fp32 weights like the single-GPU run, its reference, so it
differs by reduction order only. DeepSpeed keeps bf16 weights for the forward (fp32 master copies in the
optimizer): an AdamW step below half a weight's bf16 spacing (6e-5 for weights near 0.02, against steps of 2e-5)
reaches the forward only after several steps, so the 2B ZeRO runs learn later than an autocast run at its small
learning rate (a lag of one to two steps in the 2B calls of 2026-11-22). Their reference is therefore the same
DeepSpeed precision on one process (`2b/zero2_1gpu`), which isolates what the partitioning changes; the tiny ZeRO
runs (3e-4, far above the spacing) keep the single-GPU reference. The 2B ZeRO-3 run, whose forward from gathered
weights differs from its reference's by 1e-3 at step 1, is held to `BF16_SPREAD_2B` after it: the spread of two
one-process runs that differ only in micro-batch split, as the 2B loss curve turns any rounding difference at
step 1 into tens of percent by step 11; the tiny runs,
with every weight sharded under ZeRO-3, are the sharp test of the distributed gradients. The resumed run's steps
11-20 must match the original's within 1e-3 relative. The frozen run's frozen weights must be bitwise equal at
steps 10 and 20 and its trainable matrices must change. Reload: no missing or unexpected keys, and the reloaded
model's eval loss within `SAVE_TOLERANCE` of the run's final evaluation (`results.json`, the weights it saved).

Output under `--out` (default `$OUT`): `distributed.json` and `distributed.md` (rewritten after every run, so a
killed call keeps what finished), `logs/RUN.log`, and `runs/RUN/` (recipe, DeepSpeed config, metrics).
"""

from __future__ import annotations

import argparse
import dataclasses
import fnmatch
import json
import math
import os
import shlex
import shutil
import signal
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from benchmarks.triton_cache import use_kept_autotuning

REPO = Path(__file__).resolve().parents[1]
STEPS = 20
RESUME_STEP = 10
FROZEN_PATTERNS = ["model.layers.2.self_attn.*", "model.layers.4.self_attn.*", "model.layers.5.self_attn.*"]
TWO_GPU_MODES = ("multi_gpu", "zero2", "zero3", "fsdp2")
# The 2B ZeRO-3 run's per-step tolerance: the largest relative difference between two one-process runs of the same
# recipe that differ only in how the global batch of 16 is split (one micro-batch of 16 against two of 8, so only in
# summation order), 2x H200, 2026-11-22: 0.29 with autocast (2b/single_gpu, calls 4 and 7) and 0.33 with DeepSpeed's
# bf16 weights (2b/zero2_1gpu, calls 5 and 7), both at step 11. Those runs differ by 5e-5..4e-4 at step 1; the
# loss's fall from 12 to 1 in twelve steps multiplies that by hundreds, so no bf16 comparison of this trajectory is
# tighter. ZeRO-3 computes its forward from gathered weights, 1.1e-3 from its reference's at step 1 (calls 4, 7),
# so it needs that band after the first step (which keeps --tol-first); 2B DDP and ZeRO-2 repeat their references'
# forward (to 1e-7) and keep --tol-all, as do the tiny runs, whose loss falls gently.
BF16_SPREAD_2B = 0.33
SAVE_TOLERANCE = 1e-2  # reloaded against trained eval loss: fp32 weights with autocast against the run's precision


@dataclass
class Run:
    """One `accelerate launch` of the worker."""

    name: str  # e.g. "tiny/zero3"; also its folder under runs/ (with "/" as "-")
    model: str  # "tiny" or "2b"
    mode: str  # launch mode
    processes: int
    recipe: dict[str, Any]
    extra: list[str] = field(default_factory=list)  # more `retrofit train` arguments
    overrides: list[str] = field(default_factory=list)  # `--set KEY=VALUE` of every run (from the command line)
    gpus: str | None = None  # CUDA_VISIBLE_DEVICES, when it must differ from all
    leaves: bool = False  # sleep blocks as ZeRO-3 leaf modules
    reference: str | None = None  # the run its losses are compared with
    from_step: int = 1  # first step compared
    tolerance_all: float | None = None  # overrides --tol-all (resume: 1e-3; 2B ZeRO-3: BF16_SPREAD_2B)
    min_seconds: float = 60  # skipped when less time is left
    group: int = 0  # runs of one group start together; groups go in order
    shares_gpus: bool = False  # other runs of its group use the same GPUs (its tokens/s are not a measurement)
    port: int = 29500  # the rendezvous port of its processes, distinct within a group


def model_config(model: str) -> dict[str, Any]:
    """`model.config` of a bench recipe: the tiny Jet-Nemotron recipe's, or the 2B config.json's architecture keys."""
    if model == "tiny":
        return yaml.safe_load((REPO / "recipes" / "jet-nemotron-tiny.yaml").read_text())["model"]["config"]
    from transformers import AutoConfig

    import retrofit  # noqa: F401  (registers jet_nemotron with AutoConfig)

    published = json.loads((REPO / "benchmarks" / "configs" / "jet-nemotron-2b.json").read_text())
    known = {f.name for f in dataclasses.fields(type(AutoConfig.for_model("jet_nemotron")))}
    return {k: v for k, v in published.items() if k in known or k == "model_type"}


def bench_recipe(model: str, mode: str, processes: int, output_dir: Path, checkpoint_every: int) -> dict[str, Any]:
    """The recipe of one run: Rule 110, N=2, AdamW, bf16, 20 steps, a metric per step."""
    # Every process runs micro-batches of one size whatever the process count (one process accumulates more), so
    # each micro-batch takes the same kernels and bf16 roundings. 2B with 16 on one GPU against 8 per process on two
    # differed by ~1e-3 at step 1 and its loss's fall from 12 to 1 in ten steps carried that to 41% (DDP, call 6).
    batch, micro = (8, 2) if model == "tiny" else (16, 8)
    # 2B: at 3e-4 the random 2B model's loss jumped chaotically (12.0, 10.0, 3.9, 9.9, 5.2, 1.2, 6.3 on one GPU), so
    # the first bf16 difference between two launches decided every later step and no comparison could hold
    lr = 3.0e-4 if model == "tiny" else 2.0e-5
    return {
        "description": f"benchmarks.distributed: {model} Jet-Nemotron, {mode}",
        "output_dir": str(output_dir),
        "seed": 0,
        "task": {"name": "rule110", "options": {"steps_choices": [1, 2]}},
        "model": {"config": model_config(model)},
        "sleep": {"window": 24, "passes": 2, "eviction": "hard", "sleep_on": "context_only"},
        "optimizer": {
            "name": "adamw",
            "adamw": {"lr": lr, "weight_decay": 0.0},
            "schedule": "constant",
            "grad_clip": 1.0,
        },
        "train": {
            "max_steps": STEPS,
            "batch_size": batch,
            "micro_batch_size": micro,
            "precision": "bf16",
            "checkpoint_every": checkpoint_every,
            "keep_checkpoints": 2,
            "log_every": 1,
            "log_with": [],
        },
        "eval": {
            "every_steps": 0,
            "source": "generated",
            "num_per_difficulty": 4,  # 3 buckets x 4: the same 6 examples per process on 2 GPUs
            "batch_size": 4,
            "task_options": {"steps_choices": [1, 2, 4]},
        },
        "launch": {"mode": mode, "num_processes": processes},
    }


def plan_runs(out: Path) -> list[Run]:
    """Every run, in the order they go (see the module docstring)."""

    def run(model: str, mode: str, variant: str = "", checkpoint_every: int = 0, processes: int = 2, **kw: Any) -> Run:
        name = f"{model}/{mode}{variant}"
        processes = 1 if mode == "single_gpu" else processes
        output = run_dir(name, out) / "out"
        reference = None if processes == 1 else f"{model}/single_gpu"
        if model == "2b" and mode.startswith("zero") and processes > 1:
            reference = "2b/zero2_1gpu"
        recipe = bench_recipe(model, mode, processes, output, checkpoint_every)
        tolerance = BF16_SPREAD_2B if model == "2b" and mode == "zero3" else None
        return Run(name, model, mode, processes, recipe, reference=reference, tolerance_all=tolerance, **kw)

    big = {"min_seconds": 150}
    shared = {"shares_gpus": True}
    runs = [
        run("tiny", "single_gpu", checkpoint_every=RESUME_STEP, gpus="0", group=0),
        run("2b", "single_gpu", gpus="1", group=0, port=29501, **big),
        run("2b", "zero2", "_1gpu", processes=1, gpus="0", group=0, port=29502, **big),
        *(run("tiny", mode, checkpoint_every=RESUME_STEP, group=1, port=29510 + i, **shared)
          for i, mode in enumerate(TWO_GPU_MODES)),
    ]  # fmt: skip
    frozen = run("tiny", "zero3", "_frozen", checkpoint_every=RESUME_STEP, group=1, port=29519, **shared)
    frozen.recipe["stages"] = [{"name": "mixers", "max_steps": STEPS, "trainable": FROZEN_PATTERNS}]
    frozen.recipe["optimizer"]["adamw"]["weight_decay"] = 0.1
    frozen.reference = None
    original = out / "runs" / "tiny-zero3" / "out" / "checkpoints" / f"step_{RESUME_STEP:06d}"
    resumed = run("tiny", "zero3", "_resume", extra=["--resume", str(original)], from_step=RESUME_STEP + 1, group=2)
    resumed.reference, resumed.tolerance_all = "tiny/zero3", 1e-3
    zero3_2b = run("2b", "zero3", group=3, **big)
    fsdp2_2b = run("2b", "fsdp2", group=4, **big)
    others_2b = [run("2b", m, group=5, port=29520 + i, **big, **shared) for i, m in enumerate(("zero2", "multi_gpu"))]
    leaves = run("tiny", "zero3", "_leaf", leaves=True, group=6)
    return [*runs, frozen, resumed, zero3_2b, fsdp2_2b, *others_2b, leaves]


def prepare(run: Run, out: Path) -> tuple[list[str], dict[str, str]]:
    """Write the run's recipe and DeepSpeed config; return its command and environment."""
    from retrofit.launch import launch_command, plan_launch, write_deepspeed_config
    from retrofit.recipes import load_recipe

    folder = run_dir(run.name, out)
    folder.mkdir(parents=True, exist_ok=True)
    recipe_path = folder / "recipe.yaml"
    recipe_path.write_text(yaml.safe_dump(run.recipe, sort_keys=False))
    loaded = load_recipe(recipe_path, run.overrides)
    plan = plan_launch(loaded.recipe, visible_gpus=run.processes)
    if run.leaves:
        plan.deepspeed_config["zero_optimization"]["leaf_module"] = {"classes": leaf_classes(loaded.recipe)}
    if run.model == "tiny" and run.mode == "zero3":
        # zero3.json keeps weights of up to 1e5 elements whole on every process, and the tiny model's largest has
        # 12k: shard them all, or the tiny ZeRO-3 runs would test none of the gathering that the 2B shape relies on
        plan.deepspeed_config["zero_optimization"]["stage3_param_persistence_threshold"] = 0
    write_deepspeed_config(plan)
    settings = [arg for item in run.overrides for arg in ("--set", item)]
    program = ["-m", "benchmarks.distributed_worker", "train", str(recipe_path), *settings, *run.extra]
    launcher = launch_command(plan, program)[: -len(program)]
    command = [*launcher, "--main_process_port", str(run.port), *program]
    env = child_env(BENCH_RUN_DIR=str(folder))
    if run.gpus is not None:
        env["CUDA_VISIBLE_DEVICES"] = run.gpus
    return command, env


def child_env(**extra: str) -> dict[str, str]:
    """Environment changes of a child: the repository first on PYTHONPATH (the GPU kit's packages stay after it)."""
    path = os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH", "")) if p)
    return {"PYTHONPATH": path, "OMP_NUM_THREADS": "4", **extra}


def leaf_classes(recipe: Any) -> list[str]:
    """The sleep blocks' class names, from the recipe's model built on the CPU."""
    from retrofit.recipes import resolve
    from retrofit.training.build import build_model
    from retrofit.training.distributed import sleep_block_class_names

    return sleep_block_class_names(build_model(resolve(recipe)))


def run_dir(name: str, out: Path) -> Path:
    """The folder of run `name` (its recipe, DeepSpeed config, metrics, and `out/`, the run's output_dir)."""
    return out / "runs" / name.replace("/", "-")


# ---------------------------------------------------------------------------------------------- running


def start(command: list[str], env: dict[str, str], log: Path) -> subprocess.Popen:
    """Start `command` in its own process group (so a timeout can stop all of it), output to `log`."""
    log.parent.mkdir(parents=True, exist_ok=True)
    handle = log.open("w")
    handle.write("$ " + shlex.join(command) + "\n")
    handle.flush()
    return subprocess.Popen(
        command, cwd=REPO, env={**os.environ, **env}, stdout=handle, stderr=subprocess.STDOUT, start_new_session=True
    )


def finish(proc: subprocess.Popen, deadline: float) -> tuple[str, int | None]:
    """Wait for `proc` until `deadline` (monotonic); on time-out kill its process group."""
    try:
        code = proc.wait(timeout=max(1.0, deadline - time.monotonic()))
        return ("ok" if code == 0 else "failed"), code
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        return "timeout", None


def collect(run: Run, out: Path, status: str, code: int | None, seconds: float, command: list[str]) -> dict:
    """What one run left behind: status, per-step metrics, peak memory, the log's tail on failure."""
    folder = run_dir(run.name, out)
    metrics = folder / "metrics.jsonl"
    rows = [json.loads(line) for line in metrics.read_text().splitlines()] if metrics.is_file() else []
    steps = {r["step"]: r for r in rows if "train/loss" in r}
    memory = sorted((json.loads(p.read_text()) for p in folder.glob("memory_rank*.json")), key=lambda m: m["rank"])
    speeds = [r["train/tokens_per_s"] for s, r in steps.items() if s >= 5 and "train/tokens_per_s" in r]
    result = {
        "run": run.name,
        "model": run.model,
        "mode": run.mode,
        "processes": run.processes,
        "status": status,
        "returncode": code,
        "wall_s": round(seconds, 1),
        "command": shlex.join(command),
        "losses": {int(s): r["train/loss"] for s, r in sorted(steps.items())},
        "tokens_per_s": statistics.median(speeds) if speeds else None,
        "shares_gpus": run.shares_gpus,
        "peak_memory": memory,
    }
    if status != "ok":
        log = out / "logs" / f"{folder.name}.log"
        result["log_tail"] = log.read_text(errors="replace").splitlines()[-30:] if log.is_file() else []
    return result


def compare(result: dict, reference: dict | None, run: Run, tol_first: float, tol_all: float) -> dict | None:
    """Per-step relative loss differences against the reference run, and whether they pass."""
    if reference is None or not reference["losses"] or not result["losses"]:
        return None
    ref, got = reference["losses"], result["losses"]
    steps = [s for s in sorted(got) if s >= run.from_step and s in ref]
    if not steps:
        return None
    rel = {s: abs(got[s] - ref[s]) / max(abs(ref[s]), 1e-12) for s in steps}
    tol_all = run.tolerance_all if run.tolerance_all is not None else tol_all
    first = rel[steps[0]]
    complete = len(steps) == STEPS - run.from_step + 1
    return {
        "reference": reference["run"],
        "first_step": steps[0],
        "rel_first": first,
        "rel_max": max(rel.values()),
        "tolerance_first": min(tol_first, tol_all),
        "tolerance_all": tol_all,
        "passed": complete and first <= min(tol_first, tol_all) and max(rel.values()) <= tol_all,
    }


def frozen_check(run: Run, out: Path) -> dict:
    """Frozen weights equal between the step-10 checkpoint and the final model; trainable matrices changed.

    The saved weights are 16-bit (ZeRO-3 gathers them so), and 20 AdamW steps of 3e-4 move a per-head scalar such
    as `A_log` (about 2) by less than bf16's spacing there (2^-6), so only trainable matrices must show the change;
    the unchanged trainable vectors are listed.
    """
    from safetensors.torch import load_file

    folder = run_dir(run.name, out) / "out"
    before_path = folder / "checkpoints" / f"step_{RESUME_STEP:06d}" / "model" / "model.safetensors"
    after_path = folder / "model" / "model.safetensors"
    if not (before_path.is_file() and after_path.is_file()):
        return {"passed": False, "error": f"missing {before_path} or {after_path}"}
    before, after = load_file(before_path), load_file(after_path)
    trainable = [n for n in after if any(fnmatch.fnmatchcase(n, p) for p in FROZEN_PATTERNS)]
    moved = [n for n in after if n not in trainable and not bool((before[n] == after[n]).all())]
    still = [n for n in trainable if bool((before[n] == after[n]).all())]
    still_matrices = [n for n in still if after[n].ndim >= 2]
    return {
        "trainable": len(trainable),
        "frozen": len(after) - len(trainable),
        "frozen_that_changed": moved[:10],
        "trainable_matrices_that_did_not_change": still_matrices[:10],
        "trainable_vectors_that_did_not_change": [n for n in still if n not in still_matrices][:10],
        "passed": bool(trainable) and not moved and not still_matrices,
    }


def reload_check(model: str, results: list[dict], out: Path, deadline: float) -> dict:
    """`from_pretrained` of every run's model folder that finished this call, its loss on a fixed batch and its
    `save_gap` (`benchmarks.distributed_worker`); `score_reload` judges them."""
    finished = [r["run"] for r in results if r["model"] == model and r["status"] == "ok"]
    folders = {name: run_dir(name, out) / "out" / "model" for name in finished}
    folders = {name: path for name, path in folders.items() if (path / "config.json").is_file()}
    if not folders:
        return {"passed": False, "error": f"no model folder of {model}"}
    report = out / "runs" / f"reload-{model}.json"
    recipe = run_dir(next(iter(folders)), out) / "recipe.yaml"
    command = [sys.executable, "-m", "benchmarks.distributed_worker", "reload", str(recipe), str(report)]
    command += [str(p) for p in folders.values()]
    proc = start(command, child_env(CUDA_VISIBLE_DEVICES="0"), out / "logs" / f"reload-{model}.log")
    status, _ = finish(proc, deadline)
    if status != "ok" or not report.is_file():
        return {"passed": False, "error": f"reload {status}; see logs/reload-{model}.log"}
    loaded = json.loads(report.read_text())
    return {"runs": {name: loaded[str(path)] for name, path in folders.items()}}


def score_reload(check: dict, model: str, out: Path, tol_all: float) -> dict:
    """The reload check passes when every folder loads with no missing or unexpected key and holds the model its run
    trained: the reloaded model's eval loss within `SAVE_TOLERANCE` of the run's final evaluation (`save_gap`).

    A reload from a call before `save_gap` existed is held instead to its loss on a fixed batch within the run's
    tolerance (`tol_all` unless the run has its own) of the reference run's model (no reference: the frozen-base
    run). `rel_to_reference` is reported wherever the reference was reloaded.
    """
    if "runs" not in check:
        return check
    by_run = check["runs"]
    plan = plan_runs(out)
    references = {r.name: r.reference for r in plan if r.reference is not None}
    tolerances = {r.name: r.tolerance_all for r in plan if r.tolerance_all is not None}
    for name, entry in by_run.items():
        reference = by_run.get(references.get(name, ""), {})
        if "loss" in entry and "loss" in reference:
            entry["rel_to_reference"] = abs(entry["loss"] - reference["loss"]) / max(abs(reference["loss"]), 1e-12)
    unmeasured = [n for n, e in by_run.items() if "save_gap" not in e and "save_gap_error" not in e and n in references]
    missing = sorted({references[n] for n in unmeasured} - set(by_run))
    if missing:
        return {**check, "passed": False, "error": f"no reloaded {', '.join(missing)} to compare with"}

    def holds(name: str, entry: dict) -> bool:
        if "error" in entry or "save_gap_error" in entry or entry["missing_keys"] or entry["unexpected_keys"]:
            return False
        if "save_gap" in entry:
            return entry["save_gap"] <= SAVE_TOLERANCE
        tolerance = tolerances.get(name, tol_all)
        return name not in references or entry.get("rel_to_reference", math.inf) <= tolerance

    failed = [name for name, entry in by_run.items() if not holds(name, entry)]
    return {"runs": by_run, "passed": not failed, **({"failed": failed} if failed else {})}


# ---------------------------------------------------------------------------------------------- report


def merge_reports(reports: list[dict], out: Path) -> dict:
    """One report from several calls' reports (a call's time limit fits part of the runs; a fix reruns some).

    A later run replaces an earlier one of its name, and so does a later check that ran; the reload checks keep the
    latest reload of each run's folder and compare it with the latest single-GPU one. A run is compared anew with its
    reference when both come from the same call, or when the reference is a one-process run (the path that no
    distributed fix changes); otherwise it keeps the comparison its own call made, against its own reference.
    """
    latest: dict[str, tuple[int, dict]] = {}
    checks: dict[str, dict] = {}
    for call, report in enumerate(reports):
        for r in report["runs"]:
            if r["status"] != "skipped":
                latest[r["run"]] = (call, {**r, "losses": {int(s): v for s, v in r.get("losses", {}).items()}})
        for name, check in report["checks"].items():
            if name.startswith("reload") and "runs" in check:  # folders reloaded by any call, the latest of each
                fresh = {
                    r: {k: v for k, v in e.items() if not k.startswith("rel_to")} for r, e in check["runs"].items()
                }
                reloaded = checks.get(name, {}).get("runs", {}) | fresh
                checks[name] = {"runs": reloaded}
            elif "error" not in check or name not in checks:  # a check that could not run keeps the one that ran
                checks[name] = check
    tolerances = reports[-1]["tolerances"]
    for name, check in checks.items():
        if name.startswith("reload"):
            checks[name] = score_reload(check, name.split()[1], out, tolerances["all"])
    merged = []
    one_process = {r.name for r in plan_runs(out) if r.processes == 1}
    for run in plan_runs(out):
        if run.name not in latest:
            continue
        call, result = latest[run.name]
        reference = latest.get(run.reference or "")
        if reference is not None and (reference[0] == call or run.reference in one_process):
            comparison = compare(result, reference[1], run, tolerances["first"], tolerances["all"])
            result = {**result, "comparison": comparison}
        merged.append({**result, "call": call + 1})
    environment = {**reports[-1]["environment"], "date": ", ".join(sorted({r["environment"]["date"] for r in reports}))}
    return {"environment": environment, "tolerances": tolerances, "runs": merged, "checks": checks}


def environment() -> dict[str, Any]:
    import torch

    versions = {}
    for name in ("torch", "transformers", "accelerate", "deepspeed"):
        try:
            versions[name] = __import__(name).__version__
        except ImportError:
            versions[name] = "not installed"
    gpus = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
    return {"date": time.strftime("%Y-%m-%d"), "gpus": gpus, "versions": versions}


def write_report(out: Path, report: dict) -> None:
    """`distributed.json` and `distributed.md` under `out`."""
    (out / "distributed.json").write_text(json.dumps(report, indent=2) + "\n")
    lines = [
        "# Distributed training: single GPU, DDP, ZeRO-2, ZeRO-3",
        "",
        f"{report['environment']['date']}, {', '.join(report['environment']['gpus']) or 'no GPU'}; "
        + ", ".join(f"{k} {v}" for k, v in report["environment"]["versions"].items()),
        "",
        f"Rule 110, {STEPS} steps, N=2, AdamW, bf16; loss tolerance relative to the reference run: "
        f"{report['tolerances']['first']:g} at the first step, {report['tolerances']['all']:g} at every step unless "
        f"the run's tolerance column says otherwise (2B ZeRO-3: the spread of two one-process runs that differ "
        f"only in micro-batch split; the resumed run: 1e-3). Reload: the saved model's eval loss within "
        f"{SAVE_TOLERANCE:g} of its run's final evaluation.",
        "",
        "| run | status | loss step 1 | loss last | reference | rel. diff first | rel. diff max | tolerance | pass | "
        "tokens/s | peak GiB per GPU | wall s | call |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in report["runs"]:
        losses = r.get("losses", {})
        cmp = r.get("comparison")
        peak = " / ".join(f"{m['allocated_gib']:.2f}" for m in r.get("peak_memory", [])) or "-"
        lines.append(
            f"| {r['run']} | {r['status']} | {_num(losses.get(min(losses)) if losses else None)} | "
            f"{_num(losses.get(max(losses)) if losses else None)} | {cmp['reference'] if cmp else '-'} | "
            f"{_num(cmp and cmp['rel_first'], '.1e')} | "
            f"{_num(cmp and cmp['rel_max'], '.1e')} | {_num(cmp and cmp['tolerance_all'], 'g')} | "
            f"{'yes' if cmp and cmp['passed'] else ('no' if cmp else '-')} | "
            f"{_num(r.get('tokens_per_s'), ',.0f')}{' (shared)' if r.get('shares_gpus') else ''} | {peak} | "
            f"{r.get('wall_s', '-')} | {r.get('call', 1)} |"
        )
    lines += ["", "## Checks", ""]
    for name, check in report["checks"].items():
        verdict = "pass" if check.get("passed") else "FAIL"
        detail = check.get("error") or json.dumps({k: v for k, v in check.items() if k not in ("passed", "runs")})
        lines.append(f"- {name}: {verdict}" + (f" ({detail})" if detail != "{}" else ""))
        for run, entry in check.get("runs", {}).items():
            lines.append(f"  - {run}: {json.dumps(entry)}")
    failed = [r for r in report["runs"] if r["status"] not in ("ok", "skipped")]
    if failed:
        lines += ["", "## Logs of failed runs", ""]
        for r in failed:
            lines += [f"### {r['run']} ({r['status']})", "", "```", *r.get("log_tail", []), "```", ""]
    (out / "distributed.md").write_text("\n".join(lines) + "\n")


def _num(value: float | None, spec: str = ".4f") -> str:
    return "-" if value is None else format(value, spec)


# ---------------------------------------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=os.environ.get("OUT"), help="output folder (default: $OUT)")
    parser.add_argument("--dry-run", action="store_true", help="write recipes, DeepSpeed configs and commands only")
    parser.add_argument("--only", nargs="*", metavar="RUN", help="run only these (e.g. tiny/zero3 2b/single_gpu)")
    parser.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="a recipe override for every run, e.g. model.config.efficient_attention_config.jet.head_dim=32",
    )
    parser.add_argument("--budget-s", type=float, default=540, help="stop starting runs after this long")
    parser.add_argument("--timeout-s", type=float, default=240, help="the longest one run may take")
    parser.add_argument("--tol-first", type=float, default=1e-2, help="relative loss tolerance at the first step")
    parser.add_argument("--tol-all", type=float, default=5e-2, help="relative loss tolerance at every step")
    parser.add_argument(
        "--merge",
        type=Path,
        nargs="+",
        metavar="DISTRIBUTED_JSON",
        help="only combine the reports of several calls into --out (a later run replaces an earlier one of its name)",
    )
    args = parser.parse_args(argv)
    if args.out is None:
        parser.error("give --out or set $OUT")
    out: Path = args.out
    out.mkdir(parents=True, exist_ok=True)
    if args.merge:
        write_report(out, merge_reports([json.loads(p.read_text()) for p in args.merge], out))
        print((out / "distributed.md").read_text())
        return 0
    runs = [r for r in plan_runs(out) if not args.only or r.name in args.only]
    for r in runs:
        r.overrides = list(args.set)
    prepared = {r.name: prepare(r, out) for r in runs}
    if args.dry_run:
        plan = [{"run": name, "command": shlex.join(c), "env": e} for name, (c, e) in prepared.items()]
        (out / "plan.json").write_text(json.dumps(plan, indent=2) + "\n")
        for entry in plan:
            env = " ".join(f"{k}={shlex.quote(v)}" for k, v in entry["env"].items())
            print(f"# {entry['run']}\n{env} {entry['command']}")
        return 0

    use_kept_autotuning()
    began = time.monotonic()
    budget_end = began + args.budget_s
    report: dict[str, Any] = {
        "environment": environment(),
        "tolerances": {"first": args.tol_first, "all": args.tol_all},
        "runs": [],
        "checks": {},
    }
    done: dict[str, dict] = {}

    def record(run: Run, result: dict) -> None:
        result["comparison"] = compare(result, done.get(run.reference or ""), run, args.tol_first, args.tol_all)
        done[run.name] = result
        report["runs"].append(result)
        write_report(out, report)

    for group in sorted({r.group for r in runs}):
        batch = [r for r in runs if r.group == group]
        left = budget_end - time.monotonic()
        ready = [r for r in batch if r.min_seconds <= left]
        for r in batch:
            if r not in ready:
                record(r, {"run": r.name, "model": r.model, "mode": r.mode, "status": "skipped", "losses": {}})
        deadline = time.monotonic() + min(args.timeout_s, left)
        procs = []
        for r in ready:
            command, env = prepared[r.name]
            log = out / "logs" / f"{run_dir(r.name, out).name}.log"
            procs.append((r, command, time.monotonic(), start(command, env, log)))
        finished = []
        for r, command, t0, proc in procs:
            status, code = finish(proc, deadline)
            finished.append((r, collect(r, out, status, code, time.monotonic() - t0, command)))
        for r, result in sorted(finished, key=lambda item: item[0].reference is not None):  # references first
            record(r, result)
            if r.model == "2b":
                shutil.rmtree(run_dir(r.name, out) / "out" / "checkpoints", ignore_errors=True)
            if r.name == "tiny/zero3_frozen":
                report["checks"]["frozen base under zero3"] = frozen_check(r, out)
                write_report(out, report)

    for model in ("tiny", "2b"):
        left = budget_end - time.monotonic()
        if any(r["model"] == model for r in report["runs"]) and left > 30:
            check = reload_check(model, report["runs"], out, time.monotonic() + left)
            report["checks"][f"reload {model} (from_pretrained)"] = score_reload(check, model, out, args.tol_all)
            write_report(out, report)
    report["total_s"] = round(time.monotonic() - began, 1)
    write_report(out, report)
    print((out / "distributed.md").read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
