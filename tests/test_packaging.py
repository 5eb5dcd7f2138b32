"""The wheel carries every code package and the shipped recipes/ and data/, and an installed copy uses them."""

import json
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PROJECT_FILES = ("pyproject.toml", "setup.py", "README.md", "retrofit", "model_patches", "recipes", "data")

# Run inside the unpacked wheel, away from the checkout: where the files come from, and that they work.
INSTALLED_CHECK = """
import json, retrofit
from retrofit.launch import accelerate_config, deepspeed_template
from retrofit.recipes import load_recipe
from retrofit.shipped import shipped_dir
from retrofit.tasks import get_task
print(json.dumps({
    "package": retrofit.__file__,
    "recipes": str(shipped_dir("recipes")),
    "configs": [accelerate_config("zero3").is_file(), deepspeed_template("zero3").is_file()],
    "recipe": load_recipe("rule110-tiny").recipe.task.name,
    "frozen": len(get_task("rule110").load_frozen_eval()),
}))
"""


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    """The wheel, built offline from a copy of the project's files (setuptools leaves build/ where it builds)."""
    source, out = tmp_path_factory.mktemp("source"), tmp_path_factory.mktemp("wheel")
    for name in PROJECT_FILES:
        if (REPO / name).is_dir():
            shutil.copytree(REPO / name, source / name, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy2(REPO / name, source / name)
    command = [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "--no-index"]
    subprocess.run([*command, "-w", str(out), str(source)], check=True, capture_output=True, cwd=out)
    (built,) = out.glob("sleep_retrofit-*.whl")
    return built


def test_wheel_holds_every_package_and_shipped_file(wheel):
    names = set(zipfile.ZipFile(wheel).namelist())
    for init in [*REPO.glob("retrofit/**/__init__.py"), *REPO.glob("model_patches/**/__init__.py")]:
        assert init.relative_to(REPO).as_posix() in names
    for top in ("recipes", "data"):
        files = [p for p in (REPO / top).rglob("*") if p.is_file()]
        assert files
        for path in files:
            assert f"retrofit/_shipped/{path.relative_to(REPO).as_posix()}" in names


def test_installed_wheel_launches_loads_recipes_by_name_and_reads_frozen_sets(wheel, tmp_path):
    site = tmp_path / "site"
    zipfile.ZipFile(wheel).extractall(site)
    env = {**os.environ, "PYTHONPATH": str(site)}
    proc = subprocess.run(
        [sys.executable, "-c", INSTALLED_CHECK], env=env, cwd=tmp_path, capture_output=True, text=True, check=False
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    found = json.loads(proc.stdout.strip().splitlines()[-1])
    assert Path(found["package"]).is_relative_to(site)
    assert Path(found["recipes"]) == site / "retrofit" / "_shipped" / "recipes"
    assert found["configs"] == [True, True]
    assert found["recipe"] == "rule110"
    assert found["frozen"] > 0
