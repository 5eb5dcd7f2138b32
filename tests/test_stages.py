"""Staged training: the stage of a step, exact freezing by pattern, per-stage sleep, and resume inside a stage."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
from accelerate.utils import set_seed
from safetensors.torch import load_file
from transformers import AutoConfig

from retrofit import SleepConfig
from retrofit.cli import main
from retrofit.recipes import RecipeError, ResolvedStage, load_recipe, resolve
from retrofit.training.build import build_model
from retrofit.training.stages import apply_trainable, check_trainable, stage_at, trainable_names
from tests.helpers import tiny_hybrid
from tests.training_helpers import ouro_recipe, tiny_ouro_checkpoint

MIXER = "model.jet_mixers."  # where every inserted parameter lives, written out independently of the patterns
STAGES = [
    {"name": "mixer-warmup", "max_steps": 2, "trainable": ["model.jet_mixers.*"], "sleep": {"eviction": "hard"}},
    {"name": "full", "max_steps": 3, "trainable": ["*"]},
]


def _stage(name: str, start: int, stop: int, *trainable: str) -> ResolvedStage:
    return ResolvedStage(name, start, stop, trainable, SleepConfig(window=4))


# ---------------------------------------------------------------------------------------------- pure helpers


def test_stage_at_follows_the_step_and_stays_in_the_last_stage_at_the_end():
    stages = (_stage("a", 0, 2, "*"), _stage("b", 2, 5, "*"))
    assert [stage_at(stages, step).name for step in range(6)] == ["a", "a", "b", "b", "b", "b"]


def test_apply_trainable_sets_requires_grad_exactly_by_pattern():
    model = tiny_hybrid()
    names = [n for n, _ in model.named_parameters()]
    trained = apply_trainable(model, ["model.layers.1.*", "lm_head.weight"])
    expected = [n for n in names if n.startswith("model.layers.1.") or n == "lm_head.weight"]
    assert trained == expected and len(expected) > 2
    assert {n for n, p in model.named_parameters() if p.requires_grad} == set(expected)
    # Candidates restrict the choice (an adapter's trainable set); everything else is frozen.
    assert apply_trainable(model, ["*"], candidates={"lm_head.weight"}) == ["lm_head.weight"]
    assert [n for n, p in model.named_parameters() if p.requires_grad] == ["lm_head.weight"]
    assert len(apply_trainable(model, ["*"])) == len(names)


def test_a_pattern_that_matches_no_parameter_names_its_stage():
    model = tiny_hybrid()
    stages = (_stage("a", 0, 1, "*"), _stage("b", 1, 2, "model.layers.*", "model.mixers.*"))
    with pytest.raises(RecipeError) as info:
        check_trainable(model, stages, trainable_names(model))
    assert info.value.key == "stages[1].trainable" and "'model.mixers.*' matches no parameter" in info.value.message


def test_with_an_adapter_a_stage_chooses_among_the_adapters_parameters(tmp_path):
    recipe = ouro_recipe(tmp_path, "r", tiny_ouro_checkpoint(tmp_path / "ouro"), adapter={"r": 2})
    model = build_model(resolve(load_recipe(recipe).recipe))
    candidates = trainable_names(model)
    mixers = apply_trainable(model, ["model.jet_mixers.*"], candidates)
    assert mixers and all(n.startswith(MIXER) and ".modules_to_save." in n for n in mixers)
    trained = {n for n, p in model.get_base_model().named_parameters() if p.requires_grad}
    assert trained == set(mixers)  # LoRA weights, the frozen originals and the base are all frozen now
    assert set(apply_trainable(model, ["*"], candidates)) == set(candidates) > set(mixers)
    assert any("lora_A" in n for n in candidates) and not any(".original_module." in n for n in candidates)


# ---------------------------------------------------------------------------------------------- recipes


def test_stage_sleep_merges_over_the_top_level_sleep(tmp_path):
    resolved = resolve(
        load_recipe(ouro_recipe(tmp_path, "r", tiny_ouro_checkpoint(tmp_path / "ouro"), stages=STAGES)).recipe
    )
    first, second = resolved.stages
    assert (first.start, first.stop, second.start, second.stop) == (0, 2, 2, 5)
    assert first.sleep == resolved.sleep.replace(eviction="hard")
    assert second.sleep == resolved.sleep and resolved.sleep.eviction == "sliding"


def test_config_overrides_choose_where_the_mixers_go_and_keep_the_base_weights(tmp_path):
    checkpoint = tiny_ouro_checkpoint(tmp_path / "ouro")
    recipe = ouro_recipe(
        tmp_path, "r", checkpoint, model={"config_overrides": {"jet_mixer_layers": [0, 2], "total_ut_steps": 3}}
    )
    model = build_model(resolve(load_recipe(recipe).recipe))
    assert sorted(model.model.jet_mixers) == ["0", "2"] and model.config.total_ut_steps == 3
    published = load_file(checkpoint / "model.safetensors")
    state = model.state_dict()
    assert all(torch.equal(state[k], v.float()) for k, v in published.items())  # loaded in float32, unchanged
    assert AutoConfig.from_pretrained(checkpoint).jet_mixer_layers is None  # the checkpoint itself is untouched


# ---------------------------------------------------------------------------------------------- a staged run


@pytest.fixture(scope="module")
def staged_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, torch.Tensor], Path]:
    """A 2 + 3 step run (mixers with hard eviction, then everything with sliding eviction), a checkpoint per step,
    with the initial weights and the recipe."""
    tmp_path = tmp_path_factory.mktemp("staged")
    recipe = ouro_recipe(tmp_path, "whole", tiny_ouro_checkpoint(tmp_path / "ouro"), stages=STAGES)
    set_seed(0)
    initial = {k: v.clone() for k, v in build_model(resolve(load_recipe(recipe).recipe)).state_dict().items()}
    assert main(["train", str(recipe)]) == 0
    return tmp_path / "whole", initial, recipe


def _weights(run: Path, step: int) -> dict[str, torch.Tensor]:
    return load_file(run / "checkpoints" / f"step_{step:06d}" / "model" / "model.safetensors")


def test_stage_one_trains_only_the_mixers_and_stage_two_everything(staged_run):
    run, initial, _ = staged_run
    after_one, after_two = _weights(run, 2), _weights(run, 5)
    assert after_one.keys() == initial.keys()
    mixers = [k for k in initial if k.startswith(MIXER)]
    base = [k for k in initial if not k.startswith(MIXER)]
    assert mixers and base
    assert all(torch.equal(after_one[k], initial[k]) for k in base), "stage 1 changed a frozen base weight"
    assert all(not torch.equal(after_one[k], initial[k]) for k in mixers if k.endswith("o_proj.weight"))
    changed = [k for k in base if not torch.equal(after_two[k], after_one[k])]
    assert {"model.embed_tokens.weight", "lm_head.weight", "model.layers.0.self_attn.q_proj.weight"} <= set(changed)
    assert all(not torch.equal(after_two[k], after_one[k]) for k in mixers if k.endswith("o_proj.weight"))


def test_each_stage_runs_with_its_sleep_config(staged_run):
    run, _, _ = staged_run
    evictions = [
        AutoConfig.from_pretrained(run / "checkpoints" / f"step_{s:06d}" / "model").sleep_config["eviction"]
        for s in (1, 2, 3, 5)
    ]
    assert evictions == ["hard", "hard", "sliding", "sliding"]
    assert AutoConfig.from_pretrained(run / "model").sleep_config["eviction"] == "sliding"


def test_resume_inside_stage_two_equals_the_uninterrupted_run(staged_run, tmp_path, capsys):
    run, _, recipe = staged_run
    resumed = tmp_path / "resumed"
    shutil.copytree(run / "checkpoints" / "step_000003", resumed / "checkpoints" / "step_000003")
    assert main(["train", str(recipe), "--set", f"output_dir={resumed}", "--resume", "auto"]) == 0
    out = capsys.readouterr().out
    assert "stage 2/2 full: steps 3-5" in out and "mixer-warmup" not in out
    a, b = load_file(run / "model" / "model.safetensors"), load_file(resumed / "model" / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
