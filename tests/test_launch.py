"""Launch modes: recipe validation, filled DeepSpeed configs, the printed `accelerate launch` command, the refused
combinations, and the distributed helpers the trainer calls (`retrofit.training.distributed`), all on CPU."""

from __future__ import annotations

import contextlib
import importlib.util
import json
import shlex
import subprocess
import sys
import weakref
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import yaml
from accelerate import Accelerator
from accelerate.commands.config.config_args import load_config_from_file
from accelerate.commands.launch import _validate_launch_command, launch_command_parser
from accelerate.utils import DistributedType
from transformers import AutoModelForCausalLM

from retrofit.cli import main
from retrofit.evaluation import evaluate, load_eval_set
from retrofit.launch import (
    DEEPSPEED_CONFIG_FILE,
    LAUNCH_MODES,
    RECIPE_KEYS,
    accelerate_config,
    check_launch,
    deepspeed_template,
    fill_deepspeed_config,
    inside_launched_process,
    plan_launch,
)
from retrofit.recipes import RecipeError, load_recipe, resolve
from retrofit.recipes.schema import EvalSection
from retrofit.training import distributed
from retrofit.training.build import build_model, full_numel
from retrofit.training.checkpoint import save_model_files
from retrofit.training.data import micro_batch
from tests.helpers import minimal_recipe

REPO = Path(__file__).resolve().parents[1]


def recipe_file(tmp_path: Path, name: str = "r", **sections) -> Path:
    """A tiny Rule 110 recipe (global batch 16, micro-batch 2, AdamW) with top-level sections replaced."""
    data = (
        minimal_recipe(
            output_dir=str(tmp_path / f"{name}-out"),
            sleep={"window": 24, "passes": 2, "sleep_on": "context_only"},
            optimizer={"name": "adamw"},
            train={"max_steps": 2, "batch_size": 16, "micro_batch_size": 2, "log_with": []},
            eval={"source": "generated", "num_per_difficulty": 2, "batch_size": 4},
        )
        | sections
    )  # the sections given replace whole sections
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def recipe(tmp_path: Path, **sections):
    return load_recipe(recipe_file(tmp_path, **sections)).recipe


def auto_keys(node: dict, prefix: str = "") -> list[str]:
    found = []
    for key, value in node.items():
        if isinstance(value, dict):
            found += auto_keys(value, f"{prefix}{key}.")
        elif value == "auto":
            found.append(prefix + key)
    return found


# ---------------------------------------------------------------------------------------------- the recipe key


@pytest.mark.parametrize("mode", LAUNCH_MODES)
def test_launch_takes_a_mode_or_a_mapping(tmp_path, mode):
    assert recipe(tmp_path, launch=mode).launch.mode == mode
    processes = 1 if mode == "single_gpu" else 4
    section = recipe(tmp_path, launch={"mode": mode, "num_processes": processes}).launch
    assert (section.mode, section.num_processes) == (mode, processes)
    assert recipe(tmp_path).launch is None  # no launch: the run trains in the calling process


# ---------------------------------------------------------------------------------------------- configs


@pytest.mark.parametrize("mode", LAUNCH_MODES)
def test_shipped_accelerate_configs_are_valid_and_match_their_mode(mode):
    config = load_config_from_file(str(accelerate_config(mode)))
    expected = {
        "single_gpu": "NO",
        "multi_gpu": "MULTI_GPU",
        "zero2": "DEEPSPEED",
        "zero3": "DEEPSPEED",
        "fsdp2": "MULTI_GPU",
    }
    expected = expected[mode]  # fsdp2: accelerate starts the processes, the trainer shards
    assert config.distributed_type == DistributedType(expected)
    if mode in ("zero2", "zero3"):
        assert config.mixed_precision is None  # accelerate refuses it next to a DeepSpeed config file
        assert config.deepspeed_config["zero3_init_flag"] is False
        assert REPO / config.deepspeed_config["deepspeed_config_file"] == deepspeed_template(mode)


@pytest.mark.parametrize("mode,stage", [("zero2", 2), ("zero3", 3)])
def test_deepspeed_templates_leave_exactly_the_recipe_keys_auto(mode, stage):
    template = json.loads(deepspeed_template(mode).read_text())
    assert set(auto_keys(template)) == set(RECIPE_KEYS)
    assert template["zero_optimization"]["stage"] == stage
    if stage == 3:
        assert template["zero_optimization"]["stage3_gather_16bit_weights_on_model_save"] is True


@pytest.mark.parametrize("mode", ["zero2", "zero3"])
@pytest.mark.parametrize("processes,accumulation", [(1, 8), (2, 4), (4, 2), (8, 1)])
def test_filled_deepspeed_config_has_no_auto_and_the_batch_arithmetic(tmp_path, mode, processes, accumulation):
    plan = plan_launch(recipe(tmp_path, launch={"mode": mode, "num_processes": processes}), visible_gpus=0)
    config = plan.deepspeed_config
    assert auto_keys(config) == []
    assert config["train_micro_batch_size_per_gpu"] == 2
    assert config["gradient_accumulation_steps"] == accumulation
    assert config["train_batch_size"] == 2 * accumulation * processes == 16
    assert config["gradient_clipping"] == 1.0
    assert config["bf16"] == {"enabled": True}
    assert config["zero_optimization"]["stage"] == int(mode[-1])


@pytest.mark.parametrize("processes", [1, 2, 4])
def test_without_a_micro_batch_size_the_global_batch_is_split_over_the_processes(tmp_path, processes):
    train = {"max_steps": 2, "batch_size": 16, "log_with": []}
    plan = plan_launch(recipe(tmp_path, train=train, launch={"mode": "zero2", "num_processes": processes}), 0)
    config = plan.deepspeed_config
    assert config["train_micro_batch_size_per_gpu"] * processes == 16
    assert config["gradient_accumulation_steps"] == 1 and config["train_batch_size"] == 16
    assert plan.num_processes == processes
    assert plan.deepspeed_path == tmp_path / "r-out" / DEEPSPEED_CONFIG_FILE


def test_precision_and_clipping_reach_the_deepspeed_config(tmp_path):
    r = recipe(
        tmp_path,
        launch={"mode": "zero2", "num_processes": 2},
        train={"max_steps": 2, "batch_size": 16, "micro_batch_size": 2, "precision": "fp32"},
        optimizer={"name": "adamw", "grad_clip": None},
    )
    config = plan_launch(r, visible_gpus=2).deepspeed_config
    assert config["bf16"] == {"enabled": False}
    assert config["gradient_clipping"] == 0.0  # DeepSpeed's "off"


@pytest.mark.parametrize(
    "config,key,text",
    [
        ({"train_micro_batch_size_per_gpu": 4}, "train.micro_batch_size", "sets 4"),
        ({"gradient_clipping": 0.5}, "optimizer.grad_clip", "gradient_clipping = 1.0"),
        ({"zero_optimization": {"reduce_bucket_size": "auto"}}, "launch", "zero_optimization.reduce_bucket_size"),
    ],
)
def test_a_deepspeed_config_that_contradicts_the_recipe_is_refused(tmp_path, config, key, text):
    values = {"train_micro_batch_size_per_gpu": 2, "gradient_clipping": 1.0}
    with pytest.raises(RecipeError) as info:
        fill_deepspeed_config(config, values, "ds.json")
    assert info.value.key == key and text in info.value.message


def test_filling_keeps_given_values_and_adds_missing_ones():
    filled = fill_deepspeed_config({"zero_optimization": {"stage": 2}}, {"bf16.enabled": True}, "ds.json")
    assert filled == {"zero_optimization": {"stage": 2}, "bf16": {"enabled": True}}


# ---------------------------------------------------------------------------------------------- the command


@pytest.mark.parametrize("mode", LAUNCH_MODES)
def test_print_launch_prints_the_command_and_writes_the_filled_config(tmp_path, capsys, mode):
    processes = 1 if mode == "single_gpu" else 2
    path = recipe_file(tmp_path, launch={"mode": mode, "num_processes": processes})
    assert main(["train", str(path), "--set", "seed=3", "--print-launch"]) == 0
    command = shlex.split(capsys.readouterr().out.strip())
    written = tmp_path / "r-out" / DEEPSPEED_CONFIG_FILE
    expected = [command[0], "launch", "--config_file", str(accelerate_config(mode))]
    if mode in ("zero2", "zero3"):
        expected += ["--deepspeed_config_file", str(written)]
        assert auto_keys(json.loads(written.read_text())) == []
    else:
        assert not written.exists()
    expected += ["--num_processes", str(processes), "-m", "retrofit", "train", str(path), "--set", "seed=3"]
    assert command == expected
    assert Path(command[0]).name == "accelerate"
    assert not (tmp_path / "r-out" / "checkpoints").exists()  # printed, not run


@pytest.mark.parametrize("mode", LAUNCH_MODES)
def test_accelerate_parses_the_printed_command(tmp_path, capsys, mode):
    processes = 1 if mode == "single_gpu" else 2
    path = recipe_file(tmp_path, launch={"mode": mode, "num_processes": processes})
    assert main(["train", str(path), "--resume", "auto", "--print-launch"]) == 0
    command = shlex.split(capsys.readouterr().out.strip())
    args, _, mixed_precision_from_config = _validate_launch_command(launch_command_parser().parse_args(command[2:]))
    assert args.num_processes == processes
    assert args.use_deepspeed == (mode in ("zero2", "zero3"))
    assert args.multi_gpu == (mode in ("multi_gpu", "fsdp2"))
    assert args.module and args.training_script == "retrofit"
    assert args.training_script_args == ["train", str(path), "--resume", "auto"]
    if args.use_deepspeed:
        assert args.deepspeed_config_file == str(tmp_path / "r-out" / DEEPSPEED_CONFIG_FILE)
        assert not mixed_precision_from_config  # else accelerate refuses the DeepSpeed config file


def test_processes_default_to_the_visible_gpus(tmp_path):
    assert plan_launch(recipe(tmp_path, launch="zero2"), visible_gpus=8).num_processes == 8
    assert plan_launch(recipe(tmp_path, launch="single_gpu"), visible_gpus=8).num_processes == 1


def test_launched_processes_train_instead_of_launching_again():
    assert not inside_launched_process({"PATH": "/usr/bin"})
    assert inside_launched_process({"ACCELERATE_MIXED_PRECISION": "bf16"})  # every accelerate launcher sets it
    assert inside_launched_process({"LOCAL_RANK": "0", "WORLD_SIZE": "2"})  # torchrun, deepspeed


def test_single_gpu_launch_runs_accelerate_and_the_launched_process_trains(tmp_path, monkeypatch):
    for name in ("ACCELERATE_MIXED_PRECISION", "LOCAL_RANK", "WORLD_SIZE"):
        monkeypatch.delenv(name, raising=False)
    path = recipe_file(tmp_path, launch="single_gpu", train={"max_steps": 1, "batch_size": 4, "log_with": []})
    proc = subprocess.run(
        [sys.executable, "-m", "retrofit", "train", str(path), "--set", "eval.num_per_difficulty=1"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    first = proc.stdout.splitlines()[0]
    assert " launch --config_file " in first and first.endswith(
        f"-m retrofit train {path} --set eval.num_per_difficulty=1"
    )
    assert json.loads((tmp_path / "r-out" / "results.json").read_text())["step"] == 1


# ---------------------------------------------------------------------------------------------- refused


REFUSED = {
    # name: (recipe sections, --set overrides, key the one-line error names, text it contains)
    "unknown mode": ({}, ["launch=zero4"], "launch.mode", "'single_gpu', 'multi_gpu', 'zero2', 'zero3' or 'fsdp2'"),
    "unknown key": ({}, ["launch={mode: zero3, num_process: 2}"], "launch.num_process", "did you mean"),
    "one gpu, two processes": (
        {},
        ["launch={mode: single_gpu, num_processes: 2}"],
        "launch.num_processes",
        "single_gpu runs one process",
    ),
    "muon under zero3": ({}, ["launch=zero3", "optimizer.name=muon"], "optimizer.name", "launch: zero3"),
    "muon under zero2": ({}, ["launch=zero2", "optimizer.name=muon"], "optimizer.name", "launch: multi_gpu"),
    "muon under fsdp2": ({}, ["launch=fsdp2", "optimizer.name=muon"], "optimizer.name", "sharded weights"),
    "stages training different parameters under zero3": (
        {
            "stages": [
                {"name": "mixers", "max_steps": 1, "trainable": ["model.layers.1.*"]},
                {"name": "all", "max_steps": 1},
            ]
        },
        ["launch=zero3"],
        "stages[1].trainable",
        "differs from stage 'mixers'",
    ),
    "global batch not split by the processes": (
        {},
        ["launch={mode: zero2, num_processes: 3}"],
        "train.batch_size",
        "micro_batch_size x processes = 2 x 3",
    ),
}


@pytest.mark.parametrize("name", REFUSED)
def test_bad_modes_and_combinations_are_refused_naming_the_key(tmp_path, capsys, name):
    sections, overrides, key, text = REFUSED[name]
    path = recipe_file(tmp_path, **sections)
    argv = [x for o in overrides for x in ("--set", o)]
    assert main(["train", str(path), *argv, "--print-launch"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f": {key}: " in err and text in err, err
    assert not (tmp_path / "r-out").exists()  # nothing written, nothing launched


@pytest.mark.parametrize("name", ["muon under zero3", "muon under fsdp2", "global batch not split by the processes"])
def test_validate_refuses_the_same_combinations(tmp_path, capsys, name):
    sections, overrides, key, _ = REFUSED[name]
    argv = [x for o in overrides for x in ("--set", o)]
    assert main(["validate", str(recipe_file(tmp_path, **sections)), *argv]) == 2
    assert f": {key}: " in capsys.readouterr().err


def test_without_gpus_a_multi_gpu_launch_must_name_its_processes(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 0)
    assert main(["train", str(recipe_file(tmp_path, launch="multi_gpu")), "--print-launch"]) == 2
    assert ": launch.num_processes: no GPU is visible here" in capsys.readouterr().err


def test_without_gpus_several_processes_are_refused_before_launching(tmp_path, capsys, monkeypatch):
    """accelerate's launcher would start them as unconnected runs racing on one output_dir."""
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 0)
    monkeypatch.setattr(subprocess, "run", lambda *a, **k: pytest.fail("launched without GPUs"))
    for name in ("ACCELERATE_MIXED_PRECISION", "LOCAL_RANK", "WORLD_SIZE"):
        monkeypatch.delenv(name, raising=False)
    path = recipe_file(tmp_path, launch={"mode": "fsdp2", "num_processes": 2})
    assert main(["train", str(path)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and ": launch.num_processes: 2 processes on a machine without a visible GPU" in err
    assert f"torchrun --nproc_per_node 2 -m retrofit train {path}" in err
    assert main(["train", str(path), "--print-launch"]) == 0  # the command can still be printed for another machine


def test_a_zero_launch_without_deepspeed_stops_before_running_anything(tmp_path, capsys, monkeypatch):
    find_spec = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "deepspeed" else find_spec(name, *a)
    )
    monkeypatch.setattr(subprocess, "run", lambda *a, **k: pytest.fail("launched without DeepSpeed"))
    for name in ("ACCELERATE_MIXED_PRECISION", "LOCAL_RANK", "WORLD_SIZE"):
        monkeypatch.delenv(name, raising=False)
    path = recipe_file(tmp_path, launch={"mode": "zero3", "num_processes": 2})
    assert main(["train", str(path)]) == 2
    assert ": launch: zero3 needs DeepSpeed, which is not installed here" in capsys.readouterr().err


def test_print_launch_needs_a_launch_mode(tmp_path, capsys):
    assert main(["train", str(recipe_file(tmp_path)), "--print-launch"]) == 2
    assert ": launch: is not set; add launch: MODE" in capsys.readouterr().err


@pytest.mark.parametrize(
    "mode,sections",
    [
        ("multi_gpu", {"optimizer": {"name": "muon"}, "sleep": {"window": 24, "checkpointing": "chunk"}}),
        ("zero3", {"sleep": {"window": 24, "checkpointing": "chunk"}}),
        ("zero3", {"stages": [{"name": "a", "max_steps": 1}, {"name": "b", "max_steps": 1}]}),
        *((mode, {"sleep": {"window": 24, "checkpointing": "pass"}}) for mode in ("multi_gpu", "zero2", "fsdp2")),
        ("zero3", {"stages": [{"name": "a", "max_steps": 1, "sleep": {"checkpointing": "pass"}}]}),
    ],
)
def test_supported_combinations_pass(tmp_path, mode, sections):
    check_launch(recipe(tmp_path, launch=mode, **sections))


# ---------------------------------------------------------------------------------------------- distributed.py


def fake_accelerator(stage: int | None, processes: int = 2, **attributes) -> SimpleNamespace:
    """An accelerator as the helpers see it under DeepSpeed (`stage`) or DDP (`None`), without processes."""
    state = SimpleNamespace(deepspeed_plugin=SimpleNamespace(zero_stage=stage, deepspeed_config={}))
    kind = DistributedType.DEEPSPEED if stage is not None else DistributedType.MULTI_GPU
    return SimpleNamespace(
        distributed_type=kind,
        state=state,
        num_processes=processes,
        gradient_accumulation_steps=1,
        device=torch.device("cpu"),
        is_main_process=True,
        autocast=contextlib.nullcontext,
        **attributes,
    )


def test_configure_distributed_fills_the_deepspeed_config_in_place(tmp_path):
    accelerator = fake_accelerator(3)
    config = accelerator.state.deepspeed_plugin.deepspeed_config
    config.update(json.loads(deepspeed_template("zero3").read_text()))
    distributed.configure_distributed(accelerator, recipe(tmp_path))  # a plain `accelerate launch`: no launch:
    assert auto_keys(config) == []
    assert (config["train_batch_size"], config["gradient_accumulation_steps"]) == (16, 4)
    assert accelerator.gradient_accumulation_steps == 4


@pytest.mark.parametrize(
    "stage,sections,key,text",
    [
        (3, {"optimizer": {"name": "muon"}}, "optimizer.name", "this process runs under zero3"),
        (2, {"launch": "zero3"}, "launch", "asks for zero3, but this process was started as zero2"),
        (None, {"launch": "zero2"}, "launch", "started as multi_gpu"),
    ],
)
def test_configure_distributed_refuses_what_the_running_launch_cannot_do(tmp_path, stage, sections, key, text):
    with pytest.raises(RecipeError) as info:
        distributed.configure_distributed(fake_accelerator(stage), recipe(tmp_path, **sections))
    assert info.value.key == key and text in info.value.message


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A tiny Rule 110 model (fp32, CPU) and a batch of 4 examples."""
    resolved = resolve(recipe(tmp_path_factory.mktemp("tiny")))
    torch.manual_seed(0)
    model = build_model(resolved)
    batch = micro_batch(resolved.task, 0, 0, range(4), resolved.task.tokenizer.pad_token_id, 4)
    return model, batch, resolved


def test_micro_steps_accumulate_the_mean_gradient_of_the_whole_batch(tiny):
    model, batch, _ = tiny
    model.zero_grad()
    model(**batch).loss.backward()
    whole = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    accelerator = Accelerator()
    halves = [{k: v[i : i + 2] for k, v in batch.items()} for i in (0, 2)]
    losses = [distributed.micro_step(accelerator, model, h, micro=i, accum=2) for i, h in enumerate(halves)]
    assert torch.allclose(sum(losses), model(**batch).loss, atol=1e-6)  # Rule 110: 4 labels per example
    for p, g in zip(model.parameters(), whole, strict=True):
        assert torch.allclose(p.grad, g, atol=1e-6)
    model.zero_grad()


def test_under_deepspeed_a_micro_step_passes_the_whole_loss_and_marks_the_boundary(tiny):
    model, batch, _ = tiny
    seen = []
    accelerator = fake_accelerator(2)
    accelerator.backward = lambda loss: seen.append((loss.item(), accelerator.sync_gradients))
    with torch.no_grad():
        full = model(**batch).loss.item()
        out = [distributed.micro_step(accelerator, model, batch, micro=i, accum=3).item() for i in range(3)]
    assert seen == [(pytest.approx(full), False), (pytest.approx(full), False), (pytest.approx(full), True)]
    assert out == [pytest.approx(full / 3)] * 3  # DeepSpeed divides by its accumulation steps itself


def test_zero3_pads_every_process_to_the_longest_batch_without_changing_the_loss(tiny):
    model, batch, resolved = tiny
    length = batch["input_ids"].shape[1]
    calls = []

    def gather(t):
        calls.append(t)
        return torch.cat([t, torch.tensor([length + 30])]) if len(calls) == 1 else torch.cat([t, t])

    accelerator = fake_accelerator(3, gather=gather)
    aligned = distributed.align_sleep_plan(accelerator, model, batch, resolved.sleep.window, 0)
    assert aligned["input_ids"].shape[1] == length + 30
    assert aligned["attention_mask"][:, length:].sum() == 0 and (aligned["labels"][:, length:] == -100).all()
    with torch.no_grad():
        assert torch.allclose(model(**aligned).loss, model(**batch).loss, atol=1e-6)


def test_zero3_refuses_a_batch_whose_sleep_plan_differs_between_processes(tiny):
    model, batch, resolved = tiny
    plan = distributed.chunks_with_loss(batch, resolved.sleep.window)
    assert plan.tolist() == [0, 0, 0, 0, 2]  # Rule 110: 4 strings of context, every row's answers in the last chunk
    length = torch.tensor([batch["input_ids"].shape[1]])
    answers = iter([length, 2 - plan])  # the other process: same length, the other chunks supervised
    accelerator = fake_accelerator(3, gather=lambda t: torch.cat([t, next(answers).reshape(t.shape)]))
    with pytest.raises(RecipeError) as info:
        distributed.align_sleep_plan(accelerator, model, batch, resolved.sleep.window, 0)
    assert info.value.key == "launch" and "process 1: [2, 2, 2, 2, 0]" in info.value.message


def test_outside_zero3_batches_are_left_alone(tiny):
    model, batch, resolved = tiny
    for accelerator in (fake_accelerator(2), fake_accelerator(None), Accelerator()):
        assert distributed.align_sleep_plan(accelerator, model, batch, resolved.sleep.window, 0) is batch


def test_leaf_modules_are_the_block_classes(tiny):
    model, _, _ = tiny
    assert distributed.sleep_block_class_names(model) == ["retrofit.layers.decoder.DecoderLayer"]


class FakeZero3View:
    """What transformers consults (through a weak reference) to decide whether to build a model inside zero.Init."""

    def is_zero3(self) -> bool:
        return True


@pytest.mark.parametrize("stage", [3, 2, None])
def test_under_zero3_models_are_built_whole_and_transformers_sees_zero3_again_after(monkeypatch, stage):
    from transformers.integrations import deepspeed as hf_deepspeed

    view = FakeZero3View()  # kept alive: transformers holds it weakly, as it holds accelerate's

    def install() -> None:
        monkeypatch.setattr(hf_deepspeed, "_hf_deepspeed_config_weak_ref", weakref.ref(view))

    install()
    accelerator = fake_accelerator(stage)
    accelerator.state.deepspeed_plugin.set_deepspeed_weakref = install
    with distributed.whole_model_init(accelerator):
        inside = hf_deepspeed.is_deepspeed_zero3_enabled()
    assert inside is (stage != 3)  # only ZeRO-3 changes how models are built
    assert hf_deepspeed.is_deepspeed_zero3_enabled()


def test_under_deepspeed_every_process_gathers_and_only_the_main_one_keeps_the_weights():
    calls = []
    weights = {"w": torch.ones(2)}
    main = fake_accelerator(3, get_state_dict=lambda m: calls.append(m) or weights)
    other = fake_accelerator(3, get_state_dict=lambda m: calls.append(m) or weights)
    other.is_main_process = False
    assert distributed.gather_state_dict(main, "model") is weights
    assert distributed.gather_state_dict(other, "model") is None
    assert calls == ["model", "model"]  # the gather is a collective: the other process must join it too


def test_without_deepspeed_the_model_saves_its_own_weights_and_loads_back(tiny, tmp_path):
    model, batch, _ = tiny
    accelerator = Accelerator()
    prepared = accelerator.prepare(model)
    state_dict = distributed.gather_state_dict(accelerator, prepared)
    assert state_dict is None  # nothing to gather: the unwrapped model's weights are whole
    save_model_files(accelerator.unwrap_model(prepared), tmp_path / "model", None, state_dict)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "model")
    with torch.no_grad():
        assert torch.equal(loaded(**batch).loss, model(**batch).loss)


# ---------------------------------------------------------------------------------------------- the 2-GPU bench


def test_benchmark_dry_run_writes_valid_recipes_configs_and_commands(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "benchmarks.distributed", "--dry-run", "--out", str(tmp_path)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    plan = {entry["run"]: entry for entry in json.loads((tmp_path / "plan.json").read_text())}
    for model in ("tiny", "2b"):
        for mode in LAUNCH_MODES:
            assert f"{model}/{mode}" in plan
    assert {"tiny/zero3_resume", "tiny/zero3_frozen", "tiny/zero3_leaf"} <= set(plan)
    assert (
        plan["tiny/single_gpu"]["env"]["CUDA_VISIBLE_DEVICES"] != plan["2b/single_gpu"]["env"]["CUDA_VISIBLE_DEVICES"]
    )
    batches = {}
    for name, entry in plan.items():
        command = shlex.split(entry["command"])
        assert command[1:3] == ["launch", "--config_file"] and "benchmarks.distributed_worker" in command
        folder = tmp_path / "runs" / name.replace("/", "-")
        loaded = load_recipe(folder / "recipe.yaml").recipe
        check_launch(loaded)
        mode = loaded.launch.mode
        one_process = mode == "single_gpu" or name.endswith("_1gpu")
        assert command[command.index("--num_processes") + 1] == str(1 if one_process else 2)
        batch = (loaded.train.batch_size, loaded.train.micro_batch_size)
        batches.setdefault(name.split("/")[0], set()).add(batch)
        if mode in ("zero2", "zero3"):
            config = json.loads((folder / "out" / DEEPSPEED_CONFIG_FILE).read_text())
            assert auto_keys(config) == [] and config["train_batch_size"] == loaded.train.batch_size
            if mode == "zero3" and name.startswith("tiny/"):  # every tiny weight sharded, none kept whole
                threshold = config["zero_optimization"]["stage3_param_persistence_threshold"]
                assert min(p.numel() for p in build_model(resolve(loaded)).parameters()) > threshold
    # the same global batch in every mode, split into micro-batches of one size (the same bf16 roundings)
    assert all(len(sizes) == 1 for sizes in batches.values())
    leaf = json.loads((tmp_path / "runs" / "tiny-zero3_leaf" / "out" / DEEPSPEED_CONFIG_FILE).read_text())
    assert leaf["zero_optimization"]["leaf_module"] == {"classes": ["retrofit.layers.decoder.DecoderLayer"]}
    assert "--resume" in plan["tiny/zero3_resume"]["command"]


def test_under_zero3_every_process_evaluates_the_whole_set_and_skips_the_reduction(tiny):
    model, _, resolved = tiny
    dataset = load_eval_set(EvalSection(source="generated", num_per_difficulty=3), resolved.eval_task)

    def refuse(*args, **kwargs):
        raise AssertionError("a ZeRO-3 evaluation must not reduce: every process already counted every example")

    counts = {}
    for stage, reduce in ((3, refuse), (None, lambda sums, reduction: sums)):
        accelerator = fake_accelerator(stage, process_index=1, reduce=reduce)
        result = evaluate(model, dataset, task=resolved.eval_task, step=0, batch_size=4, accelerator=accelerator)
        counts[stage] = sum(bucket.examples for bucket in result.buckets)
    assert counts == {3: len(dataset), None: len(dataset) // 2}  # DDP: process 1 of 2 takes every other example


def test_sizes_are_counted_from_zero3_shards_too():
    shard = torch.nn.Parameter(torch.empty(0))
    shard.ds_numel = 12  # what DeepSpeed ZeRO-3 records on a partitioned parameter
    assert full_numel(shard) == 12 and full_numel(torch.nn.Parameter(torch.ones(3, 4))) == 12
