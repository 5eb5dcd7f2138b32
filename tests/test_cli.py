"""The `retrofit` command: `env`, `eval`, and `accelerate launch -m retrofit train` on CPU."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
from packaging.specifiers import SpecifierSet

from retrofit.cli import ENV_PACKAGES, main, range_note
from tests.test_trainer import micro_recipe

REPO = Path(__file__).resolve().parents[1]


def test_env_prints_every_version():
    proc = subprocess.run([sys.executable, "-m", "retrofit", "env"], capture_output=True, text=True, check=True)
    lines = dict(line.split(": ", 1) for line in proc.stdout.strip().splitlines())
    for label, _ in ENV_PACKAGES:
        assert lines[label], label
    assert lines["torch"].startswith("2.")
    assert lines["triton"] == "not installed"  # never on a CPU machine
    assert "CUDA" in lines
    pyproject = (REPO / "pyproject.toml").read_text()
    floor = re.search(r'"transformers>=([0-9.]+),', pyproject).group(1)
    assert "inside the tested range" in lines["transformers"] and f">={floor}" in lines["transformers"]


def test_env_flags_a_version_outside_the_tested_range():
    tested = SpecifierSet(">=5.17,<6")
    assert "inside" in range_note("5.17.0", tested) and "inside" in range_note("5.25.0", tested)
    assert "OUTSIDE the tested range" in range_note("5.16.1", tested)
    assert "OUTSIDE" in range_note("6.0.0", tested)
    assert range_note("not installed", tested) == "" and range_note("1.0", None) == ""


def test_accelerate_launch_trains_the_main_job_recipe(tmp_path):
    accelerate = Path(sys.executable).parent / "accelerate"
    command = [
        str(accelerate),
        "launch",
        "--cpu",
        "--num_processes",
        "1",
        "--num_machines",
        "1",
        "--mixed_precision",
        "no",
        "--dynamo_backend",
        "no",
        "-m",
        "retrofit",
        "train",
        "recipes/rule110-tiny.yaml",
        "--set",
        "train.max_steps=5",
        "--set",
        f"output_dir={tmp_path / 'run'}",
    ]
    proc = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    run = tmp_path / "run"
    assert (run / "checkpoints" / "step_000005" / "model" / "config.json").is_file()
    assert json.loads((run / "results.json").read_text())["step"] == 5
    assert "| difficulty |" in proc.stdout


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory) -> Path:
    tmp_path = tmp_path_factory.mktemp("cli")
    assert main(["train", str(micro_recipe(tmp_path)), "--set", "eval.every_steps=0"]) == 0
    return tmp_path / "micro"


@pytest.mark.parametrize("target,step", [(".", 6), ("checkpoints/step_000004", 4), ("model", 6)])
def test_eval_runs_on_a_run_a_checkpoint_or_a_model(trained_run, target, step, tmp_path, capsys):
    out_dir = tmp_path / "eval"
    assert main(["eval", str(trained_run / target), "--output-dir", str(out_dir)]) == 0
    assert "| difficulty | examples | accuracy | loss |" in capsys.readouterr().out
    result = json.loads((out_dir / "results.json").read_text())
    assert result["step"] == step and [b["examples"] for b in result["buckets"]] == [8, 8, 8]
    assert (out_dir / "results.png").stat().st_size > 0


def test_eval_of_a_missing_path_is_a_one_line_error(tmp_path, capsys):
    assert main(["eval", str(tmp_path / "nothing")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "does not exist" in err
