"""Resuming under DeepSpeed ZeRO-2 and ZeRO-3 never unpickles code, and continues the run exactly.

One process on the CPU (DeepSpeed's CPU accelerator over gloo), so these run wherever DeepSpeed is installed: the GPU
machine's kit has it; the CPU CI does not (`pip install -e '.[deepspeed]'` builds its ops), and skips them.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from retrofit.training.safe_state import ENGINE_DIR, pickles_in
from tests.test_faults import Payload
from tests.test_trainer import micro_recipe

pytest.importorskip("deepspeed")

REPO = Path(__file__).resolve().parents[1]
STEPS = {"max_steps": 4, "checkpoint_every": 2, "keep_checkpoints": 5}


def train(recipe: Path, *flags: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
    command = [sys.executable, "-m", "retrofit", "train", str(recipe), *flags]
    return subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)


def zero_recipe(tmp_path: Path, mode: str, name: str, lr: float = 3e-3) -> Path:
    return micro_recipe(
        tmp_path,
        name,
        launch={"mode": mode, "num_processes": 1},
        optimizer={"name": "adamw", "adamw": {"lr": lr}, "schedule": "constant", "warmup_steps": 0},
        train=STEPS,
        eval={"every_steps": 0},
    )


def step_lrs(log: str) -> dict[int, float]:
    return {int(step): float(lr) for step, lr in re.findall(r"step (\d+)/\d+: .*?lr ([0-9.e+-]+)", log)}


@pytest.fixture(scope="module", params=["zero2", "zero3"])
def whole(request, tmp_path_factory) -> tuple[str, Path]:
    """A finished 4-step run under the ZeRO stage, with checkpoints at steps 2 and 4."""
    root = tmp_path_factory.mktemp(request.param)
    done = train(zero_recipe(root, request.param, "whole"))
    assert done.returncode == 0, done.stderr[-3000:]
    return request.param, root / "whole"


def copy_of(run: Path, tmp_path: Path, mode: str, **recipe) -> tuple[Path, Path]:
    shutil.copytree(run, tmp_path / "run")
    return tmp_path / "run", zero_recipe(tmp_path, mode, "run", **recipe)


def test_a_zero_checkpoint_holds_no_pickle_beside_the_engine_tensors(whole):
    _, run = whole
    checkpoint = run / "checkpoints" / "step_000002"
    assert pickles_in(checkpoint) == []
    engine_files = sorted(p.name for p in (checkpoint / ENGINE_DIR).iterdir())
    assert engine_files and all(name.endswith(".pt") for name in engine_files), engine_files
    assert not list(checkpoint.glob("*.pkl")) and not list(checkpoint.glob("*.bin"))


def test_a_zero_resume_equals_the_uninterrupted_run(whole, tmp_path):
    mode, run = whole
    copy, recipe = copy_of(run, tmp_path, mode)
    done = train(recipe, "--resume", str(copy / "checkpoints" / "step_000002"), "--overwrite")
    assert done.returncode == 0, done.stderr[-3000:]
    assert "resumed from" in done.stdout + done.stderr
    a, b = load_file(run / "model" / "model.safetensors"), load_file(copy / "model" / "model.safetensors")
    initial = load_file(run / "checkpoints" / "step_000002" / "model" / "model.safetensors")
    assert any(not torch.equal(a[k], initial[k]) for k in a), "steps 3-4 changed nothing: the test would be vacuous"
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_a_zero_resume_applies_a_lowered_learning_rate(whole, tmp_path):
    mode, run = whole
    copy, recipe = copy_of(run, tmp_path, mode, lr=1e-6)
    done = train(recipe, "--resume", str(copy / "checkpoints" / "step_000002"), "--overwrite")
    assert done.returncode == 0, done.stderr[-3000:]
    out = done.stdout + done.stderr
    assert "resume: optimizer.adamw.lr changed from 0.003 to 1e-06 (applied)" in out
    assert step_lrs(out)[3] == pytest.approx(1e-6)
    before = load_file(copy / "checkpoints" / "step_000002" / "model" / "model.safetensors")
    slow, fast = load_file(copy / "model" / "model.safetensors"), load_file(run / "model" / "model.safetensors")

    def moved(after: dict[str, torch.Tensor]) -> float:  # mean |change| (bf16 weights: a rare last-bit flip aside)
        return sum((after[k].float() - before[k].float()).abs().sum().item() for k in after) / len(after)

    assert moved(slow) < 0.01 * moved(fast), "steps 3-4 at 1e-6 moved the weights as far as at 3e-3"


def test_a_doctored_engine_file_is_refused_and_runs_no_code(whole, tmp_path):
    mode, run = whole
    copy, recipe = copy_of(run, tmp_path, mode)
    checkpoint = copy / "checkpoints" / "step_000002"
    marker = tmp_path / "marker"
    for target in sorted((checkpoint / ENGINE_DIR).iterdir()):
        torch.save({"module": Payload(marker)}, target)
        done = train(recipe, "--resume", str(checkpoint), "--overwrite")
        assert done.returncode == 1, done.stderr[-3000:]
        errors = [line for line in done.stderr.splitlines() if line.startswith("error")]
        assert len(errors) == 1 and "Traceback" not in done.stderr, done.stderr[-3000:]
        assert target.name in errors[0] and "could run code" in errors[0], errors[0]
        assert not marker.exists(), "loading the checkpoint ran the payload"
