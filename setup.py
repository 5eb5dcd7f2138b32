"""The package list, computed: every code package, plus the top-level `recipes/` and `data/` shipped inside the wheel
as `retrofit/_shipped/recipes` and `retrofit/_shipped/data` (each of their folders a data-only package), so that an
installed `retrofit` finds its launch configs and frozen evaluation sets (`retrofit.shipped`). Metadata is in
pyproject.toml."""

from pathlib import Path

from setuptools import find_packages, setup

ROOT = Path(__file__).parent
SHIPPED = ("recipes", "data")


def shipped_packages() -> dict[str, str]:
    """`retrofit._shipped.<dotted folder>` -> folder, for each shipped folder and its subfolders."""
    packages = {}
    for top in SHIPPED:
        for folder in [ROOT / top, *sorted(p for p in (ROOT / top).rglob("*") if p.is_dir())]:
            relative = folder.relative_to(ROOT)
            packages["retrofit._shipped." + ".".join(relative.parts)] = relative.as_posix()
    return packages


shipped = shipped_packages()
setup(
    packages=[*find_packages(include=["retrofit", "retrofit.*", "model_patches", "model_patches.*"]), *shipped],
    package_dir=shipped,
    package_data={name: ["*"] for name in shipped},
)
