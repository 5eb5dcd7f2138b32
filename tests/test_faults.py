"""Faults and bad inputs, as a user meets them: each ends with its exit code and one line that names the problem
and the fix, no traceback, and nothing already saved is lost.

Exit codes: 1 a runtime fault, 2 a bad recipe, flag or input, 3 divergence, 128 + N a signal.
"""

from __future__ import annotations

import errno
import json
import os
import pickle
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from retrofit.cli import main
from retrofit.training import safe_state, trainer
from tests.test_trainer import micro_recipe

REPO = Path(__file__).resolve().parents[1]
SHORT = {"train": {"max_steps": 6, "checkpoint_every": 2, "keep_checkpoints": 5}, "eval": {"every_steps": 0}}


def error_line(err: str) -> str:
    """The one error line of a command's stderr (progress bars aside); fails on a traceback or several errors."""
    assert "Traceback" not in err, err
    lines = [line for line in err.replace("\r", "\n").splitlines() if line.startswith(("error", "retrofit: error"))]
    assert len(lines) == 1, err
    return lines[0]


def weights(folder: Path) -> dict[str, torch.Tensor]:
    return load_file(folder / "model.safetensors")


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> Path:
    """A finished micro run (checkpoints at steps 2, 4 and 6), copied by the tests that change it."""
    root = tmp_path_factory.mktemp("faults")
    assert main(["train", str(micro_recipe(root, "run", **SHORT))]) == 0
    return root / "run"


def copy_run(trained: Path, tmp_path: Path) -> tuple[Path, Path]:
    """A copy of the trained run and a recipe that writes to it."""
    run = tmp_path / "run"
    shutil.copytree(trained, run)
    return run, micro_recipe(tmp_path, "run", **SHORT)


# ---------------------------------------------------------------------------------------------- checkpoints


class Payload:
    """Unpickling this writes a marker file: a checkpoint that ran it would have run code."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (Path.write_text, (self.marker, "code ran"))


@pytest.mark.parametrize("name", ["optimizer.bin", "random_states_0.pkl", "custom_checkpoint_0.pkl"])
def test_a_checkpoint_holding_a_pickle_is_refused_and_runs_no_code(name, trained, tmp_path, capsys):
    run, recipe = copy_run(trained, tmp_path)
    checkpoint = run / "checkpoints" / "step_000004"
    marker = tmp_path / "marker"
    (checkpoint / name).write_bytes(pickle.dumps(Payload(marker)))
    assert main(["train", str(recipe), "--resume", str(checkpoint), "--overwrite"]) == 1
    line = error_line(capsys.readouterr().err)
    assert name in line and "could run as code" in line
    assert not marker.exists()
    assert (run / "checkpoints" / "step_000002").is_dir()  # the earlier checkpoint is untouched


def test_a_new_checkpoint_holds_no_pickle(trained):
    checkpoint = trained / "checkpoints" / "step_000006"
    assert safe_state.pickles_in(checkpoint) == []
    assert {"optimizer.safetensors", "scheduler.json", "random_states_0.json"} <= {p.name for p in checkpoint.iterdir()}


def test_resume_auto_falls_back_past_a_corrupt_latest_checkpoint(trained, tmp_path, capsys):
    run, recipe = copy_run(trained, tmp_path)
    latest = run / "checkpoints" / "step_000006"
    (latest / "optimizer.safetensors").write_bytes(b"\0" * 10)  # truncated
    assert main(["train", str(recipe), "--resume", "auto", "--max-steps", "8"]) == 0
    out = capsys.readouterr().out
    assert f"resume: {latest} cannot be loaded" in out and "resumed from" in out and "step_000004" in out
    assert (run / "model" / "model.safetensors").is_file()


def test_resume_auto_with_every_checkpoint_corrupt_is_one_line(trained, tmp_path, capsys):
    run, recipe = copy_run(trained, tmp_path)
    for checkpoint in (run / "checkpoints").iterdir():
        (checkpoint / "scheduler.json").write_text("{not json")
    assert main(["train", str(recipe), "--resume", "auto", "--max-steps", "8"]) == 1
    captured = capsys.readouterr()
    assert captured.out.count("cannot be loaded") == 2  # 6, then 4, then 2: the error
    line = error_line(captured.err)
    assert "step_000002 cannot be loaded" in line and "--overwrite" in line


def test_divergence_names_a_good_checkpoint_and_a_lower_lr_trains_on_from_it(tmp_path, capsys):
    """LR 30 diverges a few steps in (step 7 here); a checkpoint every step shows which ones count as good."""
    sections = {"train": {"max_steps": 12, "checkpoint_every": 1, "keep_checkpoints": 20}, "eval": {"every_steps": 0}}
    optimizer = {"adamw": {"lr": 30.0}, "muon": {"lr": 30.0}, "warmup_steps": 0}
    recipe = micro_recipe(tmp_path, "run", **sections, optimizer=optimizer)
    assert main(["train", str(recipe)]) == 3
    line = error_line(capsys.readouterr().err)
    step = int(line.split("training diverged at step ")[1].split(":")[0])
    checkpoints = sorted((tmp_path / "run" / "checkpoints").iterdir())
    good = [c for c in checkpoints if not (c / "diverged.json").exists()]
    assert good and [int(c.name[5:]) for c in good] == list(range(1, step - 1))  # not step - 1: it diverged
    assert f"the last good checkpoint is {good[-1]}" in line
    for c in good:
        assert all(torch.isfinite(t).all() for t in weights(c / "model").values())
    lower = ["--set", "optimizer.adamw.lr=1e-3", "--set", "optimizer.muon.lr=1e-3"]
    assert main(["train", str(recipe), "--resume", "auto", "--overwrite", *lower]) == 0
    out = capsys.readouterr().out
    assert "resume: optimizer.adamw.lr changed from 30.0 to 0.001 (applied)" in out
    assert f"resumed from {good[-1]}" in out
    assert all(torch.isfinite(t).all() for t in weights(tmp_path / "run" / "model").values())


def test_weights_that_are_not_finite_are_never_checkpointed(tmp_path, capsys, monkeypatch):
    """A weight turned infinite during step 2 (before its checkpoint): the run stops as diverged, saving nothing."""
    build = trainer.build_model

    def poisoned(resolved):
        model = build(resolved)
        calls = []

        def hook(module, args, output):
            calls.extend([1] if module.training else [])
            if len(calls) == 2:
                with torch.no_grad():
                    next(module.parameters()).fill_(float("inf"))
            return output

        model.register_forward_hook(hook)
        return model

    monkeypatch.setattr(trainer, "build_model", poisoned)
    assert main(["train", str(micro_recipe(tmp_path, "run", **SHORT))]) == 3
    assert "training diverged at step 3" in error_line(capsys.readouterr().err)
    checkpoints = tmp_path / "run" / "checkpoints"
    assert not checkpoints.exists() or not list(checkpoints.glob("step_*"))


@pytest.mark.parametrize(
    ("change", "key"),
    [("train.batch_size=8", "train.batch_size"), ("model.config.hidden_size=32", "model.config.hidden_size")],
)
def test_a_resume_that_changes_data_or_shapes_is_refused_naming_the_key(change, key, trained, tmp_path, capsys):
    run, recipe = copy_run(trained, tmp_path)
    before = weights(run / "model")
    assert main(["train", str(recipe), "--resume", "auto", "--max-steps", "8", "--set", change]) == 2
    line = error_line(capsys.readouterr().err)
    assert key in line and "changed since the checkpoint" in line
    after = weights(run / "model")
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_sigterm_checkpoints_and_resume_equals_the_uninterrupted_run(trained, tmp_path):
    recipe = micro_recipe(tmp_path, "killed", train={"max_steps": 40, "checkpoint_every": 100}, eval={"every_steps": 0})
    whole = micro_recipe(tmp_path, "whole", train={"max_steps": 40, "checkpoint_every": 100}, eval={"every_steps": 0})
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    subprocess.run([sys.executable, "-m", "retrofit", "train", str(whole)], check=True, cwd=REPO, env=env,
                   capture_output=True)  # fmt: skip
    proc = subprocess.Popen([sys.executable, "-m", "retrofit", "train", str(recipe)], cwd=REPO, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)  # fmt: skip
    log = tmp_path / "killed" / "train.log"
    deadline = time.monotonic() + 120
    while not (log.is_file() and "step 3/" in log.read_text()) and time.monotonic() < deadline:
        time.sleep(0.02)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 128 + signal.SIGTERM, err
    assert "stopped by SIGTERM after step" in err and "continue with --resume auto" in err and "Traceback" not in err
    assert len(list((tmp_path / "killed" / "checkpoints").iterdir())) == 1
    subprocess.run([sys.executable, "-m", "retrofit", "train", str(recipe), "--resume", "auto"], check=True,
                   cwd=REPO, env=env, capture_output=True)  # fmt: skip
    a, b = weights(tmp_path / "whole" / "model"), weights(tmp_path / "killed" / "model")
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_a_full_disk_while_checkpointing_is_one_line_and_keeps_the_earlier_checkpoints(tmp_path, capsys, monkeypatch):
    recipe = micro_recipe(tmp_path, "run", **SHORT)
    save = safe_state.save_file
    calls = []

    def full(*args, **kwargs):
        calls.append(1)
        if len(calls) > 3:  # the first checkpoint (optimizer, scheduler, random states) fits
            raise OSError(errno.ENOSPC, "No space left on device")
        return save(*args, **kwargs)

    monkeypatch.setattr(safe_state, "save_file", full)
    assert main(["train", str(recipe)]) == 1
    assert "the disk is full" in error_line(capsys.readouterr().err)
    checkpoints = tmp_path / "run" / "checkpoints"
    assert [p.name for p in checkpoints.iterdir() if not p.name.startswith(".")] == ["step_000002"]
    assert not (tmp_path / "run" / "model").exists()


def test_a_second_training_into_a_running_one_s_folder_is_refused(tmp_path, capsys):
    recipe = micro_recipe(tmp_path, "run", **SHORT)
    (tmp_path / "run").mkdir()
    holder = subprocess.Popen([sys.executable, "-c", (
        "import fcntl, sys, time; f = open(sys.argv[1], 'a+'); fcntl.lockf(f, fcntl.LOCK_EX); "
        "f.write('pid 1 on elsewhere'); f.flush(); print('held', flush=True); time.sleep(60)"
    ), str(tmp_path / "run" / ".lock")], stdout=subprocess.PIPE, text=True)  # fmt: skip
    try:
        assert holder.stdout.readline().strip() == "held"
        assert main(["train", str(recipe)]) == 2
        assert "is in use by a running training" in error_line(capsys.readouterr().err)
        assert not (tmp_path / "run" / "checkpoints").exists()
    finally:
        holder.kill()


def test_an_output_dir_inside_a_file_is_one_line(tmp_path, capsys):
    (tmp_path / "file").write_text("")
    assert (
        main(["train", str(micro_recipe(tmp_path, "run", **SHORT)), "--output-dir", str(tmp_path / "file" / "x")]) == 1
    )
    assert "file" in error_line(capsys.readouterr().err)


# ---------------------------------------------------------------------------------------------- saved models


def test_eval_of_a_truncated_model_is_one_line(trained, tmp_path, capsys):
    run, _ = copy_run(trained, tmp_path)
    data = (run / "model" / "model.safetensors").read_bytes()
    (run / "model" / "model.safetensors").write_bytes(data[: len(data) // 2])
    assert main(["eval", str(run)]) == 1
    error_line(capsys.readouterr().err)


def test_eval_of_a_model_whose_config_disagrees_with_its_weights_is_one_line(trained, tmp_path, capsys):
    run, _ = copy_run(trained, tmp_path)
    config = json.loads((run / "model" / "config.json").read_text())
    (run / "model" / "config.json").write_text(json.dumps(config | {"intermediate_size": 48}))
    assert main(["eval", str(run)]) == 1
    error_line(capsys.readouterr().err)


def test_eval_writes_its_own_folder_and_leaves_the_training_results(trained, tmp_path, capsys):
    run, _ = copy_run(trained, tmp_path)
    before = (run / "results.json").read_text()
    assert main(["eval", str(run)]) == 0
    assert (run / "results.json").read_text() == before
    record = json.loads((run / "evaluations" / "step_000006" / "evaluated.json").read_text())
    assert record["step"] == 6 and record["model"].endswith("model")


def test_eval_warns_when_the_saved_sleep_config_is_gone(trained, tmp_path, capsys):
    run, _ = copy_run(trained, tmp_path)
    config = json.loads((run / "model" / "config.json").read_text())
    del config["sleep_config"]
    (run / "model" / "config.json").write_text(json.dumps(config))
    assert main(["eval", str(run)]) == 0
    assert "has no sleep_config" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("extra", "code", "expected"),
    [
        (["--prompt", ""], 2, "is empty"),
        (["--prompt", "0110 é"], 2, "vocabulary lacks"),
        (["--prompt", "0110", "--device", "cuda"], 2, "no CUDA device"),
        (["--prompt", "0110", "--max-new-tokens", "0"], 2, "--max-new-tokens"),
    ],
)
def test_generate_refuses_bad_input_in_one_line(extra, code, expected, trained, capsys):
    if "cuda" in extra and torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    assert main(["generate", str(trained), *extra]) == code
    assert expected in error_line(capsys.readouterr().err)


def test_generate_without_tokenizer_files_is_one_line(trained, tmp_path, capsys):
    run, _ = copy_run(trained, tmp_path)
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        (run / "model" / name).unlink(missing_ok=True)
    assert main(["generate", str(run), "--prompt", "0110"]) == 1
    assert "tokenizer" in error_line(capsys.readouterr().err)


@pytest.mark.parametrize("damage", ["truncated", "no tokenizer"])
def test_push_refuses_a_folder_that_does_not_load(damage, trained, tmp_path, capsys):
    run, _ = copy_run(trained, tmp_path)
    if damage == "truncated":
        data = (run / "model" / "model.safetensors").read_bytes()
        (run / "model" / "model.safetensors").write_bytes(data[:100])
    else:
        (run / "model" / "tokenizer.json").unlink()
        (run / "model" / "tokenizer_config.json").unlink()
    argv = ["push", str(run), "--repo-id", "me/x", "--dry-run", "--output-dir", str(tmp_path / "up")]
    assert main(argv) == 2
    assert ("does not load" if damage == "truncated" else "no usable tokenizer") in error_line(capsys.readouterr().err)
    assert not (tmp_path / "up").exists()


# ---------------------------------------------------------------------------------------------- command line


def test_an_unknown_flag_hints_at_set(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["train", str(micro_recipe(tmp_path, "run")), "--lr", "3"])
    assert exit_info.value.code == 2
    assert "--set KEY=VALUE" in error_line(capsys.readouterr().err)


def test_a_tracker_that_is_not_installed_is_refused_before_training(tmp_path, capsys):
    pytest.importorskip("tensorboard")
    if __import__("importlib").util.find_spec("wandb"):
        pytest.skip("wandb is installed here")
    assert main(["validate", str(micro_recipe(tmp_path, "run")), "--set", "train.log_with=[wandb]"]) == 2
    assert "wandb is not installed" in error_line(capsys.readouterr().err)


def test_resume_from_a_folder_that_is_no_checkpoint_is_one_line(tmp_path, capsys):
    assert main(["train", str(micro_recipe(tmp_path, "run")), "--resume", str(tmp_path)]) == 2
    assert "not a checkpoint" in error_line(capsys.readouterr().err)


def test_debug_shows_the_traceback(trained, tmp_path):
    run, _ = copy_run(trained, tmp_path)
    (run / "model" / "model.safetensors").write_bytes(b"broken")
    with pytest.raises(Exception):  # noqa: B017 (any reader's error: the point is that it is not caught)
        main(["eval", str(run), "--debug"])


def test_a_run_writes_a_plain_text_log(trained):
    log = (trained / "train.log").read_text()
    assert "step 6/6: loss" in log and "Evaluation of rule110 at step 6" in log
    assert "\r" not in log


def test_the_final_model_folder_is_replaced_atomically(trained, tmp_path, monkeypatch, capsys):
    """A crash while the final model is written leaves the previous one whole."""
    run, recipe = copy_run(trained, tmp_path)
    before = weights(run / "model")

    def crash(*args, **kwargs):
        raise OSError(errno.EIO, "Input/output error")

    monkeypatch.setattr(trainer, "save_model_files", crash)
    assert main(["train", str(recipe), "--resume", "auto", "--max-steps", "8"]) == 1
    error_line(capsys.readouterr().err)
    after = weights(run / "model")
    assert all(torch.equal(before[k], after[k]) for k in before)
