"""Recipes: schema, `base:` inheritance, `--set` overrides, one-line errors (exit 2), and every shipped recipe."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml
from transformers import AutoConfig, AutoModelForCausalLM

from retrofit.cli import main
from retrofit.recipes import RecipeError, load_recipe, resolve, short_key_names
from retrofit.tasks import DATA_TASKS
from tests.helpers import minimal_recipe as minimal

REPO = Path(__file__).resolve().parents[1]
RECIPES = sorted(p for p in (REPO / "recipes").glob("*.yaml"))
TINY = REPO / "recipes" / "rule110-tiny.yaml"

# Shrinks a from-scratch recipe's model so that a dry run is quick on CPU (the paper-size recipes use it).
SMALL_MODEL = [
    "model.config.hidden_size=32",
    "model.config.intermediate_size=64",
    "model.config.num_attention_heads=2",
    "model.config.linear_num_heads=2",
    "model.config.linear_head_dim=16",
]


def write(path: Path, data: dict) -> Path:
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


# ---------------------------------------------------------------------------------------------- loading


def test_base_inheritance_deep_merges_and_lists_replace(tmp_path):
    (tmp_path / "base").mkdir()
    write(tmp_path / "base" / "common.yaml", minimal(optimizer={"muon": {"lr": 0.01, "momentum": 0.9}}))
    child = write(
        tmp_path / "child.yaml",
        {
            "base": "base/common.yaml",
            "optimizer": {"muon": {"lr": 0.02}},
            "task": {"options": {"steps_choices": [4]}},
        },
    )
    recipe = load_recipe(child).recipe
    assert recipe.optimizer.muon.lr == 0.02
    assert recipe.optimizer.muon.momentum == 0.9  # kept from the base
    assert recipe.task.options == {"steps_choices": [4]}  # lists replace
    assert recipe.train.max_steps == 2


def test_set_overrides_are_parsed_as_yaml(tmp_path):
    path = write(tmp_path / "r.yaml", minimal())
    recipe = load_recipe(
        path,
        [
            "train.max_steps=7",
            "optimizer.muon.lr=1e-3",
            "task.options.steps_choices=[1, 2, 4]",
            "sleep.loop_range=[0, 2]",
            "eval.path=null",
            'description="*a\\"b"',  # the quoting that the parse error's hint suggests for *a"b
        ],
    ).recipe
    assert recipe.description == '*a"b'
    assert recipe.train.max_steps == 7
    assert recipe.optimizer.muon.lr == pytest.approx(1e-3)
    assert recipe.task.options["steps_choices"] == [1, 2, 4]
    assert resolve(recipe).sleep.loop_range == (0, 2)


def test_set_overrides_reach_list_items(tmp_path):
    stages = [{"name": "a", "max_steps": 1}, {"name": "b", "max_steps": 1}]
    path = write(tmp_path / "r.yaml", minimal(stages=stages))
    overrides = ["stages[1].max_steps=5", "stages.0.sleep.eviction=sliding", "train.max_steps=6"]
    resolved = resolve(load_recipe(path, overrides).recipe)
    assert [(s.start, s.stop, s.sleep.eviction) for s in resolved.stages] == [(0, 1, "sliding"), (1, 6, "hard")]


def test_error_names_the_base_file_that_set_the_key(tmp_path):
    write(tmp_path / "base.yaml", minimal(train={"max_steps": 2, "batch_size": 4, "warmup": 3}))
    child = write(tmp_path / "child.yaml", {"base": "base.yaml", "output_dir": "x"})
    with pytest.raises(RecipeError) as info:
        load_recipe(child)
    assert info.value.source.endswith("base.yaml")
    assert info.value.key == "train.warmup"


def test_sleep_window_defaults_to_the_task_window(tmp_path):
    data = minimal()
    del data["sleep"]["window"]
    assert resolve(load_recipe(write(tmp_path / "r.yaml", data)).recipe).sleep.window == 24


def test_vocab_size_comes_from_the_task_tokenizer(tmp_path):
    resolved = resolve(load_recipe(write(tmp_path / "r.yaml", minimal())).recipe)
    assert resolved.model_config.vocab_size == len(resolved.task.tokenizer)


# ---------------------------------------------------------------------------------------------- malformed


def _cycle(tmp_path: Path) -> list[str]:
    write(tmp_path / "a.yaml", {"base": "b.yaml", **minimal()})
    write(tmp_path / "b.yaml", {"base": "a.yaml"})
    return [str(tmp_path / "a.yaml")]


DEPO_FROZEN = Path(__file__).resolve().parents[1] / "data" / "depo" / "eval.jsonl"


def _bad_spec(tmp_path: Path) -> Path:
    """A copy of the Depo frozen set whose spec.json names options no Depo task takes."""
    folder = tmp_path / "frozen"
    folder.mkdir()
    (folder / "eval.jsonl").write_text(DEPO_FROZEN.read_text())
    (folder / "spec.json").write_text(json.dumps({"task": "depo", "options": {"max_nodes": 500}}))
    return folder / "eval.jsonl"


def _bad_record(tmp_path: Path) -> Path:
    """A copy of the Depo frozen set whose second record has an edge into node 150 (the nodes are 0..99)."""
    lines = DEPO_FROZEN.read_text().splitlines()
    record = json.loads(lines[1])
    record["edges"][0][1] = 150
    lines[1] = json.dumps(record)
    path = tmp_path / "eval.jsonl"
    path.write_text("\n".join(lines) + "\n")
    return path


def _recipe(tmp_path: Path, data: dict, *overrides: str) -> list[str]:
    return [str(write(tmp_path / "bad.yaml", data)), *(a for o in overrides for a in ("--set", o))]


def _raw(tmp_path: Path, text: str) -> list[str]:
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    return [str(path)]


def _on_ouro(tmp_path: Path, *extra: str, weights: bool = False, **changes) -> list[str]:
    """A minimal recipe on a tiny local Ouro checkpoint (its config, or with `weights` a whole checkpoint)."""
    from tests.training_helpers import RULE110_VOCAB, tiny_ouro_checkpoint

    folder = tmp_path / "ouro"
    if weights:
        tiny_ouro_checkpoint(folder)
    else:
        folder.mkdir()
        (folder / "config.json").write_text(json.dumps(_tiny_ouro() | {"vocab_size": RULE110_VOCAB}))
    data = minimal(**changes)
    data["model"] = {"pretrained": str(folder), **changes.get("model", {})}
    return [*_recipe(tmp_path, data), *extra]


def _stages(*stages: dict, **changes) -> dict:
    return minimal(stages=list(stages), **changes)


MALFORMED = {
    # name: (build argv after `validate`, text the one-line error must contain)
    "unknown key": (lambda t: _recipe(t, minimal(train={"max_step": 5})), "train.max_step: unknown key; did you mean"),
    "wrong type": (lambda t: _recipe(t, minimal(train={"max_steps": "many"})), "train.max_steps"),
    "window <= 0": (lambda t: _recipe(t, minimal(sleep={"window": 0})), "sleep.window"),
    "passes = 0": (lambda t: _recipe(t, minimal(sleep={"passes": 0})), "sleep.passes"),
    "grad_passes inside the wake": (  # it would truncate nothing: the wake's passes keep their gradients
        lambda t: _recipe(t, minimal(sleep={"passes": 4, "wake_passes": 2, "grad_passes": 3})),
        "sleep.grad_passes: 3 is invalid: the first 2 of the 4 passes are the wake's",
    ),
    "loop range out of bounds": (
        lambda t: _recipe(t, minimal(sleep={"loop_range": [0, 9]})),
        "sleep.loop_range: [0, 9] is out of bounds",
    ),
    "unknown task": (lambda t: _recipe(t, minimal(task={"name": "rule111"})), "task.name: unknown task 'rule111'"),
    "loop range not a list": (
        lambda t: _recipe(t, minimal(sleep={"loop_range": 5})),
        "sleep.loop_range: 5 is invalid: it must be [start, stop)",
    ),
    "a section twice": (  # YAML would keep the second silently, dropping passes: 4
        lambda t: _raw(t, "sleep: {passes: 4}\nsleep: {eviction: sliding}\n"),
        "invalid YAML at line 2, column 1: key 'sleep' appears twice in one mapping",
    ),
    "unknown task option": (
        lambda t: _recipe(t, minimal(task={"name": "rule110", "options": {"step": 4}})),
        "task.options: rule110 has no option step; its options are steps, steps_choices",
    ),
    "bad task option": (
        lambda t: _recipe(t, minimal(task={"name": "rule110", "options": {"steps": 0}})),
        "task.options",
    ),
    "missing file": (lambda t: [str(t / "nope.yaml")], "recipe file not found"),
    "missing base": (lambda t: _recipe(t, {"base": "gone.yaml", **minimal()}), "base: file not found"),
    "base cycle": (_cycle, "inheritance cycle"),
    "bad --set path": (lambda t: _recipe(t, minimal(), "train.max_steps.x=1"), "train.max_steps is a value"),
    "unknown --set key": (lambda t: _recipe(t, minimal(), "train.max_stepz=1"), "--set train.max_stepz=1"),
    "--set past the end of a list": (
        lambda t: _recipe(t, _stages({"name": "a", "max_steps": 2}), "stages[3].max_steps=1"),
        "--set stages[3].max_steps=1: stages[3].max_steps: '3' is not an item of this list of 1",
    ),
    "--set without value": (lambda t: _recipe(t, minimal(), "train.max_steps"), "expected --set KEY.PATH=VALUE"),
    "unknown optimizer": (lambda t: _recipe(t, minimal(optimizer={"name": "sgd"})), "optimizer.name"),
    "invalid yaml": (lambda t: _raw(t, "train: [unclosed\n"), "invalid YAML at line"),
    "two model sources": (  # one of them may come from a base recipe: the fix says how to drop it
        lambda t: _recipe(t, minimal(), "model.pretrained=/nowhere"),
        "both model.config and model.pretrained are set (one may come from a base recipe); keep one, e.g. add "
        "model.config: null",
    ),
    "unknown model config key": (
        lambda t: _recipe(t, minimal(model={"config": {"hiden_size": 8}})),
        "model.config.hiden_size: unknown key",
    ),
    "ill-typed model config": (
        lambda t: _recipe(t, minimal(model={"config": {"hidden_size": 8.5}})),
        "model.config.hidden_size",
    ),
    "batch not a multiple of micro batch": (
        lambda t: _recipe(t, minimal(train={"max_steps": 1, "batch_size": 6, "micro_batch_size": 4})),
        "train.batch_size (6) must be a multiple",
    ),
    "missing eval file": (
        lambda t: _recipe(t, minimal(eval={"path": str(t / "gone.jsonl")})),
        "eval.path: no frozen eval set",
    ),
    "frozen eval without the buckets": (
        lambda t: [*_recipe(t, minimal(task={"name": "rule110", "options": {"steps": 3}})), "--dry-run"],
        "eval.source: the frozen eval set has no examples at difficulties [3] of [3]",
    ),
    "frozen eval without one of the buckets": (  # depths 1, 2 are frozen, 3 is not: no silent smaller report
        lambda t: [
            *_recipe(t, minimal(task={"name": "rule110", "options": {"steps_choices": [1, 2, 3]}})),
            "--dry-run",
        ],
        "eval.source: the frozen eval set has no examples at difficulties [3] of [1, 2, 3]",
    ),
    "frozen eval made by another task": (  # a smaller Depo on the paper-size frozen set would measure nothing
        lambda t: [*_recipe(t, minimal(task={"name": "depo", "options": {"max_nodes": 10}})), "--dry-run"],
        "eval.source: the frozen eval set was made by another depo task (max_nodes=10 (frozen set: 75)), so it "
        "would not measure this one; use eval.source: generated",
    ),
    "the shipped frozen set named by its path": (
        lambda t: [
            *_recipe(t, minimal(task={"name": "depo", "options": {"max_nodes": 10}}, eval={"path": str(DEPO_FROZEN)})),
            "--dry-run",
        ],
        "eval.source: the frozen eval set was made by another depo task (max_nodes=10 (frozen set: 75))",
    ),
    "frozen set whose spec makes no task": (
        lambda t: [
            *_recipe(t, minimal(task={"name": "depo", "options": {}}, eval={"path": str(_bad_spec(t))})),
            "--dry-run",
        ],
        "eval.path: the spec.json beside",
    ),
    "frozen set with a node outside the vocabulary": (
        lambda t: _recipe(t, minimal(task={"name": "depo", "options": {}}, eval={"path": str(_bad_record(t))})),
        "eval.jsonl, line 2: edges[0][1] (a node) must be an integer in [0, 99], got 150",
    ),
    "override list with an unquoted star": (
        lambda t: _recipe(t, minimal(), "stages.0.trainable=[*]"),
        """cannot parse the value '[*]' as YAML; quote each string in it, inside the shell's quotes: e.g. '["*"]'""",
    ),
    "override string starting with a star": (
        lambda t: _recipe(t, minimal(), "description=*x"),
        """write it as a quoted YAML string: --set 'description="*x"'""",
    ),
    "override string with a star and a double quote": (
        lambda t: _recipe(t, minimal(), 'description=*a"b'),
        """write it as a quoted YAML string: --set 'description="*a\\"b"'""",
    ),
    "missing section": (
        lambda t: _recipe(t, {k: v for k, v in minimal().items() if k != "train"}),
        "train: required key is missing",
    ),
    "unknown sleep key": (
        lambda t: _recipe(t, minimal(sleep={"evicton": "hard"})),
        "sleep.evicton: unknown key; did you mean 'eviction'?",
    ),
    "stage steps do not add up": (
        lambda t: _recipe(t, _stages({"name": "a", "max_steps": 1}, {"name": "b", "max_steps": 2})),
        "train.max_steps: is 2, but the stages take 1 + 2 = 3 steps; set train.max_steps: 3",
    ),
    "unknown stage key": (
        lambda t: _recipe(t, _stages({"name": "a", "max_steps": 2, "trainables": ["*"]})),
        "bad.yaml: stages[0].trainables: unknown key; did you mean 'trainable'?",
    ),
    "unknown stage sleep key": (
        lambda t: _recipe(t, _stages({"name": "a", "max_steps": 2, "sleep": {"evicton": "hard"}})),
        "bad.yaml: stages[0].sleep.evicton: unknown key; did you mean 'eviction'?",
    ),
    "bad stage sleep value": (
        lambda t: _recipe(
            t, _stages({"name": "a", "max_steps": 1}, {"name": "b", "max_steps": 1, "sleep": {"eviction": "soft"}})
        ),
        "stages[1].sleep.eviction: 'soft' is invalid",
    ),
    "stage loop range out of bounds": (
        lambda t: _recipe(t, _stages({"name": "a", "max_steps": 2, "sleep": {"loop_range": [0, 9]}})),
        "stages[0].sleep.loop_range: [0, 9] is out of bounds",
    ),
    "empty stage trainable": (
        lambda t: _recipe(t, _stages({"name": "a", "max_steps": 2, "trainable": []})),
        "stages[0].trainable: is empty",
    ),
    "repeated stage name": (
        lambda t: _recipe(t, _stages({"name": "a", "max_steps": 1}, {"name": "a", "max_steps": 1})),
        "stages[1].name: 'a' is taken by an earlier stage",
    ),
    "stage pattern matching nothing": (
        lambda t: [*_recipe(t, _stages({"name": "a", "max_steps": 2, "trainable": ["model.mixers.*"]})), "--dry-run"],
        "bad.yaml: stages[0].trainable: pattern 'model.mixers.*' matches no parameter of the model",
    ),
    "config overrides without a checkpoint": (
        lambda t: _recipe(t, minimal(model={"config_overrides": {"hidden_size": 8}})),
        "model.config_overrides: only changes a checkpoint's config",
    ),
    "unknown config override": (
        lambda t: _on_ouro(t, model={"config_overrides": {"jet_mixer_layer": [1]}}),
        "model.config_overrides.jet_mixer_layer: unknown key for OuroConfig",
    ),
    "ill-typed config override": (
        lambda t: _on_ouro(t, model={"config_overrides": {"total_ut_steps": "many"}}),
        "model.config_overrides.total_ut_steps",
    ),
    "invalid config override": (
        lambda t: _on_ouro(t, model={"config_overrides": {"jet_mixer_layers": [9]}}),
        "model.config_overrides.jet_mixer_layers: jet_mixer_layers = [9] must be increasing layer indices in [0, 6)",
    ),
    "sleep config override": (
        lambda t: _on_ouro(t, model={"config_overrides": {"sleep_config": {"passes": 2}}}),
        "model.config_overrides.sleep_config: the sleep schedule is the recipe's sleep: section",
    ),
    "adapter without a checkpoint": (
        lambda t: _recipe(t, minimal(adapter="lora")),
        "adapter: LoRA adapts pretrained weights",
    ),
    "adapter target an op bypasses": (
        lambda t: _on_ouro(t, "--dry-run", weights=True, adapter={"target_modules": ["q_proj", "A_log"]}),
        "adapter.target_modules: LoRA target 'A_log' is a parameter",
    ),
    "stage pattern only the adapter freezes": (
        lambda t: _on_ouro(
            t,
            "--dry-run",
            weights=True,
            adapter="lora",
            stages=[{"name": "a", "max_steps": 2, "trainable": ["*.mlp.*"]}],
        ),
        "stages[0].trainable: pattern '*.mlp.*' matches only parameters the adapter freezes",
    ),
}


@pytest.mark.parametrize("case", sorted(MALFORMED))
def test_malformed_recipe_exits_2_with_one_line(case, tmp_path, capsys):
    build, expected = MALFORMED[case]
    assert main(["validate", *build(tmp_path)]) == 2
    out = capsys.readouterr()
    # A dry run on a checkpoint shows transformers' weight-loading bar before the error; the error is one line.
    line = "\n".join(x for x in out.err.strip().splitlines() if "Loading weights" not in x)
    assert "\n" not in line and "Traceback" not in out.err, out.err
    assert line.startswith("error: ") and expected in line, line


def test_malformed_recipe_in_a_real_process_has_no_traceback(tmp_path):
    argv = _recipe(tmp_path, minimal(sleep={"passes": 0}))
    proc = subprocess.run(
        [sys.executable, "-m", "retrofit", "validate", *argv], capture_output=True, text=True, cwd=REPO
    )
    assert proc.returncode == 2
    assert proc.stderr.count("\n") == 1 and "Traceback" not in proc.stderr
    assert "bad.yaml: sleep.passes" in proc.stderr


# ---------------------------------------------------------------------------------------------- shipped recipes


# Problems of 300-500 tokens in windows of 128 instead of 2000-3300 in 2000: the CPU kernels would take minutes.
SHORT_GSM = [
    "task.options.min_tokens=300",
    "task.options.max_tokens=500",
    "task.options.window=128",
    "sleep.window=128",
]


@dataclass(frozen=True)
class StandIn:
    """A local replacement for a Hub checkpoint: its config.json (as a dict), its tokenizer, a shrink, and `--set`s
    that fit the recipe's `model.config_overrides` to the stand-in."""

    config: Callable[[], dict]
    tokenizer: str | None  # a local tokenizer folder, or None for the task's own local tokenizer
    shrink: dict
    sets: tuple[str, ...] = ()


JET = Path(__file__).resolve().parents[2] / "shared" / "fixtures" / "jet-nemotron"


def _published_jet_2b() -> dict:
    path = JET / "config-2B.json"
    if not path.is_file():
        pytest.skip(f"{path} is absent (the published configs live in ../shared/fixtures)")
    return json.loads(path.read_text())


TINY_MIXERS = {
    "num_heads": 2,
    "head_dim": 8,
    "expand_v": 2,
    "conv_size": 4,
    "dconv_generator_reduction": 4,
    "norm_eps": "1e-5",
}


def _tiny_ouro() -> dict:
    from tests.ouro_checkpoint import tiny_config

    return tiny_config(num_layers=6, total_ut_steps=4) | {"vocab_size": 1024, "jet_mixer_config": TINY_MIXERS}


QWEN3_5_CONFIGS = Path(__file__).resolve().parents[1] / "benchmarks" / "configs"
# The published Qwen3.5 configs, shrunk in width (same 24 layers, 3:1 layout, head sizes and vocabulary).
QWEN3_5_SHRINK = {
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_attention_heads": 4,
    "num_key_value_heads": 1,
    "linear_num_key_heads": 2,
    "linear_num_value_heads": 2,
}


def _published_qwen3_5(size: str) -> Callable[[], dict]:
    return lambda: json.loads((QWEN3_5_CONFIGS / f"qwen3.5-{size}.json").read_text())


PRETRAINED = {
    "jet-ai/Jet-Nemotron-2B": StandIn(
        _published_jet_2b,
        str(JET),
        {
            "hidden_size": 32,
            "intermediate_size": 64,
            "num_attention_heads": 2,
            "num_key_value_heads": 1,
            "head_dim": 16,
            "efficient_attention_config": {
                "jet": {
                    "num_heads": 2,
                    "head_dim": 8,
                    "expand_v": 2,
                    "conv_size": 4,
                    "dconv_generator_reduction": 4,
                    "norm_eps": "1e-5",
                },
                "swa": {"window_size": 64},
            },
        },
    ),
    # No published Ouro config is stored locally: a tiny one of the same layout, with the task's local tokenizer, and
    # mixers that fit its 6 layers.
    # Qwen3.5 Base checkpoints: the published config reconstructed in benchmarks/configs/, read by transformers'
    # own Qwen3.5 classes; the Qwen2 tokenizer fixture stands in for Qwen3.5's (whose vocabulary covers it).
    "Qwen/Qwen3.5-0.8B-Base": StandIn(_published_qwen3_5("0.8b"), str(JET), QWEN3_5_SHRINK),
    "Qwen/Qwen3.5-2B-Base": StandIn(_published_qwen3_5("2b"), str(JET), QWEN3_5_SHRINK),
    "ByteDance/Ouro-1.4B": StandIn(
        _tiny_ouro,
        None,
        {},
        (
            "model.config_overrides.jet_mixer_layers=[1, 3, 5]",
            f"model.config_overrides.jet_mixer_config={json.dumps(TINY_MIXERS)}",
        ),
    ),
}


def stand_in(recipe: Path, tmp_path: Path, *, build: bool) -> list[str]:
    """`--set` overrides that run a recipe offline on CPU in fp32, with a small model in place of a paper-size one.

    A from-scratch hybrid wider than 128 gets `SMALL_MODEL` (with `build`). A Hub checkpoint becomes a local folder
    made from its config (with `build`: shrunk in width, same blocks, so the loop range still applies, and with
    random weights, and GSM-Infinite problems shortened), and a Hub tokenizer its local stand-in.
    """
    recipe_obj = load_recipe(recipe).recipe
    model = recipe_obj.model
    cpu = [] if recipe_obj.train.precision == "auto" else ["train.precision=auto"]
    if model.config is not None:
        wide = model.config.get("model_type", "sleep_hybrid") == "sleep_hybrid" and model.config["hidden_size"] > 128
        return cpu + (SMALL_MODEL if build and wide else [])
    if model.pretrained not in PRETRAINED:
        pytest.skip(f"no local stand-in for {model.pretrained}")
    spec = PRETRAINED[model.pretrained]
    folder = tmp_path / "stand-in"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(spec.config()))
    if build:
        config = AutoConfig.from_pretrained(folder)
        for key, value in spec.shrink.items():
            setattr(config.get_text_config(), key, value)  # an image-text checkpoint shrinks its text stack
        AutoModelForCausalLM.from_config(config).save_pretrained(folder)
    overrides = [*cpu, f"model.pretrained={folder}", *spec.sets]
    tokenizer = recipe_obj.task.options.get("tokenizer")
    if tokenizer == model.pretrained or (tokenizer is None and recipe_obj.task.name in DATA_TASKS):
        overrides.append(f"task.options.tokenizer={spec.tokenizer or 'null'}")
    if build and recipe_obj.task.name == "gsm_infinite":
        overrides += SHORT_GSM
    options = recipe_obj.task.options
    if recipe_obj.task.name == "qa" and not Path(options["path"]).exists():  # a Hub dataset: local records alike
        overrides += [f"task.options.path={_qa_stand_in(tmp_path, options)}", "task.options.eval_split=null"]
    return overrides


def _qa_stand_in(tmp_path: Path, options: dict) -> Path:
    """Records with the fields a `qa` recipe names (a dotted field nested, as SQuAD's `answers.text`)."""

    def nested(field: str, value: object) -> dict:
        head, _, rest = field.partition(".")
        return {head: nested(rest, [value]) if rest else value}

    path = tmp_path / "qa-stand-in.jsonl"
    records = [
        nested(options["context_field"], f"The code of box {i} is {i + 3}.")
        | nested(options["question_field"], f"What is the code of box {i}?")
        | nested(options["answer_field"], str(i + 3))
        for i in range(80)
    ]
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


@pytest.mark.parametrize("recipe", RECIPES, ids=lambda p: p.name)
def test_shipped_recipe_dry_runs(recipe, tmp_path, capsys):
    """Every recipe builds and takes one step; paper-size models are replaced by a small stand-in first."""
    overrides = stand_in(recipe, tmp_path, build=True)
    argv = ["validate", str(recipe), "--dry-run", *(a for s in overrides for a in ("--set", s))]
    assert main(argv) == 0, capsys.readouterr().err
    out = capsys.readouterr().out
    assert "recipe OK" in out
    assert "parameters:" in out and "tokens per step:" in out and "passes per chunk:" in out


@pytest.mark.parametrize("recipe", RECIPES, ids=lambda p: p.name)
def test_shipped_recipe_validates_at_full_size(recipe, tmp_path):
    """Task, sleep and model config of every recipe check out (a Hub checkpoint: its published config if local)."""
    overrides = stand_in(recipe, tmp_path, build=False)
    resolved = resolve(load_recipe(recipe, overrides).recipe)
    if not resolved.task.has_held_out:  # a generator aligns its examples to the window (a data task: to seq_len)
        assert resolved.sleep.window == resolved.task.window


def test_a_shipped_recipe_loads_by_name_and_a_typo_names_the_closest(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # no recipes/ here: the names resolve to the shipped folder
    by_name, by_path = load_recipe("replicate/depo-n4"), load_recipe(REPO / "recipes" / "replicate" / "depo-n4.yaml")
    assert by_name.recipe == by_path.recipe and by_name.recipe.sleep["passes"] == 4
    with pytest.raises(RecipeError, match="did you mean rule110-tiny"):
        load_recipe("rule110-tniy")


def test_recipes_lists_every_shipped_recipe_with_its_description(capsys):
    assert main(["recipes"]) == 0
    rows = [line for line in capsys.readouterr().out.splitlines() if line.startswith("| ") and "---" not in line][1:]
    listed = {row.split(" | ")[0].removeprefix("| ") for row in rows}
    on_disk = {p.relative_to(REPO / "recipes").with_suffix("").as_posix() for p in (REPO / "recipes").rglob("*.yaml")}
    assert listed == {name for name in on_disk if not name.startswith(("base/", "accelerate/"))}
    assert "| replicate/depo-n4 | Depo replication sweep (issue 9), N=4; the rest is depo.yaml's |" in rows


def test_short_key_names_keep_whole_keys_only_where_last_parts_clash():
    keys = ["sleep.passes", "optimizer.muon.lr", "optimizer.adamw.lr", "seed"]
    assert short_key_names(keys) == ["passes", "optimizer.muon.lr", "optimizer.adamw.lr", "seed"]
