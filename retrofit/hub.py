"""Publishing a run to the Hugging Face Hub: `retrofit push RUN_DIR --repo-id user/name [--private] [--dry-run]`.

The upload folder holds the model (config.json with `sleep_config`, safetensors only), its tokenizer, the run's
`recipe.yaml` and evaluation results, and a model card (README.md) that embeds the recipe, names the base model and
its revision, cites arXiv 2605.26099 and records the versions of this toolkit, torch, fla and transformers, so a
reader can reproduce the run. `--dry-run` writes that exact folder locally instead of uploading it.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
from dataclasses import replace
from importlib import metadata
from pathlib import Path
from typing import Any

import yaml
from huggingface_hub import HfApi
from transformers.utils import logging as hf_logging

from retrofit.lora import SLEEP_CONFIG_FILE, is_adapter_dir
from retrofit.tasks import TASKS, task_class
from retrofit.tasks.tokenizer import load_tokenizer
from retrofit.training.checkpoint import MODEL_DIR, SavedModel, is_checkpoint, load_model, locate_saved_model

ARXIV_ID = "2605.26099"
BIBTEX = """
@article{lee2026sleep,
  title   = {Language Models Need Sleep},
  author  = {Lee, Sangyun and McLeish, Sean and Goldstein, Tom and Fanti, Giulia},
  journal = {arXiv preprint arXiv:2605.26099},
  year    = {2026}
}
"""
EVAL_FILES = ("results.md", "results.json", "results.png")
VERSIONED_PACKAGES = (("torch", "torch"), ("transformers", "transformers"), ("fla", "flash-linear-attention"))


class PushError(ValueError):
    """The run directory cannot be published as it is; the message says what is missing."""


def locate_run(run_dir: Path) -> SavedModel:
    """The model folder (a checkpoint's `model/`) and recipe of a run directory, a checkpoint or a model folder; the
    evaluation results sit beside the recipe."""
    try:
        saved = locate_saved_model(run_dir)
    except FileNotFoundError as exc:
        raise PushError(str(exc)) from None
    return replace(saved, model=saved.model / MODEL_DIR) if is_checkpoint(saved.model) else saved


def package_versions() -> dict[str, str]:
    """Versions of this toolkit and of the packages a retrofitted checkpoint depends on."""
    import retrofit

    versions = {"sleep-retrofit": retrofit.__version__}
    for label, dist in VERSIONED_PACKAGES:
        try:
            versions[label] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            versions[label] = "not installed"
    return versions


def model_card(run: SavedModel, repo_id: str) -> str:
    """The README.md of the upload: metadata header, what the model is, how to load it, recipe, versions, eval."""
    recipe_text = run.recipe.read_text()
    recipe: dict[str, Any] = yaml.safe_load(recipe_text) or {}
    model_section = recipe.get("model") or {}
    base, revision = model_section.get("pretrained"), model_section.get("revision")
    adapter = is_adapter_dir(run.model)
    if adapter:  # the sleep config travels next to the adapter (optional: `load_adapter` treats it so too)
        saved_sleep = run.model / SLEEP_CONFIG_FILE
        sleep = json.loads(saved_sleep.read_text()) if saved_sleep.is_file() else None
    else:
        sleep = json.loads((run.model / "config.json").read_text()).get("sleep_config")
    library = "peft" if adapter else "transformers"
    header: dict[str, Any] = {
        "library_name": library,
        "pipeline_tag": "text-generation",
        # weights from scratch are this toolkit's (Apache-2.0); a retrofitted checkpoint keeps its base model's licence
        "license": "other" if base else "apache-2.0",
        "tags": ["sleep-retrofit", "sleep", "linear-attention"],
    }
    if base:
        header["license_name"] = "the base model's licence"
        header["license_link"] = f"https://huggingface.co/{base}"
        header["base_model"] = base
    task = (recipe.get("task") or {}).get("name", "")
    difficulty = task_class(task).difficulty_meaning if task in TASKS else "the task's difficulty bucket"
    versions = package_versions()
    eval_md = run.recipe.parent / "results.md"
    lines = [
        "---",
        yaml.safe_dump(header, sort_keys=False).strip(),
        "---",
        "",
        f"# {repo_id.split('/')[-1]}",
        "",
        f"A language model retrofitted with **sleep** ([arXiv {ARXIV_ID}](https://arxiv.org/abs/{ARXIV_ID}): Lee, "
        "McLeish, Goldstein, Fanti, *Language Models Need Sleep*) by "
        f"sleep-retrofit {versions['sleep-retrofit']}. Before each "
        "attention window is evicted, the model runs extra recurrent passes over it and consolidates it into the fast "
        "weights of its linear-attention layers.",
        "",
        f"- Base model: {base or 'none (trained from scratch; see config.json)'}",
        f"- Base model revision: {(revision or 'default branch') if base else 'n/a'}",
        f"- Sleep config: `{json.dumps(sleep)}`",
        "",
        "## Usage",
        "",
        "Loading needs this toolkit (it adds the sleep to transformers' model classes):",
        "",
        "```bash",
        f"pip install sleep-retrofit=={versions['sleep-retrofit']}  # or, in a clone of its repository: "
        "pip install -e .",
        "```",
        "",
        "```python",
        *(_adapter_usage(repo_id) if adapter else _model_usage(repo_id)),
        "```",
        "",
        "`model.generate(...)` streams with sleep every L tokens; `model.sleep(cache)` consolidates early when idle.",
        "",
        "## Evaluation",
        "",
        f'Task `{task}`; "difficulty" is {difficulty}. One forward pass per example, no extra loops at prediction.',
        "",
        eval_md.read_text().strip() if eval_md.is_file() else "No evaluation results were found in the run directory.",
        "",
        "## Versions",
        "",
        *(f"- {name}: {version}" for name, version in versions.items()),
        "",
        "## Training recipe",
        "",
        "```yaml",
        recipe_text.rstrip(),
        "```",
        "",
        "## Licence",
        "",
        f"The base model's licence ({base}) governs these weights." if base else "Apache-2.0.",
        "",
        "## Citation",
        "",
        "```bibtex",
        BIBTEX.strip(),
        "```",
        "",
    ]
    return "\n".join(lines)


def _model_usage(repo_id: str) -> list[str]:
    return [
        "import retrofit  # registers the model classes with transformers",
        "from transformers import AutoModelForCausalLM, AutoTokenizer",
        "",
        f'model = AutoModelForCausalLM.from_pretrained("{repo_id}")',
        f'tokenizer = AutoTokenizer.from_pretrained("{repo_id}")',
    ]


def _adapter_usage(repo_id: str) -> list[str]:
    return [
        "# A LoRA adapter: load_adapter rebuilds its base (see adapter_config.json) and makes it sleep as trained.",
        "from huggingface_hub import snapshot_download",
        "from transformers import AutoTokenizer",
        "from retrofit.lora import load_adapter",
        "",
        f'folder = snapshot_download("{repo_id}")',
        "model = load_adapter(folder)",
        "tokenizer = AutoTokenizer.from_pretrained(folder)",
    ]


def check_loads(model_dir: Path) -> None:
    """`PushError` unless the folder loads as users will load it, tokenizer included."""
    bars_on = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()  # a progress bar per check would bury the one line that matters
    try:
        load_model(model_dir)
    except Exception as exc:  # any reader may fail, in its own way, on a truncated or mismatched folder
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise PushError(f"{model_dir} does not load ({first}); publish a complete model folder") from None
    finally:
        if bars_on:
            hf_logging.enable_progress_bar()
    try:
        load_tokenizer(model_dir)
    except Exception as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise PushError(f"{model_dir} has no usable tokenizer ({first}); save the tokenizer beside the model") from None


def build_upload_folder(run_dir: Path, folder: Path, repo_id: str) -> Path:
    """Write everything that would be uploaded for `run_dir` into `folder` (created; must be empty)."""
    run = locate_run(run_dir)
    if list(run.model.glob("*.bin")):
        raise PushError(f"{run.model} holds .bin weights; publish safetensors only (re-save with save_pretrained)")
    if not list(run.model.glob("*.safetensors")):
        raise PushError(f"{run.model} holds no .safetensors weights")
    check_loads(run.model)
    folder.mkdir(parents=True, exist_ok=True)
    if any(folder.iterdir()):
        raise PushError(f"{folder} is not empty; give an empty or new --output-dir")
    for path in run.model.iterdir():
        if path.is_file():
            shutil.copy2(path, folder / path.name)
    shutil.copy2(run.recipe, folder / "recipe.yaml")
    for name in EVAL_FILES:
        if (run.recipe.parent / name).is_file():
            shutil.copy2(run.recipe.parent / name, folder / name)
    (folder / "README.md").write_text(model_card(run, repo_id))
    return folder


def push(
    run_dir: Path,
    repo_id: str,
    *,
    private: bool = False,
    dry_run: bool = False,
    output_dir: Path | None = None,
    api: Any = None,
) -> str:
    """Publish `run_dir` to `repo_id`; return the repo URL, or with `dry_run` the folder written instead.

    `api` stands in for `huggingface_hub.HfApi()` (tests pass a fake); the upload is `create_repo` + `upload_folder`.
    """
    if repo_id.count("/") != 1 or not all(repo_id.split("/")):
        raise PushError(f"--repo-id {repo_id!r} must look like user/name")
    if dry_run:
        folder = output_dir or run_dir / "hub-upload"
        return str(build_upload_folder(run_dir, folder, repo_id))
    api = HfApi() if api is None else api
    with tempfile.TemporaryDirectory(prefix="retrofit-push-") as tmp:
        folder = build_upload_folder(run_dir, Path(tmp) / "upload", repo_id)
        url = api.create_repo(repo_id, private=private, repo_type="model", exist_ok=True)
        api.upload_folder(
            repo_id=repo_id, folder_path=folder, repo_type="model", commit_message="Upload sleep-retrofitted model"
        )
    return str(url)


# ---------------------------------------------------------------------- command line


def add_push_parser(subparsers: argparse._SubParsersAction) -> None:
    """Register `retrofit push RUN_DIR --repo-id user/name [--private] [--dry-run] [--output-dir DIR]`."""
    parser = subparsers.add_parser("push", help="upload a run's model, tokenizer and model card to the Hub")
    parser.add_argument("run_dir", type=Path, help="run directory (or a checkpoint or model folder inside one)")
    parser.add_argument("--repo-id", required=True, help="Hub repository, user/name")
    parser.add_argument("--private", action="store_true", help="create the repository as private")
    parser.add_argument("--dry-run", action="store_true", help="write the folder that would be uploaded, and stop")
    parser.add_argument("--output-dir", type=Path, help="where --dry-run writes it (default: RUN_DIR/hub-upload)")
    parser.set_defaults(run=run_push)


def run_push(args: argparse.Namespace) -> int:
    """Handler of `retrofit push`; a run that cannot be published exits 2 with one line."""
    try:
        result = push(
            args.run_dir, args.repo_id, private=args.private, dry_run=args.dry_run, output_dir=args.output_dir
        )
    except PushError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"wrote {result}" if args.dry_run else f"pushed {args.run_dir} to {result}")
    return 0
