"""The trainer: outputs of a run, crash-safe resume (bitwise), the NaN watchdog, optimizer, schedule, data, eval."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import yaml
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from retrofit.cli import main
from retrofit.engine import next_token_targets
from retrofit.evaluation import evaluate
from retrofit.optim import MuonWithAdamW, build_optimizer, build_scheduler, schedule_factor, split_parameters
from retrofit.recipes import load_recipe, resolve
from retrofit.recipes.schema import OptimizerSection
from retrofit.tasks import get_task
from retrofit.training import trainer
from retrofit.training.build import build_model
from retrofit.training.data import StepBatches, micro_batch, micro_batch_indices, prefetched

REPO = Path(__file__).resolve().parents[1]


def micro_recipe(tmp_path: Path, name: str = "micro", **sections) -> Path:
    """The CPU main job shrunk to seconds: d=16, batch 4, a generated eval set of 8 examples per depth."""
    data = {
        "base": str(REPO / "recipes" / "rule110-tiny.yaml"),
        "output_dir": str(tmp_path / name),
        "model": {"config": {"hidden_size": 16, "intermediate_size": 32, "linear_head_dim": 8}},
        "train": {"max_steps": 6, "batch_size": 4, "checkpoint_every": 2, "keep_checkpoints": 2, "log_every": 1},
        "eval": {"source": "generated", "num_per_difficulty": 8, "every_steps": 3, "batch_size": 16},
    }
    for key, value in sections.items():
        data[key] = {**data.get(key, {}), **value}
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def final_weights(run_dir: Path) -> dict[str, torch.Tensor]:
    return load_file(run_dir / "model" / "model.safetensors")


# ---------------------------------------------------------------------------------------------- a run


def test_run_writes_checkpoints_logs_results_and_a_loadable_model(tmp_path, capsys):
    recipe = micro_recipe(tmp_path)
    assert main(["train", str(recipe)]) == 0
    run = tmp_path / "micro"
    out = capsys.readouterr().out
    assert "| difficulty | examples | accuracy | loss |" in out

    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step_000004", "step_000006"]  # keep 2
    state = json.loads((run / "checkpoints" / "step_000006" / "trainer_state.json").read_text())
    assert state == {"step": 6, "tokens_seen": 6 * 4 * 101}
    assert list((run / "tensorboard").rglob("events.out.tfevents.*"))
    assert {"results.json", "results.md", "results.png", "recipe.yaml"} <= {p.name for p in run.iterdir()}
    results = json.loads((run / "results.json").read_text())
    assert [b["difficulty"] for b in results["buckets"]] == [1, 2, 4]
    assert (run / "eval" / "step_000003.json").is_file()

    model = AutoModelForCausalLM.from_pretrained(run / "model")
    assert model.sleep_config.passes == 2 and model.sleep_config.sleep_on == "context_only"
    ckpt = AutoModelForCausalLM.from_pretrained(run / "checkpoints" / "step_000006" / "model")
    assert (run / "checkpoints" / "step_000004" / "model" / "tokenizer.json").is_file()  # generates, publishes alone
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), ckpt.state_dict().values(), strict=True))

    # Without --resume, a second run refuses to mix with the first one's checkpoints.
    assert main(["train", str(recipe)]) == 2
    assert "--resume auto" in capsys.readouterr().err


def test_overwrite_replaces_what_comes_after_the_starting_point(tmp_path, capsys):
    """A branch from an earlier checkpoint, and a fresh start, discard the later checkpoints and evaluations."""
    recipe = micro_recipe(tmp_path)
    run = tmp_path / "micro"
    assert main(["train", str(recipe)]) == 0  # checkpoints at 4 and 6, evaluations at 3 and 6

    def evaluations() -> list[str]:
        return sorted(p.stem for p in (run / "eval").glob("*.json"))

    branch = ["train", str(recipe), "--resume", str(run / "checkpoints" / "step_000004"), "--set", "eval.every_steps=5"]
    assert main(branch) == 2  # step_000006 belongs to the first run
    assert "later checkpoints (step_000006)" in capsys.readouterr().err
    assert main([*branch, "--overwrite"]) == 0
    assert evaluations() == ["step_000003", "step_000005", "step_000006"]
    assert main(["train", str(recipe), "--overwrite", "--set", "eval.every_steps=4"]) == 0
    assert evaluations() == ["step_000004", "step_000006"]


def test_resume_after_sigkill_is_bitwise_equal_to_an_uninterrupted_run(tmp_path):
    """Kill a run (SIGKILL) after its first checkpoint, resume it, and compare with a run never interrupted."""
    sections = {"train": {"max_steps": 12, "checkpoint_every": 4, "batch_size": 8}, "eval": {"every_steps": 0}}
    env = {**os.environ, "OMP_NUM_THREADS": "1"}

    def command(recipe: Path, *extra: str) -> list[str]:
        return [sys.executable, "-m", "retrofit", "train", str(recipe), *extra]

    whole = micro_recipe(tmp_path, "whole", **sections)
    subprocess.run(command(whole), check=True, cwd=REPO, env=env, capture_output=True)

    killed = micro_recipe(tmp_path, "killed", **sections)
    proc = subprocess.Popen(command(killed), cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    first = tmp_path / "killed" / "checkpoints" / "step_000004" / "trainer_state.json"
    deadline = time.monotonic() + 120
    while not first.exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.01)
    assert proc.poll() is None, "the run ended before it could be killed"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (tmp_path / "killed" / "model").exists()

    subprocess.run(command(killed, "--resume", "auto"), check=True, cwd=REPO, env=env, capture_output=True)
    a, b = final_weights(tmp_path / "whole"), final_weights(tmp_path / "killed")
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_nan_loss_stops_with_exit_3_and_keeps_the_last_good_checkpoint(tmp_path, capsys, monkeypatch):
    build = trainer.build_model

    def poisoned(resolved):
        model = build(resolved)
        calls = []

        def hook(module, args, kwargs, output):
            calls.extend([1] if module.training else [])
            if len(calls) > 3:
                output.loss = output.loss * float("nan")
            return output

        model.register_forward_hook(hook, with_kwargs=True)
        return model

    monkeypatch.setattr(trainer, "build_model", poisoned)
    assert main(["train", str(micro_recipe(tmp_path))]) == 3
    last_line = capsys.readouterr().err.strip().splitlines()[-1]  # after the closed progress bar
    assert last_line.startswith("error: training diverged at step 4") and "step_000002" in last_line
    run = tmp_path / "micro"
    assert [p.name for p in (run / "checkpoints").iterdir()] == ["step_000002"]
    assert not (run / "model").exists()


# ---------------------------------------------------------------------------------------------- pieces


def _model(tmp_path: Path):
    resolved = resolve(load_recipe(micro_recipe(tmp_path)).recipe)
    return build_model(resolved), resolved


def test_muon_takes_the_block_matrices_and_adamw_the_rest(tmp_path):
    model, _ = _model(tmp_path)
    optimizer = build_optimizer(model, OptimizerSection(name="muon"))
    muon_ids = {id(p) for g in optimizer.inner["muon"].param_groups for p in g["params"]}
    names = {id(p): n for n, p in model.named_parameters()}
    muon_names = {names[i] for i in muon_ids}
    assert muon_names and all(n.startswith("model.layers.") and n.endswith(".weight") for n in muon_names)
    assert all(model.get_parameter(n).ndim == 2 for n in muon_names)
    adamw_names = {names[id(p)] for g in optimizer.inner["adamw"].param_groups for p in g["params"]}
    assert {"model.embed_tokens.weight", "lm_head.weight", "model.norm.weight"} <= adamw_names
    assert muon_names.isdisjoint(adamw_names) and len(muon_names | adamw_names) == len(list(model.parameters()))
    adamw_only = build_optimizer(model, OptimizerSection(name="adamw"))
    assert isinstance(adamw_only, torch.optim.AdamW)


def test_muon_alone_when_only_block_matrices_train(tmp_path):
    """A LoRA adapter on Jet-Nemotron trains block matrices only: no AdamW is built over an empty list."""
    model, _ = _model(tmp_path)
    matrices = {id(p) for p in split_parameters(model)[0]}
    for p in model.parameters():
        p.requires_grad_(id(p) in matrices)
    optimizer = build_optimizer(model, OptimizerSection(name="muon"))
    assert list(optimizer.inner) == ["muon"]
    before = [p.detach().clone() for p in optimizer.param_groups[0]["params"]]
    for p in model.parameters():
        p.grad = torch.ones_like(p) if p.requires_grad else None
    optimizer.step()
    assert all(not torch.equal(a, p) for a, p in zip(before, optimizer.param_groups[0]["params"], strict=True))
    optimizer.load_state_dict(optimizer.state_dict())


def test_combined_optimizer_state_round_trips_and_the_schedule_drives_both(tmp_path):
    model, resolved = _model(tmp_path)
    section = OptimizerSection(warmup_steps=2, schedule="linear")
    optimizer = build_optimizer(model, section)
    scheduler = build_scheduler(optimizer, section, max_steps=10)
    batch = micro_batch(resolved.task, 0, 0, range(2), 0, 2)
    model(**batch).loss.backward()
    optimizer.step()
    scheduler.step()
    restored = build_optimizer(model, section)
    assert isinstance(restored, MuonWithAdamW)
    restored.load_state_dict(optimizer.state_dict())
    restored_scheduler = build_scheduler(restored, section, max_steps=10)
    restored_scheduler.load_state_dict(scheduler.state_dict())
    restored_scheduler.step()
    lrs = [g["lr"] for opt in restored.inner.values() for g in opt.param_groups]
    assert lrs == pytest.approx([2e-3 * schedule_factor(section, 10)(2), 5e-5 * schedule_factor(section, 10)(2)])


@pytest.mark.parametrize("schedule", ["cosine", "linear", "constant"])
def test_schedule_warms_up_then_decays_to_the_floor(schedule):
    factor = schedule_factor(OptimizerSection(schedule=schedule, warmup_steps=4, min_lr_ratio=0.1), max_steps=20)
    assert [factor(s) for s in range(4)] == pytest.approx([0.25, 0.5, 0.75, 1.0])
    assert factor(4) == pytest.approx(1.0)
    assert factor(20) == pytest.approx(1.0 if schedule == "constant" else 0.1)


def test_batches_depend_only_on_seed_and_step():
    task = get_task("rule110", steps_choices=[1, 2])
    whole = micro_batch(task, 3, 7, range(8), 0, 8)
    # Two processes with two accumulation micro-steps of 2 examples cover the same global batch.
    parts = [micro_batch(task, 3, 7, micro_batch_indices(m, r, 2, 2), 0, 8) for m in range(2) for r in range(2)]
    assert torch.equal(torch.cat([p["input_ids"] for p in parts]), whole["input_ids"])
    assert not torch.equal(micro_batch(task, 3, 8, range(8), 0, 8)["input_ids"], whole["input_ids"])


def test_prefetched_batches_are_each_process_s_micro_batches_in_training_order():
    task = get_task("rule110", steps_choices=[1, 2])
    # Process 1 of 2, resuming at step 5 of 7, two accumulation micro-steps of 2 examples each.
    rng_before = torch.get_rng_state()
    got = list(prefetched(StepBatches(task, 3, range(5, 7), 2, 1, 2, 2, 0), pin_memory=False))
    assert torch.equal(torch.get_rng_state(), rng_before)  # a resumed run's random state is left as it was
    want = [micro_batch(task, 3, s, micro_batch_indices(m, 1, 2, 2), 0, 8) for s in (5, 6) for m in range(2)]
    assert len(got) == len(want) == 4
    for g, w in zip(got, want, strict=True):
        assert g.keys() == w.keys() and all(torch.equal(g[k], w[k]) for k in w)


class _Oracle(torch.nn.Module):
    """Scores every supervised next token right at loss 0, except the last answer token of the rows told (a model's
    token scores: `return_token_scores=True`)."""

    sleep_config = True  # a sleeping model: evaluation asks it for token scores

    def __init__(self, wrong_rows: set[int]) -> None:
        super().__init__()
        self.wrong_rows = wrong_rows

    def forward(self, input_ids, attention_mask, labels, return_token_scores):
        supervised = next_token_targets(labels, attention_mask.bool()) != -100
        token_loss, token_correct = torch.zeros(supervised.shape), torch.ones(supervised.shape, dtype=torch.bool)
        for row in self.wrong_rows:
            last = int(supervised[row].nonzero().max())
            token_loss[row, last], token_correct[row, last] = 5.0, False
        return SimpleNamespace(token_loss=token_loss, token_correct=token_correct)


def test_evaluation_buckets_token_scores_by_difficulty():
    from accelerate import Accelerator

    task = get_task("rule110", steps_choices=[1, 4])
    dataset = task.eval_dataset(4, seed=0)  # rows 0-3: t=1, rows 4-7: t=4
    result = evaluate(_Oracle({5}), dataset, task=task, step=3, batch_size=8, accelerator=Accelerator(cpu=True))
    assert [(b.difficulty, b.examples, b.correct) for b in result.buckets] == [(1, 4, 4), (4, 4, 3)]
    assert result.buckets[0].loss < 1e-3 < result.buckets[1].loss
