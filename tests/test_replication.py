"""Issue 9's sweeps: the replicate recipes (one per N, same data), and the sweep command end to end on CPU."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch
from accelerate.utils import set_seed

from benchmarks import replication
from benchmarks.replication import PASSES, SweepRun
from retrofit.cli import main as retrofit_main
from retrofit.recipes import load_recipe, resolve
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
        return micro_batch(resolved.task, seed, step, range(8), resolved.task.tokenizer.pad_token_id)

    for step in (0, 7):
        a, b = batch(first, first.recipe.seed, step), batch(last, last.recipe.seed, step)
        assert all(torch.equal(a[k], b[k]) for k in a)
    assert not torch.equal(batch(first, 0, 7)["input_ids"], batch(first, 1, 7)["input_ids"])  # the seed matters

    weights = []
    for resolved in (first, last):
        set_seed(resolved.recipe.seed)
        weights.append(build_model(resolved).state_dict())
    assert all(torch.equal(weights[0][k], weights[1][k]) for k in weights[0])


def test_the_plan_runs_each_n_recipe_into_its_own_folder_with_the_seed_then_the_overrides(tmp_path):
    runs = replication.plan("depo", tmp_path, 5, ["train.max_steps=9"], dry_run=True)
    assert [r.passes for r in runs] == list(PASSES)
    for run in runs:
        assert run.run_dir == tmp_path / f"n{run.passes}" and run.log == tmp_path / f"n{run.passes}.log"
        assert run.command[1:5] == ["-m", "retrofit", "train", str(RECIPES / f"depo-n{run.passes}.yaml")]
        settings = run.command[6::2]
        assert all(flag == "--set" for flag in run.command[5::2])
        assert settings == [f"output_dir={run.run_dir}", "seed=5", *replication.DRY_RUN_OVERRIDES, "train.max_steps=9"]
    assert "model.config.hidden_size=16" not in replication.plan("depo", tmp_path, 5, [], dry_run=False)[0].command


def test_passes_chooses_a_subset_of_n_and_refuses_n_without_a_recipe(tmp_path, capsys):
    args = replication._parser().parse_args(["depo", "--passes", "4,1"])
    assert args.passes == (1, 4)
    runs = replication.plan("depo", tmp_path, 0, [], dry_run=False, passes=args.passes)
    assert [(r.passes, r.command[4]) for r in runs] == [(n, str(RECIPES / f"depo-n{n}.yaml")) for n in (1, 4)]
    for bad in ("3", "1,x", ""):
        with pytest.raises(SystemExit):
            replication._parser().parse_args(["depo", "--passes", bad])
        assert "comma-separated subset of 1,2,4" in capsys.readouterr().err


def test_the_dry_run_trains_three_runs_at_once_and_reports_them(tmp_path, capsys):
    root = tmp_path / "sweep"
    assert replication.main(["rule110", "--dry-run", "--seed", "3", "--root", str(root)]) == 0
    sweep = json.loads((root / "sweep.json").read_text())
    assert [(r["passes"], r["returncode"]) for r in sweep["runs"]] == [(n, 0) for n in PASSES]
    assert all(r["seconds"] > 0 for r in sweep["runs"])
    for passes in PASSES:
        saved = load_recipe(root / f"n{passes}" / "recipe.yaml").recipe
        assert (saved.seed, saved.sleep["passes"], saved.train.max_steps) == (3, passes, 2)
    report = json.loads((root / "report" / "report.json").read_text())["tasks"]["rule110"]
    assert [(r["passes"], r["step"]) for r in report["runs"]] == [(n, 2) for n in PASSES]
    assert (root / "report" / "rule110-accuracy-vs-tokens.png").is_file()
    assert "| rollout depth t | N=1 | N=2 | N=4 |" in capsys.readouterr().out

    # A second sweep into the same root would mix with the first one's runs: refused before starting anything.
    assert replication.main(["rule110", "--dry-run", "--root", str(root)]) == 2
    assert f"{root / 'n1'}" in capsys.readouterr().err


def test_a_failed_run_shows_the_end_of_its_log_and_fails_the_sweep(tmp_path, monkeypatch, capsys):
    def failing_plan(task, root, seed, overrides, *, dry_run, passes):
        script = "import sys; print('CUDA out of memory in N=' + sys.argv[1]); sys.exit(int(sys.argv[1]))"
        return [SweepRun(n, root / f"n{n}", root / f"n{n}.log", [sys.executable, "-c", script, str(n)]) for n in (1, 2)]

    monkeypatch.setattr(replication, "plan", failing_plan)
    assert replication.main(["rule110", "--root", str(tmp_path)]) == 1
    err = capsys.readouterr().err
    assert "N=2 failed" in err and "CUDA out of memory in N=2" in err
    sweep = json.loads((tmp_path / "sweep.json").read_text())
    assert [(r["passes"], r["returncode"]) for r in sweep["runs"]] == [(1, 1), (2, 2)]


def test_tuning_plans_n1_at_every_combination_after_the_overrides(tmp_path):
    grid = ["optimizer.muon.lr=2e-3,1e-2", "optimizer.adamw.lr=5e-5,1e-3,3e-3"]
    runs = replication.plan_tuning("depo", tmp_path, 0, ["train.max_steps=9"], grid, dry_run=False)
    assert len(runs) == 6 and {r.passes for r in runs} == {1}
    assert len({r.run_dir for r in runs}) == 6
    assert runs[4].settings == ("optimizer.muon.lr=1e-2", "optimizer.adamw.lr=1e-3")
    assert runs[4].command[-6:] == ["--set", "train.max_steps=9", *[a for s in runs[4].settings for a in ("--set", s)]]
    assert runs[4].command[4] == str(RECIPES / "depo-n1.yaml")
    with pytest.raises(ValueError, match="KEY=VALUE1,VALUE2"):
        replication.plan_tuning("depo", tmp_path, 0, [], ["optimizer.muon.lr"], dry_run=False)


def test_the_tuning_dry_run_compares_the_settings_in_a_table(tmp_path, capsys):
    root = tmp_path / "tune"
    assert (
        replication.main(["rule110", "--dry-run", "--root", str(root), "--tune", "optimizer.adamw.lr=1e-4,1e-1"]) == 0
    )
    table = (root / "tuning.md").read_text()
    assert table == capsys.readouterr().out.split("exit 0 after")[-1].split("\n", 1)[1]
    rows = [line for line in table.splitlines() if line.startswith("| N=1")]
    assert [row.split(" | ")[0] for row in rows] == ["| N=1, optimizer.adamw.lr=1e-4", "| N=1, optimizer.adamw.lr=1e-1"]
    for i, lr in enumerate((1e-4, 1e-1)):
        assert load_recipe(root / f"tune{i}" / "recipe.yaml").recipe.optimizer.adamw.lr == lr
    depths = table.splitlines()[0].count("| loss ")
    losses = [[float(cell) for cell in row.split(" | ")[1 : 1 + depths]] for row in rows]
    assert depths >= 1 and losses[0] != losses[1]  # a column per evaluated depth; the rate changed the model
