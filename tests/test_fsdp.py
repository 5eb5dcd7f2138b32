"""`launch: fsdp2` on CPU processes over gloo: a tiny Jet-Nemotron sharded over two processes trains as one process
does, resumes exactly, and keeps a frozen base frozen.

Two processes start with `torchrun` and `ACCELERATE_USE_CPU=1` (accelerate's launcher starts one CPU process only).
Rule 110 gives every example the same length and label positions, so the mean loss of two half-batches equals the
loss of the whole batch, and the runs can be compared step by step.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from benchmarks.probes import collectives

REPO = Path(__file__).resolve().parents[1]
JET = yaml.safe_load((REPO / "recipes" / "jet-nemotron-tiny.yaml").read_text())["model"]["config"]
# fp32 on CPU: the processes differ from one process by the order of reductions only. Weights get 1e-4: AdamW
# divides each gradient by its own running size, so an entry whose gradient is near zero turns reduction-order noise
# into a visible step (4 steps at 3e-3 move a weight by up to 1.2e-2).
TOLERANCE = {"loss": 1e-5, "grad_norm": 1e-4, "weights": 1e-4}


def recipe(tmp_path: Path, name: str, processes: int | None, **sections) -> Path:
    data = {
        "seed": 0,
        "output_dir": str(tmp_path / name),
        "task": {"name": "rule110", "options": {"steps_choices": [1]}},
        "model": {"config": JET},
        "sleep": {"window": 24, "passes": 2, "eviction": "hard", "sleep_on": "context_only"},
        "optimizer": {
            "name": "adamw",
            "adamw": {"lr": 3e-3},
            "schedule": "constant",
            "warmup_steps": 0,
            "grad_clip": 1.0,
        },
        "train": {"max_steps": 4, "batch_size": 8, "checkpoint_every": 2, "keep_checkpoints": 5, "log_every": 1},
        "eval": {"source": "generated", "num_per_difficulty": 8, "every_steps": 0, "batch_size": 16},
    }
    if processes is not None:
        data["launch"] = {"mode": "fsdp2", "num_processes": processes}
    for key, value in sections.items():
        data[key] = {**data.get(key, {}), **value}
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def train(path: Path, processes: int, *flags: str) -> str:
    """Run `retrofit train` on `processes` CPU processes; its train.log.

    Several processes start under torchrun, as one gloo group (`ACCELERATE_USE_CPU`); one process starts through
    `retrofit train`'s own launch, which keeps a recipe's DeepSpeed mode (`ACCELERATE_USE_CPU` would drop it)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
    program = ["-m", "retrofit", "train", str(path), *flags]
    if processes > 1:
        env["ACCELERATE_USE_CPU"] = "1"
        program = ["-m", "torch.distributed.run", "--nproc_per_node", str(processes), *program]
    done = subprocess.run([sys.executable, *program], cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-4000:]
    return (Path(yaml.safe_load(path.read_text())["output_dir"]) / "train.log").read_text()


def steps(log: str) -> dict[int, tuple[float, float]]:
    """{step: (loss, grad norm)} from a run's log."""
    found = re.findall(r"step (\d+)/\d+: loss ([0-9.]+) .*?grad norm ([0-9.]+)", log)
    return {int(step): (float(loss), float(norm)) for step, loss, norm in found}


def weights(run: Path) -> dict[str, torch.Tensor]:
    return load_file(run / "model" / "model.safetensors")


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[str, Path]:
    """One process without sharding, and FSDP2 on two processes, from the same seed and global batch."""
    root = tmp_path_factory.mktemp("fsdp")
    train(recipe(root, "single", None), 1)
    train(recipe(root, "fsdp2", 2), 2)
    return {"single": root / "single", "fsdp2": root / "fsdp2"}


def test_fsdp2_on_two_processes_matches_one_process_in_loss_gradients_and_weights(runs):
    single = steps((runs["single"] / "train.log").read_text())
    sharded = steps((runs["fsdp2"] / "train.log").read_text())
    assert sorted(single) == sorted(sharded) == [1, 2, 3, 4]
    for step in single:
        (loss_a, norm_a), (loss_b, norm_b) = single[step], sharded[step]
        assert loss_b == pytest.approx(loss_a, rel=TOLERANCE["loss"], abs=1e-4), step
        assert norm_b == pytest.approx(norm_a, rel=TOLERANCE["grad_norm"], abs=1e-3), step
    a, b = weights(runs["single"]), weights(runs["fsdp2"])
    start = load_file(runs["single"] / "checkpoints" / "step_000002" / "model" / "model.safetensors")
    assert a.keys() == b.keys()
    assert any(not torch.equal(a[k], start[k]) for k in a), "training changed nothing: the comparison is vacuous"
    for key in a:
        torch.testing.assert_close(b[key], a[key], rtol=TOLERANCE["weights"], atol=TOLERANCE["weights"])


def test_fsdp2_with_accumulated_micro_batches_matches_one_process(runs, tmp_path):
    """Two micro-batches per process: the loop range stays gathered across them and reshards after the last."""
    path = recipe(tmp_path, "accumulated", 2, train={"micro_batch_size": 2, "checkpoint_every": 0})
    log = train(path, 2)
    assert "(2 process(es) x 2 x 2 accumulation)" in log
    single, accumulated = steps((runs["single"] / "train.log").read_text()), steps(log)
    for step, (loss, norm) in single.items():
        assert accumulated[step][0] == pytest.approx(loss, rel=TOLERANCE["loss"], abs=1e-4), step
        assert accumulated[step][1] == pytest.approx(norm, rel=TOLERANCE["grad_norm"], abs=1e-3), step
    a, b = weights(runs["single"]), weights(tmp_path / "accumulated")
    for key in a:
        torch.testing.assert_close(b[key], a[key], rtol=TOLERANCE["weights"], atol=TOLERANCE["weights"])


def test_fsdp2_gathers_each_looped_block_once_per_step(tmp_path):
    """The probe's recipe: 5 chunks of the tiny Jet-Nemotron's 8 blocks, blocks 2-5 looped (4 chunks sleep with 2
    passes, the last wakes with 1: 9 calls). Each of the 4 other blocks is gathered at each of its 5 calls and again
    for each call's backward; each looped block once; the root (embedding, final norm, head) once. Every gradient
    is reduce-scattered once."""
    result = collectives.run_one("fsdp2", "tiny", tmp_path)
    assert result["collectives"]["c10d::_allgather_base_"]["calls"] == 4 * 5 * 2 + 4 + 1
    reduced = result["collectives"]["c10d::_reduce_scatter_base_"]["elements"]  # shards padded to equal sizes
    assert reduced == pytest.approx(result["parameters"], rel=1e-3)  # every gradient reduced once


def test_an_fsdp2_checkpoint_holds_whole_weights_and_optimizer_state_without_pickles(runs):
    checkpoint = runs["fsdp2"] / "checkpoints" / "step_000002"
    names = sorted(p.name for p in checkpoint.iterdir())
    assert names == sorted(
        ["model", "optimizer.json", "optimizer.safetensors", "random_states_0.json", "random_states_0.safetensors",
         "random_states_1.json", "random_states_1.safetensors", "recipe.yaml", "scheduler.json",
         "scheduler.safetensors", "trainer_state.json"]
    )  # fmt: skip
    single = load_file(runs["single"] / "checkpoints" / "step_000002" / "optimizer.safetensors")
    sharded = load_file(checkpoint / "optimizer.safetensors")
    assert sum(t.numel() for t in sharded.values()) == sum(t.numel() for t in single.values())


def test_an_fsdp2_resume_equals_the_uninterrupted_run(runs, tmp_path):
    path = recipe(tmp_path, "resumed", 2)
    train(path, 2, "--resume", str(runs["fsdp2"] / "checkpoints" / "step_000002"))
    whole, resumed = weights(runs["fsdp2"]), weights(tmp_path / "resumed")
    assert all(torch.equal(whole[k], resumed[k]) for k in whole)


def test_a_frozen_base_stays_frozen_under_fsdp2(tmp_path):
    stages = [{"name": "mlps", "max_steps": 4, "trainable": ["model.layers.*.mlp.*"]}]
    path = recipe(tmp_path, "frozen", 2, optimizer={"adamw": {"lr": 3e-3, "weight_decay": 0.1}})
    data = yaml.safe_load(path.read_text())
    data["stages"] = stages
    path.write_text(yaml.safe_dump(data))
    train(path, 2)
    before = load_file(tmp_path / "frozen" / "checkpoints" / "step_000002" / "model" / "model.safetensors")
    after = weights(tmp_path / "frozen")
    trained = [k for k in after if ".mlp." in k]
    frozen = [k for k in after if ".mlp." not in k]  # weight decay would move any of them that were stepped
    assert trained and frozen
    assert all(torch.equal(before[k], after[k]) for k in frozen)
    assert all(not torch.equal(before[k], after[k]) for k in trained)


def test_fsdp2_on_one_process_trains_and_saves(tmp_path):
    log = train(recipe(tmp_path, "one", 1), 1)
    assert sorted(steps(log)) == [1, 2, 3, 4]
    assert weights(tmp_path / "one")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_fsdp2_on_one_gpu_trains_and_saves_through_retrofit_train(tmp_path):
    """`retrofit train` with `launch: fsdp2` starts accelerate's launcher, which runs one bf16 process on the GPU."""
    path = recipe(tmp_path, "gpu", 1, train={"precision": "bf16"})
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, "-m", "retrofit", "train", str(path)], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=600)  # fmt: skip
    assert done.returncode == 0, done.stderr[-4000:]
    assert "accelerate launch --config_file" in done.stdout and "fsdp2.yaml" in done.stdout
    log = (tmp_path / "gpu" / "train.log").read_text()
    assert sorted(steps(log)) == [1, 2, 3, 4] and all(loss < 10 for loss, _ in steps(log).values())
    assert weights(tmp_path / "gpu")


@pytest.fixture(scope="module")
def lora_runs(tmp_path_factory) -> dict[str, Path]:
    """LoRA on a saved tiny Jet-Nemotron: one process, and FSDP2 on two processes."""
    root = tmp_path_factory.mktemp("fsdp_lora")
    train(recipe(root, "base", None, train={"max_steps": 1, "checkpoint_every": 0}), 1)
    for name, processes in (("single", None), ("fsdp2", 2)):
        path = recipe(root, name, processes)
        data = yaml.safe_load(path.read_text())
        data.update(adapter={"type": "lora", "r": 4}, model={"pretrained": str(root / "base" / "model")})
        path.write_text(yaml.safe_dump(data))
        train(path, processes or 1)
    return {"root": root, "single": root / "single", "fsdp2": root / "fsdp2"}


def adapter_weights(run: Path) -> dict[str, torch.Tensor]:
    return load_file(run / "adapter" / "adapter_model.safetensors")


def test_lora_under_fsdp2_matches_one_process_and_resumes_exactly(lora_runs):
    single = steps((lora_runs["single"] / "train.log").read_text())
    sharded = steps((lora_runs["fsdp2"] / "train.log").read_text())
    for step in single:
        assert sharded[step][0] == pytest.approx(single[step][0], rel=TOLERANCE["loss"], abs=1e-4), step
    a, b = adapter_weights(lora_runs["single"]), adapter_weights(lora_runs["fsdp2"])
    assert a.keys() == b.keys() and any("lora_A" in k for k in a)
    for key in a:
        torch.testing.assert_close(b[key], a[key], rtol=TOLERANCE["weights"], atol=TOLERANCE["weights"])

    resumed = lora_runs["root"] / "fsdp2.yaml"
    data = yaml.safe_load(resumed.read_text())
    data["output_dir"] = str(lora_runs["root"] / "resumed")
    resumed.with_name("resumed.yaml").write_text(yaml.safe_dump(data))
    train(resumed.with_name("resumed.yaml"), 2, "--resume", str(lora_runs["fsdp2"] / "checkpoints" / "step_000002"))
    again = adapter_weights(lora_runs["root"] / "resumed")
    assert all(torch.equal(b[k], again[k]) for k in b)


QWEN3_5 = {"model_type": "qwen3_5_text", "vocab_size": 512, "hidden_size": 32, "num_hidden_layers": 8,
           "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 16, "linear_num_key_heads": 2,
           "linear_num_value_heads": 4, "linear_key_head_dim": 8, "linear_value_head_dim": 8,
           "linear_conv_kernel_dim": 4, "intermediate_size": 48, "tie_word_embeddings": False}  # fmt: skip


def test_a_native_qwen3_5_under_fsdp2_matches_one_process(tmp_path):
    """transformers' own Qwen3.5 modules, whose sleep blocks are views over its decoder layers, sharded per view."""
    logs = {}
    for name, processes in (("single", None), ("fsdp2", 2)):
        path = recipe(tmp_path, name, processes)
        data = yaml.safe_load(path.read_text())
        data["model"] = {"config": QWEN3_5}
        path.write_text(yaml.safe_dump(data))
        logs[name] = steps(train(path, processes or 1))
    for step, (loss, norm) in logs["single"].items():
        assert logs["fsdp2"][step][0] == pytest.approx(loss, rel=TOLERANCE["loss"], abs=1e-4), step
        assert logs["fsdp2"][step][1] == pytest.approx(norm, rel=TOLERANCE["grad_norm"], abs=1e-3), step
    a, b = weights(tmp_path / "single"), weights(tmp_path / "fsdp2")
    assert a.keys() == b.keys() and any(".linear_attn.in_proj_qkv." in k for k in a)  # transformers' own names
    for key in a:
        torch.testing.assert_close(b[key], a[key], rtol=TOLERANCE["weights"], atol=TOLERANCE["weights"])
