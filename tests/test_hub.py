"""Saving, loading and publishing: exact round trips per family, refusal of mismatched weights, `retrofit push`."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM

import retrofit
from retrofit import SleepConfig, apply_sleep
from retrofit.cli import main
from retrofit.hub import ARXIV_ID, push
from retrofit.tasks.tokenizer import build_word_tokenizer
from tests.helpers import random_batch, tiny_hybrid
from tests.jet_checkpoint import write_official_checkpoint as write_jet
from tests.ouro_checkpoint import write_official_checkpoint as write_ouro

SLEEP = SleepConfig(window=4, passes=2, eviction="sliding")
RECIPE = "output_dir: runs/tiny\nmodel:\n  pretrained: org/base-model\n  revision: abc123\nsleep:\n  window: 4\n"
EVAL_TABLE = "| difficulty | examples | accuracy | loss |\n|---:|---:|---:|---:|\n| 1 | 8 | 0.750 | 0.5000 |\n"


def _logits(model: torch.nn.Module, seed: int = 2) -> torch.Tensor:
    ids, _ = random_batch(2, 11, 19, seed=seed)
    with torch.no_grad():
        return model(ids).logits


def _sleeping(family: str, tmp_path: Path) -> torch.nn.Module:
    assert retrofit.__version__
    if family == "hybrid":
        return apply_sleep(tiny_hybrid(), SLEEP)
    source = tmp_path / "source"
    (write_jet if family == "jet_nemotron" else write_ouro)(source)
    model = AutoModelForCausalLM.from_pretrained(source, dtype=torch.float64).eval()
    if family == "ouro":
        model.config.jet_mixer_layers = [1, 3]
        model.config.jet_mixer_config = {"num_heads": 2, "head_dim": 8, "expand_v": 2, "conv_size": 4}
    apply_sleep(model, SLEEP)
    if family == "ouro":  # trained mixers, so that their weights matter after the round trip
        with torch.no_grad():
            for mixer in model.model.jet_mixers.values():
                mixer.self_attn.o_proj.weight.normal_(0, 0.3)
    return model


@pytest.mark.parametrize("family", ["hybrid", "jet_nemotron", "ouro"])
def test_save_and_from_pretrained_restore_an_identical_sleeping_model(family, tmp_path):
    model = _sleeping(family, tmp_path)
    model.save_pretrained(tmp_path / "saved")
    files = {p.name for p in (tmp_path / "saved").iterdir()}
    assert "model.safetensors" in files and not any(name.endswith(".bin") for name in files)
    assert json.loads((tmp_path / "saved" / "config.json").read_text())["sleep_config"] == SLEEP.to_dict()
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "saved", dtype=torch.float64).eval()
    assert loaded.sleep_config == SLEEP
    assert all(
        torch.equal(a, b) for a, b in zip(loaded.state_dict().values(), model.state_dict().values(), strict=True)
    )
    assert (_logits(loaded) - _logits(model)).abs().max() < 1e-12  # float64; kernels may reorder sums


@pytest.mark.parametrize("damage", ["rename", "reshape"])
def test_a_checkpoint_whose_weights_do_not_match_its_config_is_refused_by_key(damage, tmp_path):
    apply_sleep(tiny_hybrid(), SLEEP).save_pretrained(tmp_path)
    weights = load_file(tmp_path / "model.safetensors")
    key = "model.layers.1.self_attn.q_proj.weight"
    if damage == "rename":
        weights["model.layers.1.self_attn.query.weight"] = weights.pop(key)
    else:
        weights[key] = weights[key][:-1]
    save_file(weights, tmp_path / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ValueError, match=key.replace(".", r"\.")):
        AutoModelForCausalLM.from_pretrained(tmp_path)


@pytest.fixture
def run_dir(tmp_path: Path) -> Path:
    """A run directory as the trainer leaves it: model/ (with tokenizer), recipe.yaml, results.md/json."""
    run = tmp_path / "run"
    model = apply_sleep(tiny_hybrid(dtype=torch.float32), SLEEP)
    model.save_pretrained(run / "model")
    build_word_tokenizer([f"w{i}" for i in range(17)]).save_pretrained(run / "model")
    (run / "recipe.yaml").write_text(RECIPE)
    (run / "results.md").write_text(EVAL_TABLE)
    (run / "results.json").write_text(json.dumps({"task": "tiny", "step": 3, "buckets": []}))
    return run


def test_push_dry_run_writes_a_loadable_folder_with_a_model_card(run_dir, tmp_path, capsys):
    out = tmp_path / "upload"
    assert main(["push", str(run_dir), "--repo-id", "me/tiny", "--dry-run", "--output-dir", str(out)]) == 0
    assert str(out) in capsys.readouterr().out
    loaded = AutoModelForCausalLM.from_pretrained(out).eval()
    original = AutoModelForCausalLM.from_pretrained(run_dir / "model").eval()
    assert torch.equal(_logits(loaded), _logits(original))
    card = (out / "README.md").read_text()
    for needle in (
        ARXIV_ID,
        "base_model: org/base-model",
        "abc123",
        "pretrained: org/base-model",  # the recipe, embedded
        "| 1 | 8 | 0.750 | 0.5000 |",  # the evaluation table
        f"sleep-retrofit: {retrofit.__version__}",
        f"torch: {torch.__version__}",
        "transformers: ",
        "fla: ",
    ):
        assert needle in card, needle
    assert {"recipe.yaml", "results.json", "tokenizer.json", "model.safetensors"} <= {p.name for p in out.iterdir()}


class FakeHfApi:
    """Records the calls `push` makes instead of talking to the Hub."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, dict]] = []

    def create_repo(self, repo_id: str, **kwargs) -> str:
        self.calls.append(("create_repo", {"repo_id": repo_id, **kwargs}))
        return f"https://huggingface.co/{repo_id}"

    def upload_folder(self, **kwargs) -> None:
        folder = Path(kwargs["folder_path"])
        self.calls.append(("upload_folder", {**kwargs, "files": sorted(p.name for p in folder.iterdir())}))


@pytest.mark.parametrize("private", [False, True])
def test_push_creates_the_repo_and_uploads_the_folder(run_dir, private):
    api = FakeHfApi()
    url = push(run_dir, "me/tiny", private=private, api=api)
    assert url == "https://huggingface.co/me/tiny"
    (create, create_args), (upload, upload_args) = api.calls
    assert (create, create_args["repo_id"], create_args["private"]) == ("create_repo", "me/tiny", private)
    assert (upload, upload_args["repo_id"]) == ("upload_folder", "me/tiny")
    assert {"README.md", "config.json", "model.safetensors", "recipe.yaml", "tokenizer.json"} <= set(
        upload_args["files"]
    )


def test_push_cli_uses_hfapi_and_reports_user_errors(run_dir, tmp_path, monkeypatch, capsys):
    api = FakeHfApi()
    monkeypatch.setattr("retrofit.hub.HfApi", lambda: api)
    assert main(["push", str(run_dir), "--repo-id", "me/tiny", "--private"]) == 0
    assert api.calls[0][1]["private"] is True
    assert main(["push", str(run_dir), "--repo-id", "not-a-repo-id"]) == 2
    assert main(["push", str(tmp_path / "missing"), "--repo-id", "me/tiny"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 2 and all(line.startswith("error: ") for line in err)


def test_generate_cli_prints_a_continuation_and_sleeps_when_idle(run_dir, capsys):
    assert main(["generate", str(run_dir), "--prompt", "w1 w2 w3", "--max-new-tokens", "5", "--sleep-when-idle"]) == 0
    # 3 prompt tokens + 4 generated ones went through the model (the 5th is only sampled): with L=4 the chunk
    # [4, 7) was still open, and idle time consolidated it
    assert "idle: consolidated 3 token(s)" in capsys.readouterr().out


def _generated(capsys, run_dir: Path, *flags: str) -> list[str]:
    assert main(["generate", str(run_dir), "--max-new-tokens", "8", *flags]) == 0
    return capsys.readouterr().out.strip().splitlines()


def test_generate_cli_samples_reproducibly_and_top_k_1_is_greedy(run_dir, capsys):
    greedy = _generated(capsys, run_dir, "--prompt", "w1 w2 w3")
    hot = ["--prompt", "w1 w2 w3", "--temperature", "3"]
    first, again, other = (_generated(capsys, run_dir, *hot, "--seed", s) for s in ("1", "1", "2"))
    assert first == again and first != other  # the seed repeats a draw
    assert _generated(capsys, run_dir, *hot, "--top-k", "1") == greedy  # one candidate: the argmax
    assert main(["generate", str(run_dir), "--prompt", "w1", "--temperature", "0"]) == 2


def test_generate_cli_stops_at_a_string(run_dir, capsys):
    (greedy,) = _generated(capsys, run_dir, "--prompt", "w1 w2 w3")
    stop = greedy.split()[2]
    (stopped,) = _generated(capsys, run_dir, "--prompt", "w1 w2 w3", "--stop", stop)
    assert stopped == greedy[: greedy.index(stop) + len(stop)]


def test_generate_cli_runs_several_prompts_as_the_engine_on_the_padded_batch(run_dir, capsys):
    """Each row of a batch of prompts of different lengths is the engine's greedy continuation of that row of the
    left-padded batch (the semantics of padded coordinates)."""
    lines = _generated(capsys, run_dir, "--prompt", "w1 w2 w3 w4 w5 w6", "--prompt", "w7 w8")
    model = AutoModelForCausalLM.from_pretrained(run_dir / "model").eval()
    tokenizer = retrofit.tasks.load_tokenizer(run_dir / "model")
    tokenizer.padding_side = "left"
    batch = tokenizer(["w1 w2 w3 w4 w5 w6", "w7 w8"], return_tensors="pt", padding=True, return_token_type_ids=False)
    ids, mask = batch["input_ids"], batch["attention_mask"]
    with torch.no_grad():
        for _ in range(8):  # greedy, one token at a time, each from the engine's logits over the whole padded batch
            logits = model.sleep_engine().forward(ids, mask, return_logits=True).logits
            ids = torch.cat([ids, logits[:, -1].argmax(-1, keepdim=True)], dim=1)
            mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
    want = [tokenizer.decode(row[batch["input_ids"].shape[1] :], skip_special_tokens=True) for row in ids]
    assert lines == [f"[1] {want[0]}", f"[2] {want[1]}"]
