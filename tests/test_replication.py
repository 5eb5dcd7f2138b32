"""Issue 9's sweeps: the replicate recipes (one per N, same data), and the sweep command end to end on CPU."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch
from accelerate.utils import set_seed

from benchmarks import replication
from benchmarks.replication import PASSES
from retrofit import sweep as retrofit_sweep
from retrofit.cli import main as retrofit_main
from retrofit.recipes import load_recipe, resolve
from retrofit.sweep import SweepRun
from retrofit.training.build import build_model
from retrofit.training.data import micro_batch

RECIPES = Path(__file__).resolve().parents[1] / "recipes" / "replicate"
TASKS = {"rule110": {"hidden_size": 256, "window": 24}, "depo": {"hidden_size": 512, "window": 75}}


def sweep_recipes(task: str) -> list[Path]:
    return [RECIPES / f"{task}-n{n}.yaml" for n in PASSES]


@pytest.mark.parametrize("path", sorted(RECIPES.glob("*.yaml")), ids=lambda p: p.name)
def test_every_replicate_recipe_validates(path, capsys):
    assert retrofit_main(["validate", str(path)]) == 0
    assert "recipe OK" in capsys.readouterr().out


@pytest.mark.parametrize("task", TASKS)
def test_the_runs_of_a_sweep_differ_only_in_passes_and_output_dir(task):
    recipes = [load_recipe(p).recipe.model_dump(mode="json") for p in sweep_recipes(task)]
    assert [r["sleep"].pop("passes") for r in recipes] == list(PASSES)
    assert len({r.pop("output_dir") for r in recipes}) == len(PASSES)
    assert [r.pop("description").split(", ")[1].split(";")[0] for r in recipes] == [f"N={n}" for n in PASSES]
    assert recipes[0] == recipes[1] == recipes[2]  # seed, task and data, model, optimizer, budget, eval
    shared = recipes[0]
    config = shared["model"]["config"]
    assert config["num_hidden_layers"] == 4 and config["hidden_size"] == TASKS[task]["hidden_size"]
    assert config["layer_types"] == ["full_attention", "linear_attention"] * 2  # attn→GDN→attn→GDN
    assert shared["sleep"]["window"] == TASKS[task]["window"] and shared["sleep"]["eviction"] == "hard"


@pytest.mark.parametrize("task", TASKS)
def test_every_n_sees_the_same_batches_and_starts_from_the_same_weights(task):
    """The trainer draws step s's batch from (seed, s) alone and seeds the init with the recipe's seed."""
    first, last = (resolve(load_recipe(p).recipe) for p in sweep_recipes(task)[:: len(PASSES) - 1])
    assert (first.sleep.passes, last.sleep.passes) == (1, 4)

    def batch(resolved, seed: int, step: int) -> dict[str, torch.Tensor]:
        return micro_batch(resolved.task, seed, step, range(8), resolved.task.tokenizer.pad_token_id, 8)

    for step in (0, 7):
        a, b = batch(first, first.recipe.seed, step), batch(last, last.recipe.seed, step)
        assert all(torch.equal(a[k], b[k]) for k in a)
    assert not torch.equal(batch(first, 0, 7)["input_ids"], batch(first, 1, 7)["input_ids"])  # the seed matters

    weights = []
    for resolved in (first, last):
        set_seed(resolved.recipe.seed)
        weights.append(build_model(resolved).state_dict())
    assert all(torch.equal(weights[0][k], weights[1][k]) for k in weights[0])


def test_the_sweep_is_over_the_passes_or_tunes_n1_after_the_overrides():
    axes, overrides = replication.sweep_plan((1, 4), [], ["train.max_steps=9"], dry_run=True)
    assert axes == [("sleep.passes", ("1", "4"))]
    assert overrides == [*replication.DRY_RUN_OVERRIDES, "train.max_steps=9"]
    grid = ["optimizer.muon.lr=2e-3,1e-2", "optimizer.adamw.lr=5e-5,1e-3,3e-3"]
    axes, overrides = replication.sweep_plan(PASSES, grid, ["train.max_steps=9"], dry_run=False)
    assert axes == [("optimizer.muon.lr", ("2e-3", "1e-2")), ("optimizer.adamw.lr", ("5e-5", "1e-3", "3e-3"))]
    assert overrides == ["train.max_steps=9", "sleep.passes=1"]


def test_passes_chooses_a_subset_of_n(capsys):
    assert replication._parser().parse_args(["depo", "--passes", "4,1"]).passes == (1, 4)
    for bad in ("3", "1,x", ""):
        with pytest.raises(SystemExit):
            replication._parser().parse_args(["depo", "--passes", bad])
        assert "comma-separated subset of 1,2,4" in capsys.readouterr().err


def test_the_dry_run_trains_three_runs_at_once_and_reports_them(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")  # restored after the test (main sets it for its runs)
    root = tmp_path / "sweep"
    assert replication.main(["rule110", "--dry-run", "--seed", "3", "--root", str(root)]) == 0
    sweep = json.loads((root / "sweep.json").read_text())
    assert [(r["values"]["sleep.passes"], r["returncode"]) for r in sweep["runs"]] == [(str(n), 0) for n in PASSES]
    assert all(r["seconds"] > 0 for r in sweep["runs"])
    for passes in PASSES:
        saved = load_recipe(root / f"passes{passes}-seed3" / "recipe.yaml").recipe
        assert (saved.seed, saved.sleep["passes"], saved.train.max_steps) == (3, passes, 2)
    report = json.loads((root / "report" / "report.json").read_text())["tasks"]["rule110"]
    assert [(r["passes"], r["step"]) for r in report["runs"]] == [(n, 2) for n in PASSES]
    assert (root / "report" / "rule110-accuracy-vs-tokens.png").is_file()
    assert "| rollout depth t | N=1 | N=2 | N=4 |" in capsys.readouterr().out

    # The same sweep again keeps the finished runs instead of training them twice.
    assert replication.main(["rule110", "--dry-run", "--seed", "3", "--root", str(root)]) == 0
    assert capsys.readouterr().out.count("finished earlier") == len(PASSES) * 2  # in the plan and the run


def test_a_failed_run_shows_the_end_of_its_log_and_fails_the_sweep(tmp_path, monkeypatch, capsys):
    def failing_plan(recipe, axes, seeds, root, overrides):
        script = "import sys; print('CUDA out of memory in N=' + sys.argv[1]); sys.exit(int(sys.argv[1]))"
        runs = [(("sleep.passes", str(n)), ("seed", "0")) for n in (1, 2)]
        return [SweepRun(v, root / f"n{v[0][1]}", [sys.executable, "-c", script, v[0][1]]) for v in runs]

    monkeypatch.setattr(retrofit_sweep, "plan_sweep", failing_plan)
    assert replication.main(["rule110", "--root", str(tmp_path)]) == 1
    err = capsys.readouterr().err
    assert "sleep.passes=2, seed=0 failed" in err and "CUDA out of memory in N=2" in err
    sweep = json.loads((tmp_path / "sweep.json").read_text())
    assert [(r["values"]["sleep.passes"], r["returncode"]) for r in sweep["runs"]] == [("1", 1), ("2", 2)]


def test_the_tuning_dry_run_compares_the_settings_by_their_values(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    root = tmp_path / "tune"
    assert (
        replication.main(["rule110", "--dry-run", "--root", str(root), "--tune", "optimizer.adamw.lr=1e-4,1e-1"]) == 0
    )
    assert "| rollout depth t | lr=0.0001 | lr=0.1 |" in capsys.readouterr().out
    for lr in ("1e-4", "1e-1"):
        saved = load_recipe(root / f"lr{lr}-seed0" / "recipe.yaml").recipe
        assert (saved.optimizer.adamw.lr, saved.sleep["passes"]) == (float(lr), 1)
    summary = json.loads((root / "report" / "report.json").read_text())["tasks"]["rule110"]["runs"]
    assert summary[0]["losses"] != summary[1]["losses"]  # the rate changed the model
