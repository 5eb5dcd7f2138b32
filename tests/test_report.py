"""`retrofit report` on tiny real runs: plots, a table and a JSON that match each run's own results, grouped by N."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path
from typing import Any

import pytest
import yaml

from retrofit.cli import main

REPO = Path(__file__).resolve().parents[1]
PASSES = (1, 2, 4)
STEPS, BATCH, SEQ_LEN = 4, 4, 101  # Rule 110: 101 tokens per example, no padding
TINY = (
    "task.options.steps_choices=[1, 2]",  # two trained depths: 4 steps leave the runs' accuracies apart
    "model.config.hidden_size=16",
    "model.config.intermediate_size=32",
    "model.config.linear_head_dim=8",
    f"train.max_steps={STEPS}",
    "optimizer.warmup_steps=0",  # a high constant rate, so that 4 steps leave the runs' accuracies apart
    "optimizer.adamw.lr=0.01",
    f"train.batch_size={BATCH}",
    "train.checkpoint_every=0",
    "train.log_every=3",  # tokens are logged at steps 3 and 4: the eval at step 2 is placed by interpolation
    "eval.source=generated",
    "eval.num_per_difficulty=32",
    "eval.every_steps=2",
    "eval.batch_size=96",
)


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[int, Path]:
    """The CPU main job's recipe shrunk to seconds, trained once per N (depths 1, 2, 4 in the eval)."""
    root = tmp_path_factory.mktemp("sweep")
    for passes in PASSES:
        settings = [f"output_dir={root / f'n{passes}'}", f"sleep.passes={passes}", *TINY]
        argv = ["train", str(REPO / "recipes" / "rule110-tiny.yaml")]
        assert main([*argv, *(arg for s in settings for arg in ("--set", s))]) == 0
    return {passes: root / f"n{passes}" for passes in PASSES}


def own_results(run: Path) -> dict:
    return json.loads((run / "results.json").read_text())


def markdown_tables(text: str) -> list[dict[str, dict[str, str]]]:
    """The report's tables, each as {row label: {column header: cell}}."""
    tables = [block for block in text.split("\n\n") if block.startswith("|")]
    parsed = []
    for block in tables:
        rows = [[cell.strip() for cell in line.strip("|").split("|")] for line in block.splitlines()]
        header, body = rows[0], rows[2:]
        parsed.append({row[0]: dict(zip(header[1:], row[1:], strict=True)) for row in body})
    return parsed


def test_report_matches_each_runs_results_and_groups_by_n(runs, tmp_path, capsys):
    out = tmp_path / "report"
    assert main(["report", str(runs[4]), str(runs[1]), str(runs[2]), "--out", str(out)]) == 0
    assert "| rollout depth t | N=1 | N=2 | N=4 |" in capsys.readouterr().out

    for plot in ("accuracy-vs-tokens", "loss-vs-tokens", "accuracy-by-difficulty"):
        assert (out / f"rule110-{plot}.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", plot

    markdown = (out / "report.md").read_text()
    accuracy, loss = markdown_tables(markdown)
    assert list(accuracy) == ["1", "2", "4", "all"] and list(loss) == ["1", "2", "4"]
    assert len({accuracy["all"][f"N={n}"] for n in PASSES}) > 1, "equal runs could not show a column mix-up"
    for passes, run in runs.items():
        assert f"- N={passes}: `{run}`" in markdown
        results = own_results(run)
        for bucket in results["buckets"]:
            assert accuracy[str(bucket["difficulty"])][f"N={passes}"] == f"{bucket['accuracy']:.3f}"
            assert loss[str(bucket["difficulty"])][f"N={passes}"] == f"{bucket['loss']:.4f}"
        assert accuracy["all"][f"N={passes}"] == f"{results['accuracy']:.3f}"

    summary = json.loads((out / "report.json").read_text())["tasks"]["rule110"]
    assert summary["difficulty"] == "rollout depth t"
    assert [(r["passes"], r["run_dir"]) for r in summary["runs"]] == [(n, str(runs[n])) for n in PASSES]
    for entry in summary["runs"]:
        results = own_results(runs[entry["passes"]])
        assert entry["accuracy"] == results["accuracy"] and entry["step"] == results["step"] == STEPS
        assert entry["buckets"] == {str(b["difficulty"]): b["accuracy"] for b in results["buckets"]}
        assert entry["losses"] == {str(b["difficulty"]): b["loss"] for b in results["buckets"]}
        assert [p["step"] for p in entry["curve"]] == [2, STEPS]
        assert [p["tokens_seen"] for p in entry["curve"]] == [step * BATCH * SEQ_LEN for step in (2, STEPS)]
        assert entry["curve"][-1]["buckets"] == entry["buckets"]


def test_report_defaults_to_a_folder_beside_the_runs(runs, capsys):
    assert main(["report", *(str(runs[n]) for n in PASSES)]) == 0
    out = runs[1].parent / "report"
    assert {p.name for p in out.iterdir()} >= {"report.md", "report.json", "rule110-accuracy-vs-tokens.png"}
    assert str(out / "report.md") in capsys.readouterr().out


def copy_run(run: Path, to: Path, **recipe_changes: Any) -> Path:
    """A copy of `run` whose saved recipe has some values updated (e.g. another task name, a nested rate)."""
    shutil.copytree(run, to, ignore=shutil.ignore_patterns("model", "checkpoints"))
    recipe = yaml.safe_load((to / "recipe.yaml").read_text())
    recipe["output_dir"] = str(to)

    def update(section: dict, changes: dict) -> None:
        for key, value in changes.items():
            if isinstance(value, dict):
                update(section.setdefault(key, {}), value)
            else:
                section[key] = value

    update(recipe, recipe_changes)
    (to / "recipe.yaml").write_text(yaml.safe_dump(recipe))
    return to


def test_runs_are_grouped_by_task_and_twins_are_told_apart_by_folder(runs, tmp_path, capsys):
    twin = copy_run(runs[1], tmp_path / "twin")
    assert main(["report", str(runs[1]), str(twin), "--out", str(tmp_path / "twins")]) == 0
    assert f"| rollout depth t | {runs[1].name} | twin |" in capsys.readouterr().out

    other = copy_run(runs[1], tmp_path / "other", task={"name": "depo"})
    assert main(["report", str(runs[1]), str(runs[2]), str(other), "--out", str(tmp_path / "out")]) == 0
    summary = json.loads((tmp_path / "out" / "report.json").read_text())["tasks"]
    assert {task: [r["passes"] for r in s["runs"]] for task, s in summary.items()} == {"rule110": [1, 2], "depo": [1]}
    assert (tmp_path / "out" / "depo-accuracy-by-difficulty.png").is_file()
    assert "## depo" in (tmp_path / "out" / "report.md").read_text()


def test_runs_that_differ_in_the_learning_rate_only_are_columns_by_lr(runs, tmp_path, capsys):
    """Two copies of one run whose recipes differ in `optimizer.adamw.lr` only: the columns name the rate, the
    shared N and L go to the title, and each column holds its own run's results."""
    slow = copy_run(runs[2], tmp_path / "slow", optimizer={"adamw": {"lr": 0.001}})
    fast = copy_run(runs[4], tmp_path / "fast", optimizer={"adamw": {"lr": 0.01}}, sleep={"passes": 2})
    assert main(["report", str(fast), str(slow), "--out", str(tmp_path / "out")]) == 0
    out = capsys.readouterr().out
    assert "## rule110 (N=2, L=24)" in out and "| rollout depth t | lr=0.001 | lr=0.01 |" in out
    accuracy, _ = markdown_tables((tmp_path / "out" / "report.md").read_text())
    assert accuracy["all"]["lr=0.001"] == f"{own_results(slow)['accuracy']:.3f}"
    assert accuracy["all"]["lr=0.01"] == f"{own_results(fast)['accuracy']:.3f}"


def test_runs_that_differ_in_n_and_seed_are_columns_by_both(runs, tmp_path, capsys):
    seeded = copy_run(runs[2], tmp_path / "seed1", seed=1)
    assert main(["report", str(seeded), str(runs[2]), str(runs[1]), "--out", str(tmp_path / "out")]) == 0
    out = capsys.readouterr().out
    assert "| rollout depth t | N=1, seed=0 | N=2, seed=0 | N=2, seed=1 |" in out
    summary = json.loads((tmp_path / "out" / "report.json").read_text())["tasks"]["rule110"]
    assert [r["label"] for r in summary["runs"]] == ["N=1, seed=0", "N=2, seed=0", "N=2, seed=1"]
    assert summary["chance"] == {"accuracy": 1 / 16, "loss": pytest.approx(0.6931, abs=1e-4)}


@pytest.mark.parametrize("missing", ["recipe.yaml", "results.json", "tensorboard"])
def test_a_folder_that_is_not_a_finished_run_is_named_with_what_it_lacks(runs, tmp_path, capsys, missing):
    broken = copy_run(runs[2], tmp_path / "broken")
    target = broken / missing
    if target.is_dir():
        shutil.rmtree(target)
    else:
        target.unlink()
    assert main(["report", str(runs[1]), str(broken), "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and str(broken) in err and missing in err
    assert not (tmp_path / "out").exists()


def test_a_missing_folder_is_named(tmp_path, capsys):
    assert main(["report", str(tmp_path / "nothing")]) == 2
    assert re.search(rf"{re.escape(str(tmp_path / 'nothing'))} is not a run directory", capsys.readouterr().err)


def test_an_unfinished_run_is_reported_up_to_its_last_evaluation_when_asked(runs, tmp_path, capsys):
    """A run stopped after its step-2 evaluation (no results.json, no step-4 evaluation): refused by default,
    reported with `--unfinished` at step 2 with that evaluation's own numbers, marked unfinished; a run with no
    evaluation at all is still refused."""
    stopped = copy_run(runs[4], tmp_path / "stopped")
    (stopped / "results.json").unlink()
    (stopped / "eval" / f"step_{STEPS:06d}.json").unlink()
    step2 = json.loads((stopped / "eval" / "step_000002.json").read_text())
    out = tmp_path / "out"
    assert main(["report", str(runs[1]), str(stopped), "--out", str(out)]) == 2
    assert "--unfinished" in capsys.readouterr().err
    assert main(["report", str(runs[1]), str(stopped), "--out", str(out), "--unfinished"]) == 0
    reported = json.loads((out / "report.json").read_text())["tasks"]["rule110"]["runs"]
    assert [(r["passes"], r["finished"], r["step"]) for r in reported] == [(1, True, STEPS), (4, False, 2)]
    assert reported[1]["accuracy"] == step2["accuracy"]
    assert "unfinished" in (out / "report.md").read_text()
    shutil.rmtree(stopped / "eval")
    assert main(["report", str(stopped), "--out", str(out), "--unfinished"]) == 2
    assert "nothing to report" in capsys.readouterr().err


def test_an_unreadable_evaluation_file_is_named(tmp_path, capsys):
    run = tmp_path / "run"
    (run / "eval").mkdir(parents=True)
    (run / "recipe.yaml").write_text("task: {name: rule110}\n")
    (run / "eval" / "step_000010.json").write_text('{"task": "rule110", "st')  # cut short
    assert main(["report", str(run), "--unfinished", "--out", str(tmp_path / "out")]) == 2
    assert "step_000010.json: not an evaluation result" in capsys.readouterr().err
