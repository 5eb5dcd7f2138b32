"""`checkpointing: pass` on several processes: DDP and FSDP2 over two gloo CPU processes, and DeepSpeed ZeRO-2 and
ZeRO-3 (one process, DeepSpeed's CPU accelerator, where DeepSpeed is installed), each train as one process does
without checkpointing.

Every looped weight must reach the gradient reduction once per backward, however many passes and chunks ran it
(`retrofit/checkpoint.py`); a pass whose recomputation handed it over once per pass gave FSDP2 a step-1 gradient
norm of 13.49 against 13.92, DDP partial averages, and ZeRO-2 an error.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import yaml

from tests.test_fsdp import TOLERANCE, recipe, steps, train, weights

PASS = {"checkpointing": "pass"}


@pytest.fixture(scope="module")
def one_process(tmp_path_factory) -> Path:
    """The reference: one process, no launch mode, no checkpointing."""
    root = tmp_path_factory.mktemp("reference")
    train(recipe(root, "single", None), 1)
    return root / "single"


def with_launch(path: Path, launch: dict | None) -> Path:
    data = yaml.safe_load(path.read_text())
    data.pop("launch", None)
    if launch is not None:
        data["launch"] = launch
    path.write_text(yaml.safe_dump(data))
    return path


def assert_same_training(run: Path, reference: Path) -> None:
    ours, theirs = steps((run / "train.log").read_text()), steps((reference / "train.log").read_text())
    assert sorted(ours) == sorted(theirs) == [1, 2, 3, 4]
    for step, (loss, norm) in theirs.items():
        assert ours[step][0] == pytest.approx(loss, rel=TOLERANCE["loss"], abs=1e-4), step
        assert ours[step][1] == pytest.approx(norm, rel=TOLERANCE["grad_norm"], abs=1e-3), step
    a, b = weights(reference), weights(run)
    assert a.keys() == b.keys()
    for key in a:
        assert b[key].sub(a[key]).abs().max() <= TOLERANCE["weights"] * (1 + a[key].abs().max()), key


@pytest.mark.parametrize(
    ("launch", "processes"), [(None, 2), ({"mode": "fsdp2", "num_processes": 2}, 2)], ids=["ddp", "fsdp2"]
)
def test_pass_checkpointing_on_two_processes_trains_as_one_process(one_process, tmp_path, launch, processes):
    path = with_launch(recipe(tmp_path, "pass", None, sleep=PASS), launch)
    assert f"({processes} process(es)" in train(path, processes)  # one group of processes, not two lone ones
    assert_same_training(tmp_path / "pass", one_process)


@pytest.mark.skipif(importlib.util.find_spec("deepspeed") is None, reason="needs DeepSpeed")
@pytest.mark.parametrize("mode", ["zero2", "zero3"])
def test_pass_checkpointing_under_zero_trains_as_without_checkpointing(tmp_path, mode):
    """Against the same ZeRO stage without checkpointing: DeepSpeed's CPU accelerator keeps its own precision."""
    runs = {}
    for name, sleep in (("none", {}), ("pass", PASS)):
        path = with_launch(recipe(tmp_path, name, None, sleep=sleep), {"mode": mode, "num_processes": 1})
        assert "(1 process(es)" in train(path, 1)
        assert (tmp_path / name / "checkpoints" / "step_000002" / "engine").is_dir()  # DeepSpeed ran it
        runs[name] = tmp_path / name
    assert_same_training(runs["pass"], runs["none"])
