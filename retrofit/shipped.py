"""The files that ship with the package: `recipes/` (recipes, accelerate and DeepSpeed configs) and `data/` (frozen
evaluation sets, tokenizers).

A source checkout (also an editable install) reads them beside the package; a wheel carries them inside it, as
`retrofit/_shipped/recipes` and `retrofit/_shipped/data` (setup.py), so `pip install sleep-retrofit` can launch
ZeRO runs, evaluate on the frozen sets and train a shipped recipe by name (`retrofit train rule110-tiny`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

PACKAGE_DIR = Path(__file__).resolve().parent


def shipped_dir(name: Literal["recipes", "data"]) -> Path:
    """The folder `name` of this installation: inside the package when installed from a wheel, else the checkout's."""
    installed = PACKAGE_DIR / "_shipped" / name
    return installed if installed.is_dir() else PACKAGE_DIR.parent / name


def shipped_recipes() -> dict[str, Path]:
    """The shipped recipes by name: their path under `recipes/` without `.yaml` (`rule110-tiny`, `replicate/depo`);
    the shared bases in `base/` are not recipes of their own."""
    root = shipped_dir("recipes")
    paths = sorted(p for p in root.rglob("*.yaml") if p.relative_to(root).parts[0] not in ("accelerate", "base"))
    return {p.relative_to(root).with_suffix("").as_posix(): p for p in paths}
