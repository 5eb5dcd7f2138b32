"""`retrofit sweep`: the plan, refused keys, resume after a kill mid-sweep, and the comparison it ends with."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from retrofit.cli import main
from retrofit.recipes import RecipeError
from retrofit.sweep import parse_axis, plan_sweep
from tests.test_report import TINY

REPO = Path(__file__).resolve().parents[1]
RECIPE = str(REPO / "recipes" / "rule110-tiny.yaml")
FAST = (*(s for s in TINY if not s.startswith("train.checkpoint_every")), "train.checkpoint_every=1")


def test_the_plan_is_the_grid_of_axes_and_seeds_each_in_a_folder_named_by_its_values(tmp_path):
    runs = plan_sweep(RECIPE, [parse_axis("sleep.passes=1,2"), parse_axis("optimizer.adamw.lr=1e-3")], [0, 3], tmp_path)
    assert [r.run_dir.name for r in runs] == [
        "passes1-lr1e-3-seed0",
        "passes1-lr1e-3-seed3",
        "passes2-lr1e-3-seed0",
        "passes2-lr1e-3-seed3",
    ]
    first = runs[1]
    assert first.label == "sleep.passes=1, optimizer.adamw.lr=1e-3, seed=3"
    assert first.command[:7] == [sys.executable, "-m", "retrofit", "train", RECIPE, "--resume", "auto"]
    settings = first.command[8::2]
    assert settings == [
        "sleep.passes=1",
        "optimizer.adamw.lr=1e-3",
        "seed=3",
        f"output_dir={tmp_path / first.run_dir.name}",
    ]
    assert all(flag == "--set" for flag in first.command[7::2])


def test_values_with_dots_get_their_own_folders_and_logs_and_repeats_are_refused(tmp_path):
    runs = plan_sweep(RECIPE, [parse_axis("optimizer.adamw.lr=0.002,0.01")], [0], tmp_path)
    assert [r.run_dir.name for r in runs] == ["lr0.002-seed0", "lr0.01-seed0"]
    assert [r.log.name for r in runs] == ["lr0.002-seed0.log", "lr0.01-seed0.log"]
    with pytest.raises(RecipeError, match="lists a value twice"):
        plan_sweep(RECIPE, [parse_axis("sleep.passes=1,1")], [0], tmp_path)
    with pytest.raises(RecipeError, match="lists a seed twice"):
        plan_sweep(RECIPE, [parse_axis("sleep.passes=1,2")], [0, 0], tmp_path)


def test_keys_that_share_a_last_part_are_named_in_full(tmp_path):
    axes = [parse_axis("optimizer.adamw.lr=1e-3"), parse_axis("optimizer.muon.lr=2e-3")]
    (run,) = plan_sweep(RECIPE, axes, [0], tmp_path)
    assert run.run_dir.name == "optimizer_adamw_lr1e-3-optimizer_muon_lr2e-3-seed0"


@pytest.mark.parametrize(
    ("argv", "named"),
    [
        (["--over", "seed=0,1"], "seed: cannot be swept: use --seeds"),
        (["--over", "output_dir=a,b"], "output_dir: cannot be swept"),
        (["--over", "sleep.pases=1,2"], "sleep.pases: unknown key; did you mean 'passes'?"),
        (["--over", "sleep.passes=1,0"], "sleep.passes"),
        (["--over", "sleep.passes"], "write KEY=VALUE1,VALUE2"),
        (["--over", "sleep.passes=1", "--over", "sleep.passes=2"], "sleep.passes: is given to --over twice"),
        ([], "give at least one --over"),
    ],
)
def test_a_refused_sweep_names_the_key_in_one_line_before_anything_trains(argv, named, tmp_path, capsys):
    assert main(["sweep", RECIPE, "--root", str(tmp_path / "sweep"), *argv]) == 2
    err = capsys.readouterr().err.strip()
    assert named in err and len(err.splitlines()) == 1, err
    assert not (tmp_path / "sweep").exists()


def test_the_dry_run_prints_the_plan_and_trains_nothing(tmp_path, capsys):
    assert (
        main(["sweep", RECIPE, "--over", "sleep.passes=1,2", "--seeds", "0,1", "--root", str(tmp_path), "--dry-run"])
        == 0
    )
    out = capsys.readouterr().out
    assert "sweep of 4 run(s)" in out and "passes2-seed1: sleep.passes=2, seed=1" in out
    assert list(tmp_path.iterdir()) == []


def sweep_command(root: Path) -> list[str]:
    command = [sys.executable, "-m", "retrofit", "sweep", RECIPE, "--over", "sleep.passes=1,2", "--root", str(root)]
    return command + [arg for s in FAST for arg in ("--set", s)] + ["--no-side-by-side"]


def test_a_sweep_killed_mid_run_resumes_where_it_stopped_and_ends_with_the_comparison(tmp_path):
    """Kill the sweep (SIGKILL to its process group) once the second run has a checkpoint; the rerun keeps the first
    run as it was, continues the second from its checkpoint, and its results equal an uninterrupted run's."""
    root = tmp_path / "sweep"
    first, second = root / "passes1-seed0", root / "passes2-seed0"
    process = subprocess.Popen(sweep_command(root), cwd=REPO, start_new_session=True, stdout=subprocess.DEVNULL)
    deadline = time.monotonic() + 300
    while not list((second / "checkpoints").glob("step_*")) and time.monotonic() < deadline and process.poll() is None:
        time.sleep(0.05)
    os.killpg(process.pid, signal.SIGKILL)
    process.wait()
    assert (first / "results.json").is_file() and not (second / "results.json").is_file()
    kept = (first / "results.json").stat().st_mtime_ns

    done = subprocess.run(sweep_command(root), cwd=REPO, capture_output=True, text=True)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    assert "finished earlier, kept" in done.stdout
    assert re.search(r"resumed from \S*passes2-seed0/checkpoints/step_\d+ at step [1-9]", done.stdout), done.stdout
    assert (first / "results.json").stat().st_mtime_ns == kept
    fresh = tmp_path / "fresh"
    assert (
        main(["train", RECIPE, *(a for s in (*FAST, "sleep.passes=2", f"output_dir={fresh}") for a in ("--set", s))])
        == 0
    )
    resumed = json.loads((second / "results.json").read_text())
    assert resumed["buckets"] == json.loads((fresh / "results.json").read_text())["buckets"]

    assert "| rollout depth t | N=1 | N=2 |" in done.stdout
    record = json.loads((root / "sweep.json").read_text())
    assert [r["values"] for r in record["runs"]] == [
        {"sleep.passes": "1", "seed": "0"},
        {"sleep.passes": "2", "seed": "0"},
    ]
    assert (root / "report" / "rule110-accuracy-vs-tokens.png").is_file()


def test_parse_axis_refuses_reserved_keys():
    with pytest.raises(RecipeError, match="use --seeds"):
        parse_axis("seed=1,2")
    assert parse_axis(" optimizer.adamw.lr = 1e-3, 2e-3 ") == ("optimizer.adamw.lr", ("1e-3", "2e-3"))
