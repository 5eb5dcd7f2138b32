"""LoRA on sleeping models: the adapter trains, saves, loads and merges; bypassed targets are refused by name."""

from __future__ import annotations

import copy
import json
import shutil
from pathlib import Path

import pytest
import torch
from peft import PeftModel
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

import retrofit
from retrofit import SleepConfig, apply_sleep
from retrofit.cli import main
from retrofit.lora import LoraTargetError, apply_lora, load_adapter, save_adapter
from retrofit.recipes.schema import AdapterSection
from retrofit.training import trainer
from retrofit.training.build import build_model
from tests.helpers import random_batch, tiny_hybrid
from tests.jet_checkpoint import write_official_checkpoint as write_jet
from tests.ouro_checkpoint import write_official_checkpoint as write_ouro
from tests.training_helpers import ouro_recipe, tiny_ouro_checkpoint

SLEEP = SleepConfig(window=4, passes=2, eviction="sliding")
JET_TARGETS = ["q_proj", "k_proj", "v_proj", "a_proj", "b_proj", "g_proj", "o_proj", "kernel_generator.w1"]


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def jet_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny Jet-Nemotron base checkpoint (no sleep config: the adapter folder carries it)."""
    assert retrofit.__version__
    directory = tmp_path_factory.mktemp("jet")
    write_jet(directory)
    return directory


def _jet(jet_dir: Path) -> torch.nn.Module:
    return apply_sleep(AutoModelForCausalLM.from_pretrained(jet_dir, dtype=torch.float64), SLEEP)


def _train_step(model: torch.nn.Module, seed: int = 1) -> None:
    ids, labels = random_batch(2, 10, 37, seed=seed)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    model(input_ids=ids, labels=labels).loss.backward()
    optimizer.step()
    optimizer.zero_grad()


def _logits(model: torch.nn.Module) -> torch.Tensor:
    ids, _ = random_batch(2, 11, 37, seed=9)
    with torch.no_grad():
        return model(input_ids=ids).logits


@pytest.fixture(scope="module")
def trained_jet(jet_dir: Path) -> PeftModel:
    """A LoRA on every JetBlock and attention projection (and the conv-kernel generator) after one training step."""
    model = apply_lora(_jet(jet_dir), AdapterSection(r=4, target_modules=JET_TARGETS))
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    _train_step(model)
    changed = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    assert changed and all("lora_" in n for n in changed)  # only the adapter trains
    assert any("self_attn.a_proj.lora_B" in n for n in changed)  # JetBlock projections
    assert any("kernel_generator.w1.lora_B" in n for n in changed)  # read as a module output: it trains
    return model.eval()


def test_default_targets_cover_jetblock_and_attention_projections(jet_dir):
    model = apply_lora(_jet(jet_dir))
    wrapped = {n.removesuffix(".base_layer") for n, m in model.named_modules() if n.endswith(".base_layer")}
    assert any(n.endswith("layers.0.self_attn.g_proj") for n in wrapped)  # a jet layer
    assert any(n.endswith("layers.1.self_attn.q_proj") for n in wrapped)  # an attention layer
    assert _logits(model).shape == (2, 11, 37)


def test_adapter_saves_loads_and_merges_to_the_same_model(trained_jet, jet_dir, tmp_path):
    reference = _logits(trained_jet)
    save_adapter(trained_jet, tmp_path / "adapter")
    assert (tmp_path / "adapter" / "adapter_model.safetensors").is_file()

    base = AutoModelForCausalLM.from_pretrained(jet_dir, dtype=torch.float64)
    loaded = load_adapter(tmp_path / "adapter", base).eval()  # applies the saved sleep config, then PEFT loads
    assert isinstance(loaded, PeftModel)
    assert (_logits(loaded) - reference).abs().max() < 1e-12
    plain = PeftModel.from_pretrained(_jet(jet_dir), tmp_path / "adapter").eval()
    assert (_logits(plain) - reference).abs().max() < 1e-12

    merged = copy.deepcopy(loaded).merge_and_unload()
    assert (_logits(merged) - reference).abs().max() < 1e-10

    out = tmp_path / "merged"
    argv = ["merge", str(tmp_path / "adapter"), "-o", str(out), "--base", str(jet_dir)]
    assert main(argv) == 0
    from_cli = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float64).eval()
    assert from_cli.sleep_config == SLEEP
    assert (_logits(from_cli) - reference).abs().max() < 1e-4  # merged and saved in float32
    assert main(["merge", str(tmp_path), "-o", str(out)]) == 2


def test_ouro_mixers_train_in_full_through_modules_to_save(tmp_path):
    write_ouro(tmp_path / "ouro")
    base = AutoModelForCausalLM.from_pretrained(tmp_path / "ouro", dtype=torch.float64)
    base.config.jet_mixer_layers = [1, 3]
    base.config.jet_mixer_config = {"num_heads": 2, "head_dim": 8, "expand_v": 2, "conv_size": 4}
    model = apply_lora(apply_sleep(base, SLEEP), AdapterSection(r=4))
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    assert any("jet_mixers.1.modules_to_save" in n and n.endswith("o_proj.weight") for n in names)
    assert not any("jet_mixers" in n and "lora_" in n for n in names)  # no adapter inside the new modules
    assert any("layers.0.self_attn.q_proj.lora_A" in n for n in names)
    before = _logits(model)
    _train_step(model)
    assert (_logits(model) - before).abs().max() > 1e-6  # the zero-initialised mixers now contribute


@pytest.mark.parametrize(
    ("target", "named"),
    [("q_conv1d", "q_conv1d"), ("A_log", "A_log"), ("dt_bias", "dt_bias"), ("x_proj", "x_proj")],
)
def test_targets_that_an_op_would_bypass_are_refused_by_name(target, named):
    model = apply_sleep(tiny_hybrid(vocab_size=37), SLEEP)
    with pytest.raises(LoraTargetError, match=named):
        apply_lora(model, AdapterSection(target_modules=["q_proj", target]))


def test_recipe_adapter_section_accepts_the_shorthand():
    assert AdapterSection.model_validate("lora") == AdapterSection()


def test_a_peft_wrapped_sleeping_model_generates_like_its_engine():
    model = apply_lora(apply_sleep(tiny_hybrid(), SleepConfig(window=4, passes=2)), AdapterSection(r=2))
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "lora_B" in name:
                parameter.normal_()
        prompt, _ = random_batch(1, 5, 19, seed=3)
        out = model.generate(input_ids=prompt, max_new_tokens=8, do_sample=False)
        reference = model(input_ids=out).logits
    assert torch.equal(reference[:, 4:-1].argmax(-1), out[:, 5:])


# ---------------------------------------------------------------------------------------------- in a recipe


def test_a_recipe_with_an_adapter_trains_only_the_adapter_saves_resumes_and_evaluates(tmp_path, monkeypatch, capsys):
    """`adapter: lora` on a tiny Ouro (mixers in modules_to_save): a 3-step run, checkpoints at steps 2 and 3."""
    built = []

    def spy(resolved):
        model = build_model(resolved)
        built.append((model, {n: p.detach().clone() for n, p in model.named_parameters()}))
        return model

    monkeypatch.setattr(trainer, "build_model", spy)
    checkpoint = tiny_ouro_checkpoint(tmp_path / "ouro")
    sections = {"adapter": {"r": 4}, "train": {"max_steps": 3, "checkpoint_every": 2}}
    recipe = ouro_recipe(tmp_path, "lora", checkpoint, **sections)
    assert main(["train", str(recipe)]) == 0
    run = tmp_path / "lora"
    assert not (run / "model").exists()
    assert {"adapter_config.json", "adapter_model.safetensors", "sleep_config.json", "tokenizer.json"} <= {
        p.name for p in (run / "adapter").iterdir()
    }

    model, initial = built[0]
    assert isinstance(model, PeftModel)
    changed = {n for n, p in model.named_parameters() if not torch.equal(p, initial[n])}
    assert changed and all("lora_" in n or ".modules_to_save." in n for n in changed)  # only the adapter trained
    assert any("q_proj.lora_B" in n for n in changed) and any("modules_to_save" in n for n in changed)

    # The saved adapter, on its base rebuilt from the checkpoint it names, computes what the trained model computes.
    loaded = load_adapter(run / "adapter", dtype=torch.float32).eval()
    ids, _ = random_batch(2, 60, 132, seed=4)
    with torch.no_grad():
        assert torch.equal(loaded(input_ids=ids).logits, model.eval()(input_ids=ids).logits)

    # `retrofit eval RUN` loads the adapter and reproduces the run's own final evaluation.
    assert main(["eval", str(run), "--output-dir", str(tmp_path / "eval")]) == 0
    ours, theirs = (json.loads((d / "results.json").read_text()) for d in (run, tmp_path / "eval"))
    assert ours["buckets"] == theirs["buckets"]

    # `retrofit push --dry-run` writes the adapter folder with a PEFT model card; it loads back the same.
    upload = tmp_path / "upload"
    assert main(["push", str(run), "--repo-id", "me/lora", "--dry-run", "--output-dir", str(upload)]) == 0
    assert "library_name: peft" in (upload / "README.md").read_text()
    with torch.no_grad():
        assert torch.equal(
            load_adapter(upload, dtype=torch.float32).eval()(input_ids=ids).logits, loaded(input_ids=ids).logits
        )

    # `retrofit generate RUN` streams with the adapter run as it does with a full model.
    assert main(["generate", str(run), "--prompt", "0 1 1 0", "--max-new-tokens", "3", "--sleep-when-idle"]) == 0
    assert "idle: consolidated" in capsys.readouterr().out

    # Resuming from the step-2 checkpoint (adapter weights only) ends with the same adapter.
    resumed = tmp_path / "resumed"
    shutil.copytree(run / "checkpoints" / "step_000002", resumed / "checkpoints" / "step_000002")
    assert main(["train", str(recipe), "--set", f"output_dir={resumed}", "--resume", "auto"]) == 0
    a, b = (load_file(d / "adapter" / "adapter_model.safetensors") for d in (run, resumed))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    capsys.readouterr()
